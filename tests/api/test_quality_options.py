"""The engine's quality options over the API: defaults stored on the job, auto's candidates checked at submit."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from orchestrator.settings import Settings
from tests.api.test_jobs_api import job_rows


def test_defaults_are_stored_and_auto_is_accepted(client: TestClient, keys: dict, job_body: dict) -> None:
    r = client.post("/v1/jobs", json=job_body, headers=keys["alice"])
    assert r.status_code == 202, r.text
    spec = client.get(f"/v1/jobs/{r.json()['id']}", headers=keys["alice"]).json()["spec"]
    assert spec["act_order"] is True and spec["observer"] == "mse"
    body: dict[str, Any] = {**job_body, "method": "auto", "auto_candidates": ["gptq", "gptq:mse", "awq-gptq"],
                            "auto_budget_s": 600}
    r = client.post("/v1/jobs", json=body, headers=keys["alice"])
    assert r.status_code == 202, r.text


def test_bad_quality_options_are_a_422_naming_the_fix(
    client: TestClient, keys: dict, job_body: dict, settings: Settings
) -> None:
    cases = [
        ({"method": "auto", "auto_candidates": ["gptq:l1"]}, "observer 'l1' is not one of"),
        ({"method": "auto", "auto_candidates": ["squeeze"]}, "method 'squeeze' is not one of"),
        ({"method": "auto", "auto_candidates": []}, "auto_candidates"),
        ({"method": "auto", "auto_budget_s": 0}, "auto_budget_s"),
        ({"observer": "l1"}, "observer"),
    ]
    for change, message in cases:
        r = client.post("/v1/jobs", json={**job_body, **change}, headers=keys["alice"])
        assert r.status_code == 422, (change, r.text)
        assert message in str(r.json()["detail"]), (change, r.json())
    assert job_rows(settings) == 0
