"""The diagnostic benchmarks' CPU-checkable parts: phase timing through the real engine, trace summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_concurrency, gpu_phase_times


def test_phase_times_wrap_the_engine_and_restore_it(tmp_path: Path) -> None:
    from workers import activations, devices
    from workers.methods import base

    originals = (base.collect_statistics, activations.Activations.forward, devices.DeviceThreads.run)
    out = tmp_path / "phases.json"
    assert gpu_phase_times.main(["--work", str(tmp_path), "--shape", "tiny", "--layers", "3", "--samples", "4",
                                 "--seq-len", "32", "--devices", "1", "--results", str(out)]) == 0
    run = json.loads(out.read_text())["runs"]["1"]
    phases = run["per_layer_ms"]
    assert {"layer (wall)", "input statistics (capture)", "load layer"} <= phases.keys()
    assert {"solve q_proj on cpu", "solve down_proj on cpu", "forward shard on cpu"} <= phases.keys()
    assert all(ms > 0 for ms in phases.values())
    # the layer's wall time holds its phases (layer 1 only: the last layer has no next start)
    assert phases["layer (wall)"] >= 0.5 * (phases["input statistics (capture)"] + phases["solve down_proj on cpu"])
    assert (base.collect_statistics, activations.Activations.forward, devices.DeviceThreads.run) == originals


def test_trace_summary_counts_busy_time_once_per_device(tmp_path: Path) -> None:
    events = [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 0, "dur": 100, "args": {"device": 0}},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 50, "dur": 100, "args": {"device": 0}},  # overlaps a
        {"ph": "X", "cat": "kernel", "name": "c", "ts": 400, "dur": 100, "args": {"device": 1}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 9, "dur": 7},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = gpu_phase_times.summarize_trace(path)
    assert summary["devices"]["cuda:0"] == {"kernels": 2, "busy_ms": 0.15, "span_ms": 0.15}
    assert summary["devices"]["cuda:1"]["busy_ms"] == pytest.approx(0.1)
    assert summary["runtime_ms"]["cudaLaunchKernel"] == {"calls": 2, "ms": 0.012}


def test_concurrency_benchmark_needs_two_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_concurrency.main([]) == 2
    assert "needs 2 or more CUDA GPUs, found 0" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown workload"):
        gpu_concurrency.make_workload("nope", __import__("torch").device("cpu"))
