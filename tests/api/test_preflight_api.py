"""The preflight at submit: POST /v1/jobs stores the engine's plan on the job and GET /v1/jobs/{id} returns it
(SQLite and PostgreSQL); a model that is not a decoder-only causal LM is refused with a 422 saying why; the
CLI's `jobs show` prints a summary of the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import BertConfig

from workers.preflight import summary_lines


def test_the_plan_is_stored_and_returned(client: TestClient, keys: dict, job_body: dict[str, Any]) -> None:
    submitted = client.post("/v1/jobs", json=job_body, headers=keys["alice"])
    assert submitted.status_code == 202, submitted.text
    job = client.get(f"/v1/jobs/{submitted.json()['id']}", headers=keys["reader"]).json()
    plan = job["plan"]
    assert plan == submitted.json()["plan"]
    assert (plan["architecture"], plan["model_type"], plan["num_layers"]) == ("LlamaForCausalLM", "llama", 2)
    assert (plan["method"], plan["bits"], plan["group_size"]) == ("gptq", 4, 32)
    assert plan["quantized_count"] == 14 == sum(q["count"] for q in plan["quantized"])
    assert {"embeddings", "lm_head", "norm"} <= {d["kind"] for d in plan["dense"]}
    assert plan["memory"]["gpu"] > 0 and plan["memory"]["statistics"] > 0
    assert plan["output_bytes"]["compressed-tensors"] > 0
    listed = client.get("/v1/jobs", headers=keys["alice"]).json()["jobs"]
    assert listed[0]["plan"] == plan
    assert "LlamaForCausalLM" in "\n".join(summary_lines(plan))


def test_the_read_schema_documents_the_plan(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    plan = schemas["JobOut"]["properties"]["plan"]
    assert "preflight" in plan["description"]
    assert {"architecture", "quantized", "dense", "memory", "output_bytes"} <= set(schemas["JobPlanOut"]["properties"])


@pytest.mark.parametrize("architectures", [None, ["BertForMaskedLM"]])
def test_an_encoder_only_model_is_refused_at_submit(
    client: TestClient, keys: dict, job_body: dict[str, Any], allowed_root: Path, architectures: list[str] | None
) -> None:
    folder = allowed_root / f"bert-{'-'.join(architectures or ['none'])}"
    BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               architectures=architectures).save_pretrained(folder)
    r = client.post("/v1/jobs", json={**job_body, "model": str(folder)}, headers=keys["alice"])
    assert r.status_code == 422, r.text
    assert "is not supported" in r.json()["detail"] and "decoder-only causal language models" in r.json()["detail"]
    assert client.get("/v1/jobs", headers=keys["alice"]).json()["jobs"] == []


def test_cli_jobs_show_prints_a_plan_summary(
    client: TestClient, keys: dict, job_body: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import json

    import quantfleet.cli_fleet
    from quantfleet.cli import main

    job = client.post("/v1/jobs", json=job_body, headers=keys["alice"]).json()

    class Client:
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def get_job(self, job_id: str) -> dict[str, Any]:
            return dict(client.get(f"/v1/jobs/{job_id}", headers=keys["alice"]).json())

    monkeypatch.setattr(quantfleet.cli_fleet, "_client", lambda args: Client())
    assert main(["jobs", "show", job["id"]]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["plan"] == job["plan"]  # stdout stays JSON
    assert out.err.startswith("plan: LlamaForCausalLM (llama, float16), 2 decoder layers")
    assert "quantized: 14 Linears" in out.err and "peak memory (est.)" in out.err and "output (est.)" in out.err
