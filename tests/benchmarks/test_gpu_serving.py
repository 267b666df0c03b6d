"""The vLLM serving benchmark's quantize stage on CPU with test-sized models (`--tiny`): each case's checkpoint
is written in its scheme's format, the loader's log-probabilities are those of the windows stored for vLLM,
and the side-by-side table reads a served result (here: the loader's own, so Δ is exactly zero)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import gpu_serving
from tests.workers.layerwise import stored

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_cases_quantize_score_and_tabulate(tmp_path: Path) -> None:
    work = tmp_path / "work"
    gpu_serving.main(["quantize", "--tiny", "--device", "cpu", "--work", str(work), "--eval-windows", "2",
                      "--cases", "gemma3-gptq-w4a16,llama3-8b-fp8-static"])
    loader = json.loads((work / "loader.json").read_text())
    assert set(loader) == {"original:gemma3", "gemma3-gptq-w4a16", "original:llama3-8b", "llama3-8b-fp8-static"}
    for entry in loader.values():
        assert [len(w) for w in entry["windows"]] == [32, 32]  # 2 windows of the tiny 32-token length
        assert [len(lp) for lp in entry["logprobs"]] == [31, 31] and all(x < 0 for w in entry["logprobs"] for x in w)

    gemma = stored(Path(loader["gemma3-gptq-w4a16"]["checkpoint"]))
    assert gemma["model.layers.5.mlp.down_proj.weight_packed"] == (64, 128 // 8)  # 6 layers, int4 packed 8 per int32
    fp8 = stored(Path(loader["llama3-8b-fp8-static"]["checkpoint"]))
    assert fp8["model.layers.0.self_attn.q_proj.input_scale"] == (1,)  # static activations: a calibrated scale
    original, quantized = (gpu_serving.perplexity(loader[k]["logprobs"]) for k in ("original:gemma3", "gemma3-gptq-w4a16"))
    assert math.isfinite(original) and quantized != original

    served = {name: {"logprobs": entry["logprobs"]} for name, entry in loader.items() if name != "original:llama3-8b"}
    table = gpu_serving.ppl_table(loader, served).splitlines()
    gemma_row = next(r for r in table if r.startswith("| gemma3-gptq-w4a16 |"))
    assert "+0.000 %" in gemma_row and "| 0.0000 | 0.0000 | 62 |" in gemma_row
    assert any(r.startswith("| original:llama3-8b |") and "(not served)" in r for r in table)
