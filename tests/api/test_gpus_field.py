"""`gpus` in POST /v1/jobs (and batch templates): default 1, 1..16, stored in the spec, documented."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_jobs_api import job_rows


def test_gpus_defaults_to_one_and_is_stored(client: TestClient, keys: dict, job_body: dict) -> None:
    r = client.post("/v1/jobs", json=job_body, headers=keys["alice"])
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["gpus"] == 1
    r = client.post("/v1/jobs", json={**job_body, "gpus": 4}, headers=keys["alice"])
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["gpus"] == 4


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "gpus: Input should be greater than or equal to 1"),
        (17, "gpus: Input should be less than or equal to 16"),
        ("two", "gpus: Input should be a valid integer"),
        (1.5, "gpus: Input should be a valid integer"),
    ],
)
def test_gpus_outside_1_to_16_is_a_422_and_no_row(
    client: TestClient, keys: dict, job_body: dict, settings: Any, value: Any, message: str
) -> None:
    r = client.post("/v1/jobs", json={**job_body, "gpus": value}, headers=keys["alice"])
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert job_rows(settings) == 0


def test_a_batch_template_checks_gpus_per_cell(client: TestClient, keys: dict, job_body: dict) -> None:
    template = {**{k: v for k, v in job_body.items() if k != "bits"}, "gpus": 32}
    r = client.post(
        "/v1/batches",
        json={"template": template, "matrix": {"bits": [4, 8]}},
        headers=keys["alice"],
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "job bits=4: gpus: Input should be less than or equal to 16"


def test_openapi_documents_gpus(client: TestClient) -> None:
    gpus = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]["gpus"]
    assert (gpus["type"], gpus["default"], gpus["minimum"], gpus["maximum"]) == ("integer", 1, 1, 16)
    assert "calibration is split across them" in gpus["description"]
    assert "without GPUs only gpus=1 runs" in gpus["description"]
