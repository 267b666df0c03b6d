"""The MLflow adapter against a real MLflow tracking server started on loopback (SQLite backend), read
back with MLflow's own client: versions, tags, the candidate alias, and no duplicates on retries."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from api.schemas import JobCreate
from orchestrator.db import transaction
from orchestrator.fleet.delivery_loop import DeliveryLoop
from orchestrator.fleet.registry_mlflow import (
    CANDIDATE_ALIAS,
    GATE_TAG,
    JOB_TAG,
    MlflowError,
    MlflowRegistry,
    registered_model_name,
)
from orchestrator.queue import crud
from orchestrator.queue.leases import claim_jobs, succeed_attempt
from orchestrator.queue.models import Registration
from orchestrator.queue.specs import request_hash
from orchestrator.settings import Settings
from tests.helpers import wait_until_up
from tests.orchestrator.support import sessions_for

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None,
    reason="the mlflow package (which provides the tracking server) is not installed: pip install mlflow",
)

METRICS = {
    "ppl_original": 12.5,
    "ppl_quantized": 12.9,
    "delta_ppl_pct": 3.2,
    "kl_mean": 0.021,
    "tokens": 4096,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = (root / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    server = subprocess.Popen(
        [
            mlflow_cli,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{uri}/health", server, 120, "MLflow server", lambda: (root / "server.log").read_text()[-3000:])
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def registry(mlflow_uri: str) -> Iterator[MlflowRegistry]:
    with MlflowRegistry(mlflow_uri) as reg:
        yield reg


@pytest.fixture(scope="module")
def mlflow_client(mlflow_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)


def _job_versions(client: Any, name: str, job_id: str) -> list[Any]:
    return list(client.search_model_versions(f"name='{name}' and tags.`{JOB_TAG}`='{job_id}'"))


def test_a_passing_artifact_becomes_a_tagged_candidate_version(
    registry: MlflowRegistry, mlflow_client: Any
) -> None:
    name = registered_model_name("/srv/models/SmolLM2-135M-Instruct/", "gptq", 4, 64)
    assert name == "SmolLM2-135M-Instruct-gptq-w4-g64"
    got = registry.register(
        name=name,
        job_id="job_a1",
        source="s3://artifacts/jobs/job_a1/",
        metrics=METRICS,
        gate_passed=True,
        extra_tags={"quantfleet.method": "gptq"},
        description="nightly",
    )
    assert (got.version, got.source, got.created, got.aliases) == (
        "1",
        "s3://artifacts/jobs/job_a1/",
        True,
        ["candidate"],
    )
    # Read back with MLflow's own client: the registry really holds this.
    mv = mlflow_client.get_model_version(name, "1")
    assert mv.source == "s3://artifacts/jobs/job_a1/" and mv.description == "nightly"
    assert mv.tags[JOB_TAG] == "job_a1" and mv.tags[GATE_TAG] == "passed"
    assert (
        mv.tags["quantfleet.metric.delta_ppl_pct"] == "3.2"
        and mv.tags["quantfleet.metric.kl_mean"] == "0.021"
    )
    assert mv.tags["quantfleet.metric.tokens"] == "4096" and mv.tags["quantfleet.method"] == "gptq"
    assert mlflow_client.get_model_version_by_alias(name, CANDIDATE_ALIAS).version == "1"


def test_registering_the_same_job_twice_creates_no_duplicate(
    registry: MlflowRegistry, mlflow_client: Any
) -> None:
    name = "tiny-llama-awq-w4-g32"
    first = registry.register(
        name=name, job_id="job_b1", source="s3://a/jobs/job_b1/", metrics=METRICS, gate_passed=True
    )
    again = registry.register(
        name=name, job_id="job_b1", source="s3://a/jobs/job_b1/", metrics=METRICS, gate_passed=True
    )
    assert first.created and not again.created and again.version == first.version
    assert [v.version for v in _job_versions(mlflow_client, name, "job_b1")] == [first.version]
    assert len(mlflow_client.search_model_versions(f"name='{name}'")) == 1
    assert registry.find_version(name, "job_b1") == again


def test_candidate_moves_only_to_passing_versions(registry: MlflowRegistry, mlflow_client: Any) -> None:
    name = "tiny-llama-rtn-w8-gchannel"
    v1 = registry.register(name=name, job_id="job_c1", source="s3://a/c1/", metrics=METRICS, gate_passed=True)
    v2 = registry.register(
        name=name, job_id="job_c2", source="s3://a/c2/", metrics=METRICS, gate_passed=False
    )
    assert registry.alias_version(name) == v1.version == "1"
    assert v2.version == "2" and v2.aliases == [] and v2.tags[GATE_TAG] == "failed"
    v3 = registry.register(name=name, job_id="job_c3", source="s3://a/c3/", metrics=None, gate_passed=True)
    assert registry.alias_version(name) == "3" and v3.aliases == ["candidate"]
    assert mlflow_client.get_model_version_by_alias(name, CANDIDATE_ALIAS).tags[JOB_TAG] == "job_c3"
    assert registry.alias_version("tiny-llama-rtn-w8-gchannel", "production") is None


def test_a_lost_race_converges_to_one_version(registry: MlflowRegistry, mlflow_client: Any) -> None:
    name = "race-gptq-w4-g32"
    # Two registrations for job_d1 both created a version (each searched before the other created).
    registry._ensure_registered_model(name)
    for _ in range(2):
        mlflow_client.create_model_version(name, "s3://a/d1/", tags={JOB_TAG: "job_d1"})
    got = registry.register(
        name=name, job_id="job_d1", source="s3://a/d1/", metrics=METRICS, gate_passed=True
    )
    assert got.version == "1" and not got.created
    assert [v.version for v in _job_versions(mlflow_client, name, "job_d1")] == ["1"]


def test_local_paths_and_bad_names_are_refused_before_anything_is_created(registry: MlflowRegistry) -> None:
    with pytest.raises(MlflowError, match=r"local path.*QF_OBJECT_STORE=s3://"):
        registry.register(
            name="local-x", job_id="job_e1", source="/var/objects/jobs/job_e1", metrics={}, gate_passed=True
        )
    with pytest.raises(MlflowError, match="local path"):
        registry.register(
            name="local-x", job_id="job_e1", source="file:///var/x", metrics={}, gate_passed=True
        )
    with pytest.raises(MlflowError, match='job id "job\'1" must be'):
        registry.register(name="local-x", job_id="job'1", source="s3://a/x/", metrics={}, gate_passed=True)
    with pytest.raises(MlflowError, match="RESOURCE_DOES_NOT_EXIST"):
        registry.get_version("local-x", "1")  # the refused calls created nothing


def test_unreachable_server_and_bad_uri_say_what_to_check() -> None:
    with (
        MlflowRegistry("http://127.0.0.1:9", timeout_s=2) as reg,
        pytest.raises(MlflowError, match="unreachable"),
    ):
        reg.register(name="m", job_id="j", source="s3://a/b/", metrics={}, gate_passed=True)
    with pytest.raises(MlflowError, match="must be the http"):
        MlflowRegistry("sqlite:///mlflow.db")
    assert MlflowRegistry.from_env({}) is None
    env_registry = MlflowRegistry.from_env({"QF_MLFLOW_TRACKING_URI": "http://mlflow.internal:5000/"})
    assert env_registry is not None and env_registry.tracking_uri == "http://mlflow.internal:5000"
    env_registry.close()


def test_delivery_loop_registers_only_jobs_that_passed_their_gate(
    mlflow_uri: str, mlflow_client: Any, clean_sqlite_url: str, tmp_path: Path
) -> None:
    sessions = sessions_for(clean_sqlite_url)
    settings = Settings(
        database_url=clean_sqlite_url, object_store=str(tmp_path), mlflow_tracking_uri=mlflow_uri
    )
    ids = {}
    for limit in (0.05, 0.0001):  # the first passes its gate, the second fails it
        spec = JobCreate.model_validate(
            {
                "model": "/srv/models/SmolLM2-135M-Instruct",
                "method": "gptq",
                "bits": 8,
                "group_size": 32,
                "eval": {"uri": "/srv/eval.txt"},
                "gate": {"max_kl": limit},
            }
        ).model_dump(mode="json")
        with transaction(sessions) as s:
            ids[limit] = crud.create_job(
                s, owner="alice", spec=spec, request_hash=request_hash(spec), max_attempts=1
            ).id
    with transaction(sessions) as s:
        claims = claim_jobs(s, owner="w", limit=2, lease_seconds=60)
    for claim in claims:
        with transaction(sessions) as s:
            succeed_attempt(
                s,
                claim.job_id,
                claim.attempt,
                output_uri=f"s3://artifacts/jobs/{claim.job_id}",
                result={"eval": {**METRICS, "kl_mean": 0.021}},
                artifacts=[],
            )
    loop = DeliveryLoop(sessions, settings)
    assert loop.step() == 1 and loop.step() == 0  # one registration; nothing left on the second round
    with transaction(sessions) as s:
        rows = s.scalars(select(Registration)).all()
        assert [(r.job_id, r.state, r.version) for r in rows] == [(ids[0.05], "succeeded", "1")]
        name = rows[0].name
    assert name == "SmolLM2-135M-Instruct-gptq-w8-g32"
    mv = mlflow_client.get_model_version_by_alias(name, CANDIDATE_ALIAS)
    assert mv.source == f"s3://artifacts/jobs/{ids[0.05]}" and mv.tags[JOB_TAG] == ids[0.05]
    assert mv.tags["quantfleet.owner"] == "alice" and mv.tags["quantfleet.metric.kl_mean"] == "0.021"
    assert _job_versions(mlflow_client, name, ids[0.0001]) == []
