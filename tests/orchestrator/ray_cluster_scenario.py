"""A multi-node Ray scenario, run in its own process by test_ray_cluster.py (a process of its own because
a Ray driver can join only one cluster, and the rest of the test session uses a single-node Ray).

A head without CPUs plus two worker nodes, each offering one `qf_gpu` (a custom resource standing in
for a GPU); a dispatcher whose attempts each need one `qf_gpu`. Then:
  1. a batch of two jobs runs, one per node (recorded: the Ray node id of each attempt);
  2. a slower job starts; its node is removed mid-quantization; the job completes on the other node.
Prints one JSON line with what happened; the test asserts on it and on the database.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _attempt_nodes(sessions: Any, job_id: str) -> list[str]:
    from tests.orchestrator.support import events

    return [e.data["ray_node_id"] for e in events(sessions, job_id) if e.kind == "attempt" and e.data]


def main(args: dict[str, Any]) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from api.schemas import JobCreate
    from orchestrator.db import transaction
    from orchestrator.dispatcher import Dispatcher, start_in_thread
    from orchestrator.executors import build_executor
    from orchestrator.fleet.batches import create_batch
    from tests.orchestrator.support import (
        load_job,
        service_settings,
        sessions_for,
        stop,
        wait_for,
        wait_for_state,
    )

    store_mb = 80 * 1024 * 1024
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": store_mb, "include_dashboard": False},
    )
    nodes = [
        cluster.add_node(num_cpus=1, resources={"qf_gpu": 1}, object_store_memory=store_mb) for _ in range(2)
    ]
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    settings = service_settings(
        args["database_url"],
        Path(args["allowed_root"]),
        Path(args["tmp"]),
        executor="ray",
        concurrency=None,
        ray_task_resources={"qf_gpu": 1},
        lease_seconds=30.0,
    )
    sessions = sessions_for(args["database_url"])
    executor = build_executor(settings)
    out: dict[str, Any] = {"capacity": executor.capacity, "worker_nodes": [n.node_id for n in nodes]}
    worker = start_in_thread(Dispatcher(sessions, executor, settings, name="ray-cluster"))
    try:
        specs = [
            JobCreate.model_validate({**args["body"], "bits": bits}).model_dump(mode="json")
            for bits in (4, 8)
        ]
        with transaction(sessions) as s:
            _, jobs = create_batch(
                s, owner="alice", specs=specs, template=args["body"], matrix={"bits": [4, 8]}, max_attempts=3
            )
            batch_ids = [j.id for j in jobs]
        out["batch"] = {}
        for job_id in batch_ids:
            job = wait_for_state(sessions, job_id, {"succeeded", "failed"}, timeout=150)
            out["batch"][job_id] = {
                "state": job.state,
                "error": job.error,
                "nodes": _attempt_nodes(sessions, job_id),
            }

        slow_spec = JobCreate.model_validate(args["slow_body"]).model_dump(mode="json")
        with transaction(sessions) as s:
            _, (slow,) = create_batch(
                s, owner="alice", specs=[slow_spec], template=args["slow_body"], matrix=None, max_attempts=3
            )
            slow_id = slow.id

        def quantizing() -> bool:
            job = load_job(sessions, slow_id)
            return job.state == "running" and (job.progress or {}).get("stage") == "quantize"

        wait_for(quantizing, 120, "the slow job to be quantizing", interval=0.05)
        victim_id = _attempt_nodes(sessions, slow_id)[-1]
        progress_at_removal = load_job(sessions, slow_id).progress
        cluster.remove_node(next(n for n in nodes if n.node_id == victim_id))
        removed_at = time.monotonic()
        job = wait_for_state(sessions, slow_id, {"succeeded", "failed"}, timeout=150)
        out["slow"] = {
            "job_id": slow_id,
            "state": job.state,
            "attempts": job.attempts,
            "error": job.error,
            "nodes": _attempt_nodes(sessions, slow_id),
            "removed": victim_id,
            "progress_at_removal": progress_at_removal,
            "recovered_in_s": round(time.monotonic() - removed_at, 1),
        }
    finally:
        stop(worker)
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
