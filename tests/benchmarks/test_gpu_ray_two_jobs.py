"""benchmarks/gpu_ray_two_jobs.py on the CPU: its Ray options are the service's for a 1-GPU job, its table
and summary say what the rounds measured, and its smoke mode (Ray declaring two logical GPUs, the tiny
shape) runs one job alone and two together on distinct GPU ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_ray_two_jobs as g2
from orchestrator.executors.ray_executor import ClusterShape, task_options

REPO = Path(__file__).resolve().parents[2]


def run(gpu: int, start: float, end: float, engine: float = 1.0) -> g2.JobRun:
    return g2.JobRun(
        gpu_ids=[gpu],
        cuda_visible_devices=str(gpu),
        device=f"NVIDIA H200 GPU-{gpu}",
        pid=100 + gpu,
        start=start,
        end=end,
        engine_s=engine,
        peak_gpu_gib=2.5,
    )


def test_job_options_are_the_services_for_a_one_gpu_job() -> None:
    two_h200 = ClusterShape(total={"CPU": 32.0, "GPU": 2.0}, largest_node={"CPU": 32.0, "GPU": 2.0})
    assert g2.job_options(16) == task_options(two_h200, devices=1, cpus_per_task=16)


def test_summary_and_table_of_two_rounds() -> None:
    one = g2.Round("one alone", 40.0, [run(0, 0.0, 39.0, 30.0)])
    two = g2.Round("two together", 42.0, [run(0, 100.0, 140.0), run(1, 101.0, 141.5)])
    s = g2.summary(one, two)
    assert s["ratio"] == pytest.approx(1.05) and s["pair_overlap_s"] == pytest.approx(39.0)
    assert s["pair_on_distinct_gpus"] and s["pair_on_distinct_devices"]
    table = g2.format_table(one, two).splitlines()
    assert table[2].split()[:6] == ["one", "alone", "40.0", "0", "39.0", "30.0"]
    assert table[4].split()[:2] == ["1", "40.5"] and table[4].endswith("1 / 1 / NVIDIA H200 GPU-1")
    assert table[-1].startswith("two together / one alone: 1.05x wall (42.0 s vs 40.0 s)")
    assert table[-1].endswith("39.0 s at the same time on distinct GPUs")

    same = g2.Round("two together", 80.0, [run(0, 0.0, 40.0), run(0, 40.0, 80.0)])
    assert not g2.summary(one, same)["pair_on_distinct_gpus"]
    assert g2.summary(one, same)["pair_overlap_s"] == 0.0
    assert g2.format_table(one, same).endswith("on THE SAME GPUs")


@pytest.mark.ray
def test_cpu_smoke_with_two_logical_gpus(tmp_path: Path) -> None:
    results = tmp_path / "two.json"
    cmd = [
        sys.executable,
        "benchmarks/gpu_ray_two_jobs.py",
        "--work",
        str(tmp_path / "work"),
        "--shape",
        "tiny",
        "--layers",
        "2",
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--logical-gpus",
        "2",
        "--cpus-per-job",
        "1",
        "--no-warmup",
        "--results",
        str(results),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(results.read_text())
    one, two = out["rounds"]
    assert [r["name"] for r in out["rounds"]] == ["one alone", "two together"]
    assert len(one["runs"]) == 1 and len(two["runs"]) == 2
    assert sorted(r["gpu_ids"] for r in two["runs"]) == [[0], [1]]
    for r in one["runs"] + two["runs"]:
        assert r["cuda_visible_devices"] == str(r["gpu_ids"][0]) and r["device"] == "cpu"
        assert 0 < r["engine_s"] <= r["end"] - r["start"]
    assert len({r["pid"] for r in one["runs"] + two["runs"]}) == 3  # a fresh worker process per job
    assert out["summary"]["ratio"] == pytest.approx(two["wall_s"] / one["wall_s"])
    assert out["summary"]["pair_on_distinct_gpus"] is True
    assert out["table"] in done.stdout
    assert (tmp_path / "work" / "out-pair-1" / "eval.json").is_file()
