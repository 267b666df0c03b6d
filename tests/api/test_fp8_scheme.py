"""FP8 schemes over the API (issue 12, item 1): `scheme` accepted and stored, bad combinations a 422 at submit
naming the fix (the engine's own validation runs there)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.queue.specs import engine_spec
from orchestrator.settings import Settings
from tests.api.test_jobs_api import job_rows
from workers.spec import FP8_PRESETS


@pytest.mark.parametrize(("scheme", "method"), [("fp8-dynamic", "rtn"), ("fp8-static", "rtn"), ("fp8-dynamic", "gptq")])
def test_fp8_scheme_is_accepted_and_stored_as_an_8_bit_grid(
    client: TestClient, keys: dict, job_body: dict, scheme: str, method: str
) -> None:
    body = {k: v for k, v in job_body.items() if k not in ("bits", "group_size")}
    r = client.post("/v1/jobs", json={**body, "method": method, "scheme": scheme}, headers=keys["alice"])
    assert r.status_code == 202, r.text
    spec = client.get(f"/v1/jobs/{r.json()['id']}", headers=keys["alice"]).json()["spec"]
    assert (spec["scheme"], spec["bits"], spec["group_size"]) == (scheme, 8, -1)
    engine = engine_spec(spec, lambda uri, kind, what: uri)
    assert engine.scheme == FP8_PRESETS[scheme] and engine.method.value == method


def test_bad_fp8_combinations_are_a_422_naming_the_fix(
    client: TestClient, keys: dict, job_body: dict, settings: Settings
) -> None:
    body = {k: v for k, v in job_body.items() if k not in ("bits", "group_size")}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"scheme": "fp8-dynamic", "method": "awq"}, "FP8 schemes are quantized by method rtn or gptq"),
        ({"scheme": "fp8-dynamic", "method": "rtn", "output": {"formats": ["compressed-tensors", "gptq"]}},
         "GPTQ v1 has no FP8 layout"),
        ({"scheme": "fp8-dynamic", "method": "rtn", "bits": 4}, "has 8-bit symmetric FP8 weights"),
        ({"scheme": "fp8-dynamic", "method": "rtn", "group_size": 32}, "drop bits, group_size"),
        ({"scheme": "fp8-static", "method": "rtn", "calibration": None}, "static FP8 activation scales are observed"),
        ({"scheme": "fp8-block", "method": "rtn"}, "divisible by 128"),  # the tiny model is 64 wide
        ({"scheme": "fp4", "method": "rtn"}, "scheme"),
    ]
    for change, message in cases:
        r = client.post("/v1/jobs", json={**body, **change}, headers=keys["alice"])
        assert r.status_code == 422, (change, r.text)
        assert message in str(r.json()["detail"]), (change, r.json())
    assert job_rows(settings) == 0


def test_openapi_documents_the_fp8_schemes(client: TestClient) -> None:
    scheme = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]["scheme"]
    assert "float-quantized" in scheme["description"] and "fp8-block" in str(scheme)
