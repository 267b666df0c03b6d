"""The issue-13 benchmark scripts' CPU-checkable parts: the phase times on logical CPU devices, the split
factorisation timer, and the scaling table."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import gpu_phase_times, gpu_scaling, split_factor_times


def test_phase_times_on_two_cpu_devices_show_the_split_factorisation(tmp_path: Path) -> None:
    from workers import engine

    original = engine.resolve_devices
    out = tmp_path / "phases.json"
    try:
        assert gpu_phase_times.main(["--work", str(tmp_path), "--shape", "tiny", "--layers", "3", "--samples", "4",
                                     "--seq-len", "32", "--devices", "2", "--cpu-devices", "--results", str(out)]) == 0
    finally:
        engine.resolve_devices = original
    phases = json.loads(out.read_text())["runs"]["2"]["per_layer_ms"]
    assert "split: Cholesky [qf-device-0_0]" in phases or "split: Cholesky [qf-device-1_0]" in phases
    assert {"split: row sweep (wall)", "split: assemble U everywhere (wall)", "all devices: round_one"} <= phases.keys()
    assert any(name.startswith("split: inverse chunks [qf-device-") for name in phases)


def test_split_factor_times_checks_the_factor(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "split.json"
    assert split_factor_times.main(["--sizes", "300", "--counts", "2,4", "--reps", "1", "--results", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    for split in row["split"].values():
        assert split["max_rel_diff_vs_one_device"] < 1e-4
        assert split["critical_path_ms"] > 0


def test_scaling_counts_and_table() -> None:
    assert gpu_scaling.default_counts(0) == [1]
    assert gpu_scaling.default_counts(2) == [1, 2]
    assert gpu_scaling.default_counts(6) == [1, 2, 4, 6]
    assert gpu_scaling.default_counts(8) == [1, 2, 4, 8]
    result = {"method": "gptq", "layers": 32, "total_layers": 32, "stages": {"quantize": 30.0}, "total_s": 32.0,
              "extrapolated_s": 32.0, "per_layer_s": 0.9, "peak_gpu_gib": 8.0}
    faster = result | {"stages": {"quantize": 15.0}, "total_s": 17.0, "extrapolated_s": 17.0, "per_layer_s": 0.45}
    rows = gpu_scaling.rows_of({1: {"results": [result]}, 2: {"results": [faster]}, 4: {"failures": [{"method": "gptq", "rc": 1}]}})
    table = gpu_scaling.format_table(rows, "llama3-8b")
    assert "2.00x" in table and "1.88x" in table and "FAILED rc=1" in table
