"""Every list and number a request carries has a bound: repeated output formats are written once, huge
lists and out-of-range seeds are a 422 naming the field, and a listing stays small."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_jobs_api import job_rows


def test_repeated_formats_are_written_once(client: TestClient, keys: dict, job_body: dict) -> None:
    body = {**job_body, "output": {"formats": ["gptq", "gptq"]}}
    r = client.post("/v1/jobs", json=body, headers=keys["alice"])
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["output"]["formats"] == ["gptq"]
    both = {**job_body, "output": {"formats": ["gptq", "compressed-tensors"]}}
    assert client.post("/v1/jobs", json=both, headers=keys["alice"]).json()["spec"]["output"]["formats"] == [
        "gptq",
        "compressed-tensors",
    ]


def test_the_largest_seed_is_accepted(client: TestClient, keys: dict, job_body: dict) -> None:
    body = {**job_body, "calibration": {**job_body["calibration"], "seed": 2**63 - 1}}
    assert client.post("/v1/jobs", json=body, headers=keys["alice"]).status_code == 202


TEMPLATE_AXES = {"model": ["/m"], "method": ["rtn"]}
CASES: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("formats x300", "POST", "/v1/jobs", {"output": {"formats": ["gptq"] * 300}}, "output.formats"),
    (
        "formats x100000",
        "POST",
        "/v1/jobs",
        {"output": {"formats": ["compressed-tensors"] * 100_000}},
        "output.formats",
    ),
    ("seed 2**200", "POST", "/v1/jobs", {"calibration": {"uri": "/c", "seed": 2**200}}, "calibration.seed"),
    ("seed 2**63", "POST", "/v1/jobs", {"calibration": {"uri": "/c", "seed": 2**63}}, "calibration.seed"),
    ("seed -1", "POST", "/v1/jobs", {"calibration": {"uri": "/c", "seed": -1}}, "calibration.seed"),
    (
        "max_windows 2**40",
        "POST",
        "/v1/jobs",
        {"eval": {"uri": "/e", "max_windows": 2**40}},
        "eval.max_windows",
    ),
    ("33 labels", "POST", "/v1/jobs", {"labels": {f"k{i}": "v" for i in range(33)}}, "labels"),
    ("label value 256", "POST", "/v1/jobs", {"labels": {"k": "v" * 256}}, "labels"),
    ("model 5000 chars", "POST", "/v1/jobs", {"model": "/" + "m" * 5000}, "model"),
    ("output uri 2000 chars", "POST", "/v1/jobs", {"output": {"uri": "/" + "o" * 2000}}, "output.uri"),
    (
        "batch axis x5000",
        "POST",
        "/v1/batches",
        {"template": {}, "matrix": {**TEMPLATE_AXES, "bits": [4] * 5000}},
        "matrix",
    ),
    (
        "batch template x100 fields",
        "POST",
        "/v1/batches",
        {"template": {f"f{i}": i for i in range(100)}, "matrix": TEMPLATE_AXES},
        "template",
    ),
    (
        "schedule matrix x20 axes",
        "POST",
        "/v1/schedules",
        {"name": "n", "cron": "@daily", "template": {}, "matrix": {f"a{i}": [1] for i in range(20)}},
        "matrix",
    ),
    (
        "webhook events x1000",
        "POST",
        "/v1/webhooks",
        {"url": "https://93.184.215.14/h", "events": ["job.failed"] * 1000},
        "events",
    ),
    (
        "webhook event name 1000 chars",
        "POST",
        "/v1/webhooks",
        {"url": "https://93.184.215.14/h", "events": ["j" * 1000]},
        "events",
    ),
]


@pytest.mark.parametrize(
    ("method", "url", "changes", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_oversize_requests_are_a_422_naming_the_field(
    client: TestClient,
    keys: dict,
    job_body: dict,
    settings: Any,
    method: str,
    url: str,
    changes: dict,
    words: str,
) -> None:
    body = {**job_body, **changes} if url == "/v1/jobs" else changes
    r = client.request(method, url, json=body, headers=keys["alice"])
    assert r.status_code == 422, r.text[:500]
    assert words in r.json()["detail"], r.json()["detail"][:500]
    assert job_rows(settings) == 0


QUERIES = [
    ("100 label filters", "/v1/jobs", [("label", f"k{i}=v") for i in range(100)], "label"),
    ("label filter 1000 chars", "/v1/jobs", [("label", "k=" + "v" * 1000)], "label"),
    ("100 state filters", "/v1/jobs", [("state", "queued")] * 100, "state"),
    ("cursor 10000 chars", "/v1/jobs", [("cursor", "A" * 10_000)], "cursor"),
    ("artifact model 10000 chars", "/v1/artifacts", [("model", "m" * 10_000)], "model"),
    ("artifact cursor 10000 chars", "/v1/artifacts", [("cursor", "A" * 10_000)], "cursor"),
]


@pytest.mark.parametrize(("url", "params", "words"), [q[1:] for q in QUERIES], ids=[q[0] for q in QUERIES])
def test_oversize_queries_are_a_422_naming_the_parameter(
    client: TestClient, keys: dict, url: str, params: list[tuple[str, str]], words: str
) -> None:
    r = client.get(url, params=params, headers=keys["alice"])
    assert r.status_code == 422, r.text[:500]
    assert words in r.json()["detail"]
