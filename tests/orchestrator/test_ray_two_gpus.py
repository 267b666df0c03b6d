"""Two jobs on two GPUs at once, through a real local Ray that declares two *logical* GPUs (no CUDA here:
Ray hands out GPU ids and sets CUDA_VISIBLE_DEVICES, torch sees no CUDA and the engine runs on the CPU).

What the tasks themselves record (their attempt-start event: `gpu_ids`, `cuda_visible_devices`, pid; the
attempt's interval runs from that event to the job's terminal state event, both written inside the task):
  1. two 1-GPU jobs run at the same time (their intervals overlap) on distinct GPUs, 0 and 1;
  2. a 2-GPU job gets both ids in one task, and a 1-GPU job handed to Ray in the same dispatcher round
     runs before or after it, never alongside;
  3. every GPU attempt ran in a process of its own (no worker reuse: CUDA would stay bound to the GPU
     the previous attempt was given).

The scenario runs in its own process (a Ray driver joins one Ray instance, and the rest of the test
session uses a CPU-only one): `python -m tests.orchestrator.test_ray_two_gpus '<json args>'`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.orchestrator.support import gptq_body, run_scenario

Interval = tuple[datetime, datetime]


def attempt_record(sessions: Any, job_id: str) -> dict[str, Any]:
    """State, error and, per attempt, where it ran and its [start, end] as the task wrote them."""
    from tests.orchestrator.support import events, load_job

    job = load_job(sessions, job_id)
    history = events(sessions, job_id)
    start = next(e for e in history if e.kind == "attempt")
    end = next(e for e in history if e.kind == "state" and e.state in ("succeeded", "failed", "cancelled"))
    handed_to_ray = next(e for e in history if e.kind == "state" and e.state == "running")
    return {
        "state": job.state,
        "attempts": job.attempts,
        "error": job.error,
        "placement": start.data,
        "handed_to_ray": handed_to_ray.at.isoformat(),
        "interval": [start.at.isoformat(), end.at.isoformat()],
    }


def run_until_done(dispatcher: Any, sessions: Any, job_ids: list[str], timeout: float) -> None:
    """Step the dispatcher (one round claims every queued job there is room for) until all have ended."""
    from tests.orchestrator.support import load_job

    deadline = time.monotonic() + timeout
    while any(load_job(sessions, j).state not in ("succeeded", "failed") for j in job_ids):
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {job_ids} did not end within {timeout:.0f} s")
        dispatcher.step()
        time.sleep(0.05)


def main(args: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from orchestrator.dispatcher import Dispatcher
    from orchestrator.executors.ray_executor import RayExecutor
    from tests.orchestrator.support import service_settings, sessions_for, submit

    # Four CPUs for two tasks of one CPU each: what limits them is the two GPUs. address="local": a new
    # instance of our own, even where other Ray instances run on this machine.
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        settings = service_settings(
            args["database_url"],
            Path(args["allowed_root"]),
            Path(args["tmp"]),
            executor="ray",
            concurrency=None,
            lease_seconds=60.0,
        )
        sessions = sessions_for(args["database_url"])
        executor = RayExecutor()
        out: dict[str, Any] = {"capacity": executor.capacity, "uses_gpus": executor.uses_gpus}
        dispatcher = Dispatcher(sessions, executor, settings, name="two-gpus")

        pair = [submit(sessions, args["pair_body"], settings) for _ in range(2)]
        run_until_done(dispatcher, sessions, pair, timeout=150)
        out["pair"] = [attempt_record(sessions, j) for j in pair]

        wide = submit(sessions, {**args["small_body"], "gpus": 2}, settings)
        narrow = submit(sessions, args["small_body"], settings)
        run_until_done(dispatcher, sessions, [wide, narrow], timeout=150)
        out["wide"], out["narrow"] = attempt_record(sessions, wide), attempt_record(sessions, narrow)
        dispatcher.release()
    finally:
        ray.shutdown()
    return out


def interval(record: dict[str, Any]) -> Interval:
    start, end = (datetime.fromisoformat(t) for t in record["interval"])
    return start, end


def overlap_s(a: Interval, b: Interval) -> float:
    """Seconds both intervals cover (negative: the gap between them)."""
    return (min(a[1], b[1]) - max(a[0], b[0])).total_seconds()


def test_overlap_s_is_the_shared_span_or_minus_the_gap() -> None:
    t = [datetime(2026, 1, 1, 0, 0, s) for s in range(6)]
    assert overlap_s((t[0], t[3]), (t[1], t[5])) == 2.0
    assert overlap_s((t[0], t[1]), (t[3], t[5])) == -2.0
    assert overlap_s((t[3], t[5]), (t[0], t[1])) == -2.0


@pytest.mark.ray
def test_two_jobs_share_two_logical_gpus_and_a_two_gpu_job_takes_both(
    clean_sqlite_url: str, allowed_root: Path, tiny_assets: dict, slow_model: Path, tmp_path: Path
) -> None:
    # The pair: GPTQ on the 8-layer model (seconds of work, so two fresh worker processes overlap even
    # when one starts a little later). The others: RTN on the 2-layer model.
    pair_body = gptq_body({**tiny_assets, "slow": slow_model}, model="slow", eval_=False)
    small_body = {"model": str(tiny_assets["model"]), "method": "rtn", "bits": 4, "group_size": 32}
    args = {
        "database_url": clean_sqlite_url,
        "allowed_root": str(allowed_root),
        "tmp": str(tmp_path),
        "pair_body": pair_body,
        "small_body": small_body,
    }
    out = run_scenario("tests.orchestrator.test_ray_two_gpus", args, timeout=360)
    print(json.dumps(out, indent=1))
    assert out["capacity"] == 2 and out["uses_gpus"] is True

    # 1. Two 1-GPU jobs: both succeeded in one attempt, on GPUs 0 and 1, at the same time.
    first, second = out["pair"]
    for job in (first, second):
        assert job["state"] == "succeeded" and job["attempts"] == 1, job
        ids = job["placement"]["gpu_ids"]
        assert len(ids) == 1 and job["placement"]["cuda_visible_devices"] == str(ids[0])
    assert sorted(j["placement"]["gpu_ids"][0] for j in (first, second)) == [0, 1]
    shared = overlap_s(interval(first), interval(second))
    assert shared > 0, f"the two 1-GPU jobs did not run at the same time (gap {-shared:.2f} s)"

    # 2. A 2-GPU job holds both GPUs in one task. On this CPU worker the engine refuses to spread one job
    #    over devices it does not have (no retry); the 1-GPU job handed to Ray with it ran strictly before
    #    or after it, though both were handed over before either started.
    wide, narrow = out["wide"], out["narrow"]
    assert wide["placement"]["gpu_ids"] == [0, 1] and wide["placement"]["cuda_visible_devices"] == "0,1"
    assert wide["state"] == "failed" and wide["attempts"] == 1
    assert "devices=2" in wide["error"] and "0 visible CUDA GPU(s)" in wide["error"], wide["error"]
    assert narrow["state"] == "succeeded" and narrow["attempts"] == 1, narrow
    assert narrow["placement"]["gpu_ids"] in ([0], [1])
    handed = max(datetime.fromisoformat(j["handed_to_ray"]) for j in (wide, narrow))
    assert handed < min(interval(wide)[0], interval(narrow)[0])
    assert overlap_s(interval(wide), interval(narrow)) < 0, "a 1-GPU job ran alongside the 2-GPU job"

    # 3. Four GPU attempts, four worker processes.
    pids = [j["placement"]["pid"] for j in (first, second, wide, narrow)]
    assert len(set(pids)) == 4 and os.getpid() not in pids


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1])), default=str), flush=True)
