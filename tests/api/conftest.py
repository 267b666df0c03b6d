"""API test fixtures: the real app on a real (migrated) database, and API keys for two owners."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from orchestrator.auth import create_api_key
from orchestrator.db import transaction
from orchestrator.settings import Settings
from tests.orchestrator.support import sessions_for


@pytest.fixture
def settings(database_url: str, allowed_root: Path, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        object_store=str(tmp_path / "objects"),
        allowed_roots=[allowed_root],
        allowed_buckets=["qf-allowed"],
        cache_dir=tmp_path / "cache",
        work_dir=tmp_path / "work",
        executor="thread",
        max_active_jobs_per_owner=20,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def keys(settings: Settings) -> dict[str, dict[str, str]]:
    """Authorization headers: alice (submit+read), bob (submit+read), reader (alice, read), admin."""
    sessions = sessions_for(settings.database_url)
    made = {}
    with transaction(sessions) as s:
        for name, owner, scopes in [
            ("alice", "alice", ["submit", "read"]),
            ("bob", "bob", ["submit", "read"]),
            ("reader", "alice", ["read"]),
            ("admin", "ops", ["admin"]),
        ]:
            made[name] = {"Authorization": f"Bearer {create_api_key(s, owner=owner, scopes=scopes)}"}
    return made


@pytest.fixture
def job_body(tiny_assets: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": str(tiny_assets["model"]),
        "method": "gptq",
        "bits": 4,
        "group_size": 32,
        "calibration": {"uri": str(tiny_assets["calibration"]), "num_samples": 8, "seq_len": 64},
        "eval": {"uri": str(tiny_assets["eval"]), "seq_len": 64},
        "labels": {"team": "nlp"},
    }
