"""The MoE GPU benchmark on CPU with tiny dimensions (`--tiny`): the checkpoint it leaves for vLLM has every
expert quantized under Qwen3-MoE's own names, one timing per MoE layer, and both loaders' perplexities."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from benchmarks import gpu_moe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_moe_benchmark_quantizes_times_each_layer_and_scores(tmp_path: Path) -> None:
    out = tmp_path / "checkpoint"
    result = gpu_moe.main([
        "--tiny", "--device", "cpu", "--layers", "2", "--samples", "4", "--seq-len", "32", "--eval-windows", "2",
        "--out", str(out), "--work", str(tmp_path / "work"), "--json", str(tmp_path / "result.json"),
    ])
    shape = gpu_moe.TINY
    assert [t.layer for t in result.per_layer] == [0, 1]
    assert all(t.seconds > 0 and t.peak_bytes > 0 for t in result.per_layer)
    assert result.quantized_experts == 2 * shape.experts * 3 and result.calibration_tokens == 4 * 32
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())  # noqa: SIM118
    assert {f"model.layers.1.mlp.experts.{shape.experts - 1}.{p}.weight_packed"
            for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert "model.layers.1.mlp.gate.weight" in names  # the router, dense
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == shape.group_size
    assert result.eval_tokens == 2 * 31 and math.isfinite(result.ppl_quantized)
    assert abs(result.ppl_quantized / result.ppl_original - 1) < 0.2  # w4 of a random model: close, not equal
    assert json.loads((tmp_path / "result.json").read_text())["checkpoint"] == str(out.resolve())
