"""Fleet endpoints over a real database: schedules (CRUD, pause/resume, next_fire_at), batches (matrix
submission and aggregation), the artifact index with its filters, webhooks CRUD and their URL policy,
and /metrics. Jobs are finished through the real lease functions, as a worker would."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from orchestrator.db import transaction
from orchestrator.queue.leases import RetryPolicy, claim_jobs, fail_attempt, succeed_attempt
from orchestrator.queue.models import Job, Webhook, WebhookDelivery
from orchestrator.settings import Settings
from tests.orchestrator.support import sessions_for


@pytest.fixture
def template(tiny_assets: dict[str, Path]) -> dict[str, Any]:
    return {
        "calibration": {"uri": str(tiny_assets["calibration"]), "num_samples": 8, "seq_len": 64},
        "eval": {"uri": str(tiny_assets["eval"]), "seq_len": 64},
        "gate": {"max_delta_ppl_pct": 5.0},
        "labels": {"team": "nlp"},
    }


def finish_all(
    settings: Settings, delta_by_bits: dict[int, float], fail_method: str | None = None
) -> dict[str, int]:
    """Claim every queued job and end it as a worker would: succeeded with an eval report (Δppl by bits)
    and artifacts, or failed for `fail_method` at 4 bits. Returns job id → attempt."""
    sessions = sessions_for(settings.database_url)
    with transaction(sessions) as s:
        claims = claim_jobs(s, owner="worker-1", limit=100, lease_seconds=60)
    for claim in claims:
        spec = claim.spec
        with transaction(sessions) as s:
            if spec["method"] == fail_method and spec["bits"] == 4:
                fail_attempt(
                    s,
                    claim.job_id,
                    claim.attempt,
                    error="CUDA out of memory",
                    retryable=False,
                    policy=RetryPolicy(),
                )
                continue
            delta = delta_by_bits[spec["bits"]]
            weights = f"{claim.job_id}-weights".encode()
            prefix = f"s3://artifacts/jobs/{claim.job_id}"
            succeed_attempt(
                s,
                claim.job_id,
                claim.attempt,
                result={
                    "method": spec["method"],
                    "bits": spec["bits"],
                    "bytes_quantized": 1000 * spec["bits"],
                    "eval": {
                        "ppl_original": 10.0,
                        "ppl_quantized": 10.0 * (1 + delta / 100),
                        "delta_ppl_pct": delta,
                        "kl_mean": delta / 100,
                        "kl_p99": delta / 10,
                        "top1_agreement": 0.9,
                        "tokens": 640,
                        "windows": 10,
                        "seq_len": 64,
                    },
                },
                output_uri=prefix,
                artifacts=[
                    {
                        "path": "model.safetensors",
                        "uri": f"{prefix}/model.safetensors",
                        "kind": "weights",
                        "sha256": hashlib.sha256(weights).hexdigest(),
                        "bytes": len(weights),
                    },
                    {
                        "path": "manifest.json",
                        "uri": f"{prefix}/manifest.json",
                        "kind": "manifest",
                        "sha256": "0" * 64,
                        "bytes": 10,
                    },
                ],
            )
    return {c.job_id: c.attempt for c in claims}


# --- batches and the artifact index ----------------------------------------------------------------------

MATRIX = {"method": ["gptq", "awq"], "bits": [4, 8], "group_size": [32, 64]}


def test_batch_aggregates_its_jobs(
    client: TestClient, keys: dict, settings: Settings, template: dict, tiny_assets: dict
) -> None:
    body = {"name": "sweep", "template": template, "matrix": {"model": [str(tiny_assets["model"])], **MATRIX}}
    r = client.post("/v1/batches", json=body, headers=keys["alice"])
    assert r.status_code == 202, r.text
    batch = r.json()
    assert batch["total"] == 8 and batch["counts"]["queued"] == 8 and not batch["done"]
    assert r.headers["Location"] == batch["url"]
    cells = {(j["method"], j["bits"], j["group_size"]) for j in batch["jobs"]}
    assert cells == {(m, b, g) for m in ("gptq", "awq") for b in (4, 8) for g in (32, 64)}
    job = client.get(batch["jobs"][0]["url"], headers=keys["alice"]).json()
    assert job["batch_id"] == batch["id"] and job["labels"]["matrix.method"] in ("gptq", "awq")
    assert job["labels"]["team"] == "nlp" and job["labels"]["matrix.model"] == "tiny-llama"

    finish_all(settings, {4: 8.0, 8: 0.5}, fail_method="awq")
    done = client.get(f"/v1/batches/{batch['id']}", headers=keys["reader"]).json()
    assert done["done"] and done["counts"]["succeeded"] == 6 and done["counts"]["failed"] == 2
    rows = {(j["method"], j["bits"], j["group_size"]): j for j in done["jobs"]}
    assert rows[("gptq", 8, 32)]["delta_ppl_pct"] == 0.5 and rows[("gptq", 8, 32)]["gate_passed"] is True
    assert rows[("gptq", 4, 64)]["gate_passed"] is False and rows[("gptq", 4, 64)]["bytes_quantized"] == 4000
    assert rows[("awq", 4, 32)]["state"] == "failed" and rows[("awq", 4, 32)]["error"] == "CUDA out of memory"
    assert client.get(f"/v1/batches/{batch['id']}", headers=keys["bob"]).status_code == 404
    assert client.get(f"/v1/batches/{batch['id']}", headers=keys["admin"]).status_code == 200
    assert [b["id"] for b in client.get("/v1/batches", headers=keys["alice"]).json()["batches"]] == [
        batch["id"]
    ]
    assert client.get("/v1/batches", headers=keys["bob"]).json()["batches"] == []


def test_artifact_index_filters(
    client: TestClient, keys: dict, settings: Settings, template: dict, tiny_assets: dict
) -> None:
    body = {"template": template, "matrix": {"model": [str(tiny_assets["model"])], **MATRIX}}
    assert client.post("/v1/batches", json=body, headers=keys["alice"]).status_code == 202
    single = {
        **template,
        "model": str(tiny_assets["model_1layer"]),
        "method": "rtn",
        "bits": 8,
        "group_size": 32,
    }
    del single["gate"]
    assert client.post("/v1/jobs", json=single, headers=keys["bob"]).status_code == 202
    finish_all(settings, {4: 8.0, 8: 0.5}, fail_method="awq")

    def listed(headers: dict, **params: Any) -> list[tuple[str, int, int, Any]]:
        r = client.get("/v1/artifacts", params=params, headers=headers)
        assert r.status_code == 200, r.text
        gate = lambda a: None if a["gate"] is None else a["gate"]["passed"]  # noqa: E731
        return sorted((a["method"], a["bits"], a["group_size"], gate(a)) for a in r.json()["artifacts"])

    assert listed(keys["alice"], method="gptq", bits=8, gate="passed") == [
        ("gptq", 8, 32, True),
        ("gptq", 8, 64, True),
    ]
    assert listed(keys["alice"], gate="failed") == [("gptq", 4, 32, False), ("gptq", 4, 64, False)]
    assert listed(keys["alice"], method="awq") == [
        ("awq", 8, 32, True),
        ("awq", 8, 64, True),
    ]  # failed jobs: none
    assert len(listed(keys["alice"], model="tiny-llama")) == 6 and listed(keys["alice"], model="other") == []
    assert len(listed(keys["alice"], model=str(tiny_assets["model"]))) == 6
    assert listed(keys["bob"]) == [("rtn", 8, 32, None)] == listed(keys["bob"], gate="none")
    assert len(listed(keys["admin"])) == 7
    one = client.get(
        "/v1/artifacts", params={"method": "gptq", "bits": 8, "group_size": 64}, headers=keys["alice"]
    ).json()["artifacts"][0]
    assert one["manifest_uri"] == f"s3://artifacts/jobs/{one['job_id']}/manifest.json"
    weights = next(f for f in one["files"] if f["kind"] == "weights")
    assert weights["sha256"] == hashlib.sha256(f"{one['job_id']}-weights".encode()).hexdigest()
    assert one["metrics"]["delta_ppl_pct"] == 0.5 and one["gate"]["checks"][0]["value"] == 0.5
    page = client.get("/v1/artifacts", params={"limit": 4}, headers=keys["alice"]).json()
    rest = client.get(
        "/v1/artifacts", params={"limit": 4, "cursor": page["next_cursor"]}, headers=keys["alice"]
    ).json()
    assert len(page["artifacts"]) == 4 and len(rest["artifacts"]) == 2 and rest["next_cursor"] is None
    assert client.get("/v1/artifacts", params={"gate": "maybe"}, headers=keys["alice"]).status_code == 422


def test_bad_matrices_name_the_cell(
    client: TestClient, keys: dict, template: dict, tiny_assets: dict
) -> None:
    model = str(tiny_assets["model"])
    bad_group = {
        "template": template,
        "matrix": {"model": [model], "method": ["gptq"], "group_size": [32, 128]},
    }
    r = client.post("/v1/batches", json=bad_group, headers=keys["alice"])
    assert r.status_code == 422 and r.json()["detail"].startswith(
        f"job model={model} method=gptq group_size=128:"
    )
    huge = {
        "template": template,
        "matrix": {
            "model": [model],
            "method": ["gptq", "awq", "rtn"],
            "bits": [2, 3, 4, 8],
            "group_size": [32, 64, -1, 128],
            "nothing": [1],
        },
    }
    assert (
        "'nothing' is not supported"
        in client.post("/v1/batches", json=huge, headers=keys["alice"]).json()["detail"]
    )
    del huge["matrix"]["nothing"]
    huge["matrix"]["model"] = [model, str(tiny_assets["model_1layer"])]
    assert (
        "expands to 96 jobs" in client.post("/v1/batches", json=huge, headers=keys["alice"]).json()["detail"]
    )
    no_eval = {"template": {**template, "eval": None}, "matrix": {"model": [model], "method": ["rtn"]}}
    assert "add eval" in client.post("/v1/batches", json=no_eval, headers=keys["alice"]).json()["detail"]
    assert client.post("/v1/batches", json=bad_group, headers=keys["reader"]).status_code == 403


# --- schedules -------------------------------------------------------------------------------------------


def test_schedule_crud_pause_resume(
    client: TestClient, keys: dict, template: dict, tiny_assets: dict
) -> None:
    body = {
        "name": "nightly smol",
        "cron": "30 2 * * *",
        "tz": "Europe/Berlin",
        "missed_fire_policy": "run_once",
        "template": {**template, "group_size": 32},
        "matrix": {"model": [str(tiny_assets["model"])], "method": ["gptq", "awq"]},
    }
    r = client.post("/v1/schedules", json=body, headers=keys["alice"])
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["jobs_per_fire"] == 2 and not created["paused"] and created["recent_fires"] == []
    next_fire = datetime.fromisoformat(created["next_fire_at"].replace("Z", "+00:00"))
    assert next_fire > datetime.now(UTC) and next_fire.astimezone(UTC).minute == 30
    assert next_fire.astimezone(UTC).hour in (0, 1)  # 02:30 in Berlin is 00:30 or 01:30 UTC
    url = f"/v1/schedules/{created['id']}"
    assert client.get(url, headers=keys["bob"]).status_code == 404
    assert [s["id"] for s in client.get("/v1/schedules", headers=keys["alice"]).json()["schedules"]] == [
        created["id"]
    ]

    paused = client.post(f"{url}/pause", headers=keys["alice"]).json()
    assert paused["paused"] and paused["next_fire_at"] is None
    resumed = client.post(f"{url}/resume", headers=keys["alice"]).json()
    assert not resumed["paused"] and resumed["next_fire_at"] == created["next_fire_at"]

    changed = client.patch(url, json={"cron": "0 * * * *", "tz": "UTC"}, headers=keys["alice"]).json()
    assert changed["cron"] == "0 * * * *" and changed["next_fire_at"].endswith(("00:00Z", "00:00"))
    one = {"matrix": {"model": [str(tiny_assets["model"])], "method": ["rtn"]}}
    assert client.patch(url, json=one, headers=keys["alice"]).json()["jobs_per_fire"] == 1
    assert client.delete(url, headers=keys["bob"]).status_code == 404
    assert client.delete(url, headers=keys["alice"]).status_code == 204
    assert client.get(url, headers=keys["alice"]).status_code == 404


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"cron": "61 * * * *"}, "not a valid expression"),
        ({"cron": "* * * *"}, "has 4 fields"),
        ({"tz": "Mars/Olympus"}, "unknown time zone"),
        ({"missed_fire_policy": "all"}, "missed_fire_policy"),
        ({"matrix": {"bits": []}}, "axis 'bits' is empty"),
        ({"matrix": {"bits": [4, 5]}}, "job bits=5:"),
    ],
)
def test_bad_schedules_say_what_to_fix(
    client: TestClient, keys: dict, template: dict, tiny_assets: dict, change: dict, words: str
) -> None:
    job = {**template, "model": str(tiny_assets["model"]), "method": "gptq", "group_size": 32}
    body = {"name": "n", "cron": "0 2 * * *", "template": job, **change}
    r = client.post("/v1/schedules", json=body, headers=keys["alice"])
    assert r.status_code == 422 and words in r.text


# --- webhooks and metrics --------------------------------------------------------------------------------


def test_webhook_crud_and_url_policy(client: TestClient, keys: dict, settings: Settings) -> None:
    r = client.post(
        "/v1/webhooks",
        json={"url": "https://93.184.215.14/hooks", "events": ["job.gate_failed"]},
        headers=keys["alice"],
    )
    assert r.status_code == 201, r.text
    hook = r.json()
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["job.gate_failed"]
    shown = client.get(f"/v1/webhooks/{hook['id']}", headers=keys["alice"]).json()
    assert shown["secret"] is None and shown["url"] == "https://93.184.215.14/hooks"
    with transaction(sessions_for(settings.database_url)) as s:
        stored = s.scalars(select(Webhook)).one()
        assert stored.secret == hook["secret"] and stored.owner == "alice"
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=keys["bob"]).status_code == 404
    off = client.patch(
        f"/v1/webhooks/{hook['id']}",
        json={"active": False, "events": ["job.failed", "job.succeeded"]},
        headers=keys["alice"],
    ).json()
    assert off["active"] is False and off["events"] == ["job.succeeded", "job.failed"]
    assert client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=keys["alice"]).json() == {
        "deliveries": []
    }
    for url, words in [
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://127.0.0.1:9000/x", "loopback"),
        ("ftp://registry/x", "http:// or https://"),
    ]:
        bad = client.post("/v1/webhooks", json={"url": url}, headers=keys["alice"])
        assert bad.status_code == 422 and words in bad.json()["detail"]
    assert (
        client.post(
            "/v1/webhooks", json={"url": "https://93.184.215.14/x", "events": ["job.done"]}, headers=keys["alice"]
        ).status_code
        == 422
    )
    assert (
        client.post(
            "/v1/webhooks", json={"url": "https://93.184.215.14/x", "all_owners": True}, headers=keys["alice"]
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/v1/webhooks", json={"url": "https://93.184.215.14/x", "all_owners": True}, headers=keys["admin"]
        ).status_code
        == 201
    )
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=keys["alice"]).status_code == 204
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=keys["alice"]).status_code == 404


def test_finished_jobs_queue_signed_deliveries_for_subscribers(
    client: TestClient, keys: dict, settings: Settings, template: dict, tiny_assets: dict
) -> None:
    for headers, events in (
        (keys["alice"], ["job.succeeded", "job.gate_failed"]),
        (keys["bob"], ["job.succeeded"]),
    ):
        assert (
            client.post(
                "/v1/webhooks", json={"url": "https://93.184.215.14/h", "events": events}, headers=headers
            ).status_code
            == 201
        )
    body = {
        "template": template,
        "matrix": {
            "model": [str(tiny_assets["model"])],
            "method": ["gptq"],
            "bits": [4, 8],
            "group_size": [32],
        },
    }
    assert client.post("/v1/batches", json=body, headers=keys["alice"]).status_code == 202
    finish_all(settings, {4: 8.0, 8: 0.5})
    with transaction(sessions_for(settings.database_url)) as s:
        rows = s.execute(
            select(WebhookDelivery.event, Job.spec, WebhookDelivery.state).join(
                Job, Job.id == WebhookDelivery.job_id
            )
        ).all()
    got = sorted((event, spec["bits"], state) for event, spec, state in rows)
    # alice's two jobs succeeded; the 4-bit one failed its gate. bob's webhook sees none of alice's jobs.
    assert got == [
        ("job.gate_failed", 4, "pending"),
        ("job.succeeded", 4, "pending"),
        ("job.succeeded", 8, "pending"),
    ]


def test_metrics_show_queue_depth_by_state(
    client: TestClient, keys: dict, settings: Settings, template: dict, tiny_assets: dict
) -> None:
    matrix = {"model": [str(tiny_assets["model"])], "method": ["gptq", "awq"], "group_size": [32]}
    body = {"template": template, "matrix": matrix}
    assert client.post("/v1/batches", json=body, headers=keys["alice"]).status_code == 202
    assert client.post("/v1/batches", json=body, headers=keys["bob"]).status_code == 202
    finish_all(settings, {4: 1.0}, fail_method="awq")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, s.labels.get("state")): s.value
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
    }
    assert samples[("quantfleet_jobs", "succeeded")] == 2 and samples[("quantfleet_jobs", "failed")] == 2
    assert samples[("quantfleet_jobs", "queued")] == 0 and samples[("quantfleet_queue_depth_up", None)] == 1


def test_batch_and_scheduled_jobs_store_their_plans(
    client: TestClient, keys: dict, settings: Settings, template: dict, tiny_assets: dict
) -> None:
    """Jobs made by a batch, and by a schedule when it fires (planned at fire time), carry the same
    preflight plan as a job submitted alone."""
    from datetime import timedelta

    from orchestrator.fleet.scheduler import Scheduler

    body = {"template": {**template, "method": "gptq", "group_size": 32},
            "matrix": {"model": [str(tiny_assets["model"])], "bits": [4, 8]}}
    r = client.post("/v1/batches", json=body, headers=keys["alice"])
    assert r.status_code == 202, r.text
    batch = r.json()
    plans = {}
    for row in batch["jobs"]:
        plans[row["bits"]] = client.get(row["url"], headers=keys["alice"]).json()["plan"]
    assert {b: p["bits"] for b, p in plans.items()} == {4: 4, 8: 8}
    assert plans[4]["architecture"] == "LlamaForCausalLM" and plans[4]["quantized_count"] == 14
    alone = {**template, "model": str(tiny_assets["model"]), "method": "gptq", "group_size": 32, "bits": 4}
    single = client.post("/v1/jobs", json=alone, headers=keys["alice"]).json()
    assert single["plan"] == plans[4]

    r = client.post("/v1/schedules", json={"name": "nightly", "cron": "0 3 * * *", "tz": "UTC", **body},
                    headers=keys["alice"])
    assert r.status_code == 201, r.text
    schedule = r.json()
    due = datetime.fromisoformat(schedule["next_fire_at"].replace("Z", "+00:00")) + timedelta(seconds=1)
    fired = Scheduler(sessions_for(settings.database_url), settings).step(due)
    assert len(fired) == 1 and len(fired[0].job_ids) == 2
    for job_id in fired[0].job_ids:
        plan = client.get(f"/v1/jobs/{job_id}", headers=keys["alice"]).json()["plan"]
        assert plan == plans[plan["bits"]]
