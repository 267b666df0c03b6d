"""Output locations belong to one owner and one job: POST /v1/jobs refuses an output.uri in another owner's
folder or inside the service's object store (where every job's default jobs/<id>/ folder lives)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.settings import Settings
from tests.api.test_jobs_api import job_rows


@pytest.fixture
def settings(database_url: str, allowed_root: Path, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        object_store=str(tmp_path / "objects"),
        allowed_roots=[allowed_root],
        allowed_output_roots=[tmp_path / "exports"],
        allowed_buckets=["qf-allowed"],
        cache_dir=tmp_path / "cache",
        work_dir=tmp_path / "work",
        executor="thread",
    )


def _publish(folder: Path) -> dict[str, str]:
    """Stand-in for a finished job's artifacts: files in its folder, by sha256."""
    folder.mkdir(parents=True)
    for name, data in {"manifest.json": b'{"files": []}', "model.safetensors": b"\0" * 64}.items():
        (folder / name).write_bytes(data)
    return _digests(folder)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _with_output(body: dict[str, Any], uri: str) -> dict[str, Any]:
    return {**body, "output": {"uri": uri}}


def test_output_uri_naming_another_owners_job_folder_is_refused(
    client: TestClient, keys: dict, job_body: dict, settings: Settings, tmp_path: Path
) -> None:
    alice = client.post("/v1/jobs", json=job_body, headers=keys["alice"])
    assert alice.status_code == 202, alice.text
    store = Path(settings.object_store).resolve()
    alices_folder = store / "jobs" / alice.json()["id"]
    published = _publish(alices_folder)
    exports = (tmp_path / "exports").resolve()
    (exports / "alice" / "nightly").mkdir(parents=True)
    attacks = [
        (str(alices_folder), "inside the service's object store"),
        (f"file://{alices_folder}", "inside the service's object store"),
        (str(store), "inside the service's object store"),
        (str(store / "jobs"), "inside the service's object store"),
        (str(exports / "alice" / "nightly"), f"not inside your owner's folder {exports / 'bob'}"),
        (str(exports / "bob" / ".." / "alice"), f"not inside your owner's folder {exports / 'bob'}"),
        (str(exports), f"not inside your owner's folder {exports / 'bob'}"),
        ("s3://qf-allowed/alice/nightly", "not inside your owner's folder s3://qf-allowed/bob/"),
        ("s3://qf-allowed/team", "not inside your owner's folder s3://qf-allowed/bob/"),
    ]
    for uri, message in attacks:
        r = client.post("/v1/jobs", json=_with_output(job_body, uri), headers=keys["bob"])
        assert r.status_code == 422, (uri, r.text)
        detail = r.json()["detail"]
        assert message in detail and "omit output.uri" in detail, (uri, detail)
    assert job_rows(settings) == 1  # only alice's job
    assert _digests(alices_folder) == published


def test_output_uri_in_the_owners_own_folder_is_accepted(
    client: TestClient, keys: dict, job_body: dict, settings: Settings, tmp_path: Path
) -> None:
    exports = (tmp_path / "exports").resolve()
    for uri in (str(exports / "bob" / "nightly"), str(exports / "bob"), "s3://qf-allowed/bob/runs"):
        r = client.post("/v1/jobs", json=_with_output(job_body, uri), headers=keys["bob"])
        assert r.status_code == 202, (uri, r.text)
        assert r.json()["spec"]["output"]["uri"] == uri
    assert job_rows(settings) == 3
