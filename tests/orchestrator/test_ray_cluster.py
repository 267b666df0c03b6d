"""Several Ray nodes on one machine (ray.cluster_utils.Cluster, a custom `qf_gpu` resource standing in
for GPUs): a batch spreads over the nodes, and a job whose node is removed mid-quantization completes on
another node. The scenario runs in its own process (see ray_cluster_scenario.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.orchestrator.support import events, gptq_body, run_scenario, sessions_for, slow_body


@pytest.mark.ray
@pytest.mark.postgres
def test_batch_spreads_over_nodes_and_survives_losing_one(
    clean_postgres_url: str, allowed_root: Path, tiny_assets: dict, slow_model: Path, tmp_path: Path
) -> None:
    args = {
        "database_url": clean_postgres_url,
        "allowed_root": str(allowed_root),
        "tmp": str(tmp_path),
        "body": gptq_body(tiny_assets, eval_=False),
        "slow_body": slow_body(tiny_assets, slow_model),
    }
    out = run_scenario("tests.orchestrator.ray_cluster_scenario", args, timeout=400)
    print(json.dumps(out["slow"], indent=1))
    workers = set(out["worker_nodes"])
    assert out["capacity"] == 2 and len(workers) == 2

    # The batch: both jobs succeeded, each in one attempt, on different nodes (each node has one qf_gpu).
    batch = out["batch"]
    assert all(j["state"] == "succeeded" and len(j["nodes"]) == 1 for j in batch.values()), batch
    assert {j["nodes"][0] for j in batch.values()} == workers

    # The node running the slow job was removed mid-quantization; the job finished on the other one.
    slow = out["slow"]
    assert slow["progress_at_removal"]["stage"] == "quantize"
    assert slow["state"] == "succeeded" and slow["error"] is None and slow["attempts"] == 2, slow
    assert slow["nodes"][0] == slow["removed"] and slow["nodes"][1] in workers - {slow["removed"]}
    sessions = sessions_for(clean_postgres_url)
    slow_id = slow["job_id"]
    history = [(e.kind, e.state) for e in events(sessions, slow_id) if e.kind in ("state", "attempt")]
    assert history == [
        ("state", "queued"),
        ("state", "running"),
        ("attempt", None),
        ("state", "queued"),
        ("state", "running"),
        ("attempt", None),
        ("state", "succeeded"),
    ]
    retry = next(
        e for e in events(sessions, slow_id) if e.kind == "state" and e.state == "queued" and e.attempt == 1
    )
    assert "worker died" in (retry.message or "")
