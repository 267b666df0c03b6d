"""Shared fixtures: real databases (SQLite and PostgreSQL), a real S3 endpoint (moto's server on
loopback) and one real local Ray per test session.

PostgreSQL: QF_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres) must
reach a server where we may create databases; each test session creates its own database and drops it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports boto3 or ray: fake AWS credentials (only moto sees them) and no Ray auth tokens.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

POSTGRES_ADMIN_URL = os.environ.get(
    "QF_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TABLES = (
    "webhook_attempts",
    "webhook_deliveries",
    "webhooks",
    "registrations",
    "artifacts",
    "job_events",
    "job_labels",
    "jobs",
    "schedule_fires",
    "batches",
    "schedules",
    "api_keys",
)


def _psycopg_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session (dropped afterwards)."""
    import psycopg

    from orchestrator.db import migrate

    try:
        admin = psycopg.connect(_psycopg_dsn(POSTGRES_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({e}); start it (.ci/run does) "
            "or point QF_TEST_POSTGRES_URL at a server where tests may create databases"
        )
    name = f"qf_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate(url)
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from orchestrator.db import migrate

    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'quantfleet.db'}"
    migrate(url)
    return url


def _empty_tables(url: str) -> None:
    from sqlalchemy import text

    from orchestrator.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated database with empty tables, once on SQLite and once on PostgreSQL."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    _empty_tables(url)
    return url


@pytest.fixture
def clean_sqlite_url(sqlite_url: str) -> str:
    """The session's SQLite database with empty tables (the embedded default, for single-database tests)."""
    _empty_tables(sqlite_url)
    return sqlite_url


@pytest.fixture
def clean_postgres_url(postgres_url: str) -> str:
    """The session's PostgreSQL database with empty tables (for tests that only make sense there)."""
    _empty_tables(postgres_url)
    return postgres_url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port: real HTTP, real boto3 client, no AWS."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"qf-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the whole session (starting one takes several seconds)."""
    import ray

    ray.init(
        address="local",  # a new instance, even if another Ray runs on this machine
        num_cpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def allowed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the service may read inputs from (QF_ALLOWED_ROOTS in the tests)."""
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="session")
def tiny_assets(allowed_root: Path) -> dict[str, Path]:
    """A 2-layer tiny Llama plus calibration and evaluation text, inside the allowed root."""
    from tests.helpers import make_tiny_llama, write_text_corpus

    return {
        "model": make_tiny_llama(allowed_root / "tiny-llama", num_layers=2, seed=0),
        "model_1layer": make_tiny_llama(allowed_root / "tiny-llama-1", num_layers=1, seed=1),
        "calibration": write_text_corpus(allowed_root / "calibration.txt", 6000, seed=0),
        "eval": write_text_corpus(allowed_root / "eval.txt", 3000, seed=1),
    }


@pytest.fixture(autouse=True)
def _default_dtype_is_not_leaked() -> Iterator[None]:
    """Jobs run in threads must never leave torch's process-wide default dtype changed (transformers'
    from_config switches it while building a model); later tests would silently compute in fp16."""
    import torch

    yield
    assert torch.get_default_dtype() == torch.float32, "a test left torch's default dtype changed"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: fastest on the tiny models the benchmark tests run (the cores are shared
    with the rest of the suite), and the thread count the engine-bytes hashes were recorded with (a BLAS
    reduction split over more threads adds in another order)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
