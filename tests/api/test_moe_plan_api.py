"""The preflight of a Mixture-of-Experts and a multimodal model over the API: POST /v1/jobs returns, and GET
/v1/jobs/{id} stores, the experts (count, fused or not, routers kept dense, statistics) and the dense towers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.moe_families import NUM_EXPERTS, make_tiny_moe, make_tiny_multimodal


def test_the_plan_lists_experts_and_towers(
    client: TestClient, keys: dict, job_body: dict[str, Any], allowed_root: Path
) -> None:
    moe_dir = make_tiny_moe("qwen2_moe", allowed_root / "qwen2-moe")
    submitted = client.post("/v1/jobs", json={**job_body, "model": str(moe_dir)}, headers=keys["alice"])
    assert submitted.status_code == 202, submitted.text
    plan = client.get(f"/v1/jobs/{submitted.json()['id']}", headers=keys["reader"]).json()["plan"]
    (experts,) = plan["experts"]
    assert experts["pattern"] == "model.layers.*.mlp.experts" and experts["layers"] == 2
    assert experts["experts"] == NUM_EXPERTS and experts["linears"] == ["gate_proj", "up_proj", "down_proj"]
    assert experts["fused_in_model"] and not experts["fused_in_checkpoint"]
    assert experts["dense"] == ["mlp.gate", "mlp.shared_expert_gate"] and experts["statistics_bytes"] > 0
    expert_linears = [q for q in plan["quantized"] if ".experts.*." in q["pattern"]]
    assert sum(q["count"] for q in expert_linears) == 2 * NUM_EXPERTS * 3
    assert plan["towers"] == []

    vl_dir = make_tiny_multimodal("qwen2_5_vl", allowed_root / "qwen2-5-vl")
    submitted = client.post("/v1/jobs", json={**job_body, "model": str(vl_dir)}, headers=keys["alice"])
    assert submitted.status_code == 202, submitted.text
    plan = submitted.json()["plan"]
    assert plan["architecture"] == "Qwen2_5_VLForConditionalGeneration" and plan["towers"] == ["visual"]
    assert [d["pattern"] for d in plan["dense"] if d["kind"] == "tower"] == ["visual"]
    assert plan["quantized_count"] == 14 and plan["experts"] == []
