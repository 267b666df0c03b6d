"""W8A8 int8 (SmoothQuant), mixed precision and FP8 KV-cache scales over the API (issue 12, items 1-3 and 5):
accepted and stored, turned into the engine's JobSpec, and bad combinations a 422 at submit naming the fix."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.queue.specs import engine_spec
from orchestrator.settings import Settings
from tests.api.test_jobs_api import job_rows
from workers.spec import W8A8_INT8, MixedPrecisionSpec, QuantScheme


def _submit(client: TestClient, keys: dict, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/jobs", json=body, headers=keys["alice"])
    assert r.status_code == 202, r.text
    spec: dict[str, Any] = client.get(f"/v1/jobs/{r.json()['id']}", headers=keys["alice"]).json()["spec"]
    return spec


@pytest.mark.parametrize(("scheme", "alpha", "expected"), [
    ("w8a8-int8", None, None), ("w8a8-int8-smoothquant", None, 0.8), ("w8a8-int8-smoothquant", 0.5, 0.5),
])
def test_w8a8_schemes_are_stored_and_reach_the_engine(
    client: TestClient, keys: dict, job_body: dict, scheme: str, alpha: float | None, expected: float | None
) -> None:
    body = {k: v for k, v in job_body.items() if k not in ("bits", "group_size")}
    extra = {} if alpha is None else {"smoothquant_alpha": alpha}
    spec = _submit(client, keys, {**body, "scheme": scheme, **extra})
    assert (spec["scheme"], spec["bits"], spec["group_size"]) == (scheme, 8, -1)
    job = engine_spec(spec, lambda uri, kind, what: uri)
    assert job.scheme == W8A8_INT8 and job.smoothquant == expected


def test_mixed_precision_and_kv_cache_scales_reach_the_engine(client: TestClient, keys: dict, job_body: dict) -> None:
    rule = _submit(client, keys, {**job_body, "mixed_precision": {"edge_layers": 1, "patterns": ["down_proj"]},
                                  "kv_cache_fp8": True})
    job = engine_spec(rule, lambda uri, kind, what: uri)
    group = job.scheme.group_size
    assert job.mixed_precision == MixedPrecisionSpec(edge_layers=1, patterns=("down_proj",), high=QuantScheme(8, group))
    assert job.kv_cache_fp8
    target = _submit(client, keys, {**job_body, "mixed_precision": {"target_bits_per_weight": 4.5}})
    assert engine_spec(target, lambda uri, kind, what: uri).mixed_precision == MixedPrecisionSpec(target_bits_per_weight=4.5)
    kl = _submit(client, keys, {**job_body, "mixed_precision": {"target_kl": 0.02}})
    assert engine_spec(kl, lambda uri, kind, what: uri).mixed_precision == MixedPrecisionSpec(target_kl=0.02)


def test_bad_combinations_are_a_422_naming_the_fix(
    client: TestClient, keys: dict, job_body: dict, settings: Settings
) -> None:
    body = {k: v for k, v in job_body.items() if k not in ("bits", "group_size")}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"scheme": "w8a8-int8", "method": "awq"}, "solved by method gptq or rtn"),
        ({"scheme": "w8a8-int8", "bits": 4}, "has 8-bit symmetric int8 (W8A8) weights"),
        ({"scheme": "w8a8-int8", "smoothquant_alpha": 0.5}, "smoothquant_alpha belongs to scheme w8a8-int8-smoothquant"),
        ({"scheme": "w8a8-int8-smoothquant", "smoothquant_alpha": 2}, "less than or equal to 1"),
        ({"scheme": "w8a8-int8-smoothquant", "method": "rtn", "calibration": None}, "SmoothQuant's scales come from"),
        ({"scheme": "w8a8-int8", "output": {"formats": ["gptq"]}}, "written only as compressed-tensors"),
        ({"mixed_precision": {"edge_layers": 1, "target_bits_per_weight": 4.5}, "bits": 4, "group_size": 32}, "not both"),
        ({"mixed_precision": {}, "bits": 4, "group_size": 32}, "needs a rule"),
        ({"mixed_precision": {"target_bits_per_weight": 4.5, "target_kl": 0.02}, "bits": 4, "group_size": 32},
         "not both"),
        ({"mixed_precision": {"target_kl": 0}, "bits": 4, "group_size": 32}, "greater than 0"),
        ({"mixed_precision": {"target_bits_per_weight": 4.5}, "bits": 3, "group_size": 32}, "4- or 8-bit"),
        ({"kv_cache_fp8": True, "method": "rtn", "calibration": None, "bits": 4, "group_size": 32},
         "FP8 KV-cache scales are observed on calibration data"),
    ]
    for change, message in cases:
        r = client.post("/v1/jobs", json={**body, **change}, headers=keys["alice"])
        assert r.status_code == 422, (change, r.text)
        assert message in str(r.json()["detail"]), (change, r.json())
    assert job_rows(settings) == 0
