"""The /v1 API over a real database: submission, idempotency, auth, listing, cancellation, bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from orchestrator.db import transaction
from orchestrator.queue.models import Job, JobEvent
from orchestrator.settings import Settings
from tests.orchestrator.support import sessions_for


def job_rows(settings: Settings) -> int:
    with transaction(sessions_for(settings.database_url)) as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def test_submit_read_and_list(client: TestClient, keys: dict, job_body: dict, settings: Settings) -> None:
    r = client.post("/v1/jobs", json=job_body, headers=keys["alice"])
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["owner"] == "alice" and job["attempts"] == 0
    assert r.headers["Location"] == job["url"] and job["url"].endswith(f"/v1/jobs/{job['id']}")
    assert job["spec"]["bits"] == 4 and job["spec"]["symmetric"] is True  # defaults filled in
    assert job["labels"] == {"team": "nlp"}
    got = client.get(f"/v1/jobs/{job['id']}", headers=keys["reader"]).json()
    assert got["id"] == job["id"] and got["progress"] is None and got["metrics"] is None
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=keys["alice"]).json()
    assert [(e["kind"], e["state"]) for e in events] == [("state", "queued")]
    assert client.get(f"/v1/jobs/{job['id']}/artifacts", headers=keys["alice"]).json() == []
    assert job_rows(settings) == 1


def test_idempotency_key(client: TestClient, keys: dict, job_body: dict, settings: Settings) -> None:
    headers = {**keys["alice"], "Idempotency-Key": "nightly-2026-11-23"}
    first = client.post("/v1/jobs", json=job_body, headers=headers)
    again = client.post("/v1/jobs", json=job_body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    changed = client.post("/v1/jobs", json={**job_body, "bits": 8}, headers=headers)
    assert changed.status_code == 422
    assert "already used" in changed.json()["detail"] and first.json()["id"] in changed.json()["detail"]
    # keys are per owner: bob may use the same key string for his own job
    bob = client.post(
        "/v1/jobs", json=job_body, headers={**keys["bob"], "Idempotency-Key": "nightly-2026-11-23"}
    )
    assert bob.status_code == 202 and bob.json()["id"] != first.json()["id"]
    assert job_rows(settings) == 2


def test_authentication_and_ownership(client: TestClient, keys: dict, job_body: dict) -> None:
    missing = client.post("/v1/jobs", json=job_body)
    assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    bad = client.get("/v1/jobs", headers={"Authorization": "Bearer qf_0000_nope"})
    assert bad.status_code == 401 and "invalid" in bad.json()["detail"]
    tampered = keys["alice"]["Authorization"][:-2] + "xx"
    assert client.get("/v1/jobs", headers={"Authorization": tampered}).status_code == 401
    read_only = client.post("/v1/jobs", json=job_body, headers=keys["reader"])
    assert read_only.status_code == 403 and "'submit' scope" in read_only.json()["detail"]

    alice_job = client.post("/v1/jobs", json=job_body, headers=keys["alice"]).json()["id"]
    bob_job = client.post("/v1/jobs", json=job_body, headers=keys["bob"]).json()["id"]
    for path in ("", "/events", "/artifacts"):
        other = client.get(f"/v1/jobs/{alice_job}{path}", headers=keys["bob"])
        assert other.status_code == 404 and alice_job in other.json()["detail"]
    assert client.post(f"/v1/jobs/{alice_job}/cancel", headers=keys["bob"]).status_code == 404
    assert [j["id"] for j in client.get("/v1/jobs", headers=keys["bob"]).json()["jobs"]] == [bob_job]
    everyone = {j["id"] for j in client.get("/v1/jobs", headers=keys["admin"]).json()["jobs"]}
    assert everyone == {alice_job, bob_job}
    assert client.get(f"/v1/jobs/{bob_job}", headers=keys["admin"]).status_code == 200


def test_list_filters_and_cursor_pagination(client: TestClient, keys: dict, job_body: dict) -> None:
    ids = []
    for i in range(5):
        body = {**job_body, "labels": {"team": "nlp" if i % 2 == 0 else "vision", "run": str(i)}}
        ids.append(client.post("/v1/jobs", json=body, headers=keys["alice"]).json()["id"])
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=keys["alice"])
    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=keys["alice"]
        )
        assert page.status_code == 200
        seen += [j["id"] for j in page.json()["jobs"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]  # newest first, each once
    nlp = client.get("/v1/jobs", params={"label": "team=nlp"}, headers=keys["alice"]).json()["jobs"]
    assert {j["id"] for j in nlp} == {ids[0], ids[2], ids[4]}
    both = client.get(
        "/v1/jobs", params=[("label", "team=nlp"), ("label", "run=2")], headers=keys["alice"]
    ).json()
    assert [j["id"] for j in both["jobs"]] == [ids[2]]
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}, headers=keys["alice"]).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    queued = client.get("/v1/jobs", params=[("state", "queued"), ("state", "running")], headers=keys["alice"])
    assert len(queued.json()["jobs"]) == 4
    assert client.get("/v1/jobs", params={"state": "sleeping"}, headers=keys["alice"]).status_code == 422
    assert client.get("/v1/jobs", params={"label": "team"}, headers=keys["alice"]).status_code == 422
    bad_cursor = client.get("/v1/jobs", params={"cursor": "garbage"}, headers=keys["alice"])
    assert bad_cursor.status_code == 422 and "cursor" in bad_cursor.json()["detail"]


def test_cancel_a_queued_job(client: TestClient, keys: dict, job_body: dict) -> None:
    job_id = client.post("/v1/jobs", json=job_body, headers=keys["alice"]).json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["alice"])
    assert r.status_code == 202 and r.json()["state"] == "cancelled" and r.json()["finished_at"]
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["alice"])
    assert again.json()["state"] == "cancelled"
    events = client.get(f"/v1/jobs/{job_id}/events", headers=keys["alice"]).json()
    assert [e["state"] for e in events] == ["queued", "cancelled"]


def _mutate(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    *parents, leaf = path.split(".")
    target = body
    for p in parents:
        target = target.setdefault(p, {})
    if value is DELETE:
        del target[leaf]
    else:
        target[leaf] = value
    return body


DELETE = object()
BAD_INPUTS = [
    ("method", "squeezellm", "method: Input should be 'gptq', 'awq', 'rtn', 'awq-gptq' or 'auto'"),
    ("bits", 5, "bits=5 is not supported; choose one of [2, 3, 4, 8]"),
    ("bits", "four", "bits: Input should be a valid integer"),
    ("group_size", 48, "group_size=48 is not supported"),
    ("group_size", 128, "128"),  # the tiny model's hidden size is 64: the model check rejects it
    ("calibration.num_samples", 0, "num_samples=0 must be between 1 and 4096"),
    ("calibration", DELETE, "method gptq needs calibration data"),
    ("model", "/nonexistent/model", "outside the allowed roots"),
    ("model", "http://169.254.169.254/latest/meta-data/", "scheme 'http', which is not allowed"),
    ("model", "file:///etc", "outside the allowed roots"),
    ("model", "s3://someone-elses-bucket/model", "bucket 'someone-elses-bucket' is not allowed"),
    ("model", "relative/model", "is relative"),
    ("calibration.uri", "/etc/passwd", "outside the allowed roots"),
    ("eval.uri", "ftp://example.com/eval.txt", "scheme 'ftp'"),
    ("output.uri", "s3://someone-elses-bucket/out", "bucket 'someone-elses-bucket' is not allowed"),
    ("output.formats", ["gguf"], "output.formats.0: Input should be 'compressed-tensors', 'gptq', 'gguf:Q4_0'"),
    ("surprise", 1, "surprise: Extra inputs are not permitted"),
    ("labels", {"Bad Key": "x"}, "label key 'Bad Key'"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD_INPUTS, ids=[f"{p}={v!r}"[:40] for p, v, _ in BAD_INPUTS]
)
def test_bad_input_is_a_422_with_a_clear_message_and_no_row(
    client: TestClient, keys: dict, job_body: dict, settings: Settings, path: str, value: Any, message: str
) -> None:
    r = client.post("/v1/jobs", json=_mutate(job_body, path, value), headers=keys["alice"])
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert job_rows(settings) == 0


def test_unknown_model_path_inside_allowed_root(
    client: TestClient, keys: dict, job_body: dict, settings: Settings, allowed_root: Path
) -> None:
    r = client.post(
        "/v1/jobs", json={**job_body, "model": str(allowed_root / "no-such-model")}, headers=keys["alice"]
    )
    assert r.status_code == 422 and "not a model directory" in r.json()["detail"]
    assert job_rows(settings) == 0


def test_malformed_json_is_a_400(client: TestClient, keys: dict, settings: Settings) -> None:
    r = client.post(
        "/v1/jobs",
        content=b'{"model": "/x", "method": ',
        headers={**keys["alice"], "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    assert job_rows(settings) == 0


def test_per_owner_limit_on_active_jobs(
    client: TestClient, keys: dict, job_body: dict, settings: Settings
) -> None:
    for _ in range(settings.max_active_jobs_per_owner):
        assert client.post("/v1/jobs", json=job_body, headers=keys["alice"]).status_code == 202
    r = client.post("/v1/jobs", json=job_body, headers=keys["alice"])
    assert r.status_code == 429 and "wait for some to finish" in r.json()["detail"]
    assert client.post("/v1/jobs", json=job_body, headers=keys["bob"]).status_code == 202


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["migrations"] == "0004"


def test_not_ready_before_migrations(tmp_path: Path, allowed_root: Path) -> None:
    from api.main import create_app

    app = create_app(
        Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}", allowed_roots=[allowed_root])
    )
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and "quantfleet migrate" in r.json()["migrations"]


def test_no_auth_mode_acts_as_local_admin(settings: Settings, job_body: dict) -> None:
    from api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"no_auth": True}))) as c:
        r = c.post("/v1/jobs", json=job_body)
        assert r.status_code == 202 and r.json()["owner"] == "local"


def test_events_are_recorded_per_transition(
    client: TestClient, keys: dict, job_body: dict, settings: Settings
) -> None:
    job_id = client.post("/v1/jobs", json=job_body, headers=keys["alice"]).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["alice"])
    with transaction(sessions_for(settings.database_url)) as s:
        kinds = s.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id)).all()
    assert kinds == ["state", "state"]


def test_openapi_documents_the_v1_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events"} <= set(
        spec["paths"]
    )
    create = spec["components"]["schemas"]["JobCreate"]
    assert create["examples"][0]["method"] == "gptq"
    assert "Quantization algorithm" in create["properties"]["method"]["description"]
