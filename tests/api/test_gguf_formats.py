"""GGUF formats over the API (issue 12, items 4 and 5): `output.formats: ["gguf:Q4_K_M"]` accepted and stored,
beside compressed-tensors too (one calibration pass), and what GGUF cannot do a 422 at submit naming the fix (the
engine's own checks run there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from orchestrator.queue.specs import engine_spec
from orchestrator.settings import Settings
from tests.api.test_jobs_api import job_rows
from tests.workers.test_gguf_export import tiny_model
from workers.spec import OutputFormat


def _body(job_body: dict[str, Any], model: Path, formats: list[str]) -> dict[str, Any]:
    body = {k: v for k, v in job_body.items() if k not in ("bits", "group_size")}
    return {**body, "model": str(model), "output": {"formats": formats}}


def test_gguf_formats_are_accepted_and_stored(
    client: TestClient, keys: dict, job_body: dict, allowed_root: Path
) -> None:
    model = allowed_root / "tiny-bpe-llama"
    if not model.exists():
        tiny_model(model)
    r = client.post("/v1/jobs", json=_body(job_body, model, ["gguf:Q4_K_M", "gguf:Q8_0"]), headers=keys["alice"])
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=keys["alice"]).json()
    assert job["spec"]["output"]["formats"] == ["gguf:Q4_K_M", "gguf:Q8_0"]
    assert set(job["plan"]["output_bytes"]) == {"gguf:Q4_K_M", "gguf:Q8_0"}
    spec = engine_spec(job["spec"], lambda uri, kind, what: uri)
    assert spec.formats == (OutputFormat.GGUF_Q4_K_M, OutputFormat.GGUF_Q8_0)
    mixed = ["compressed-tensors", "gguf:Q4_K_M", "gguf:Q8_0"]
    r = client.post("/v1/jobs", json=_body(job_body, model, mixed), headers=keys["alice"])
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=keys["alice"]).json()
    assert job["spec"]["output"]["formats"] == mixed and set(job["plan"]["output_bytes"]) == set(mixed)


def test_what_gguf_cannot_do_is_a_422_naming_the_fix(
    client: TestClient, keys: dict, job_body: dict, settings: Settings, tiny_assets: dict[str, Path]
) -> None:
    word_level = tiny_assets["model"]  # the tiny Llama of the API tests has a word-level tokenizer
    cases: list[tuple[dict[str, Any], str]] = [
        (_body(job_body, word_level, ["gguf:Q4_K_M"]), "byte-level BPE or a Llama/SentencePiece tokenizer"),
        ({**_body(job_body, word_level, ["compressed-tensors", "gguf:Q4_K_M"]), "scheme": "fp8-dynamic", "method": "rtn"},
         "only with a weight-only integer scheme"),
        ({**_body(job_body, word_level, ["gguf:Q4_0"]), "method": "awq-gptq"}, "rtn, gptq or awq"),
        (_body(job_body, word_level, ["gguf:Q3_Z"]), "gguf:Q4_K_M"),
    ]
    for body, message in cases:
        r = client.post("/v1/jobs", json=body, headers=keys["alice"])
        assert r.status_code == 422, (body["output"], r.text)
        assert message in str(r.json()["detail"]), (body["output"], r.json())
    assert job_rows(settings) == 0
