"""Multimodal checkpoints: the language model quantized, the vision tower and projector dense and bit-identical.

Tiny random Gemma-3 (SigLIP tower, multi-modal projector) and Qwen2.5-VL (ViT with its merger) models, saved by
transformers' own `save_pretrained` with processor files (tests/moe_families.py). For GPTQ, RTN and AWQ:
- exactly the decoder layers' Linears are quantized, under the checkpoint's names (Gemma-3:
  `language_model.model.layers.*`, Qwen2.5-VL: `model.layers.*`);
- every vision tensor is bit-identical to the original and in the compressed-tensors `ignore` list;
- the processor files are kept, and transformers loads the checkpoint as the same class (with compressed-tensors)
  with logits equal to QuantFleet's fake-quantized model within 1e-3.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForImageTextToText
from transformers.utils.quantization_config import CompressedTensorsConfig

from tests.moe_families import make_tiny_multimodal
from tests.workers.layerwise import layerwise_logits, quantized_modules, relative
from tests.workers.test_moe import spec_for
from workers.engine import run_local
from workers.evaluate import QuantizedWeights
from workers.loading import CheckpointWeights, LayerwiseModel
from workers.preflight import plan_job, summary_lines
from workers.tensor_source import TensorSource

CPU = torch.device("cpu")
TOWERS = {"gemma3": ("vision_tower.", "multi_modal_projector."), "qwen2_5_vl": ("visual.",)}
LAYERS = {"gemma3": "language_model.model.layers", "qwen2_5_vl": "model.layers"}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import write_text_corpus

    return write_text_corpus(tmp_path_factory.mktemp("text") / "calibration.txt", 3000, seed=1)


def tensors(directory: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys() if name.startswith(prefixes)}  # noqa: SIM118


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_multimodal_language_model_quantized_towers_bit_identical(family: str, text: Path, tmp_path: Path) -> None:
    model_dir = make_tiny_multimodal(family, tmp_path / "model")
    model = LayerwiseModel(model_dir, CPU)
    ids = torch.randint(4, 290, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert relative(layerwise_logits(model, CheckpointWeights(TensorSource(model_dir)), ids),
                        reference(ids).logits) < 1e-5
    decoder = reference.get_decoder()
    layer_linears = [n for n, m in decoder.layers[0].named_modules() if isinstance(m, nn.Linear)]
    expected = {f"{LAYERS[family]}.{i}.{n}" for i in range(2) for n in layer_linears}
    vision = tensors(model_dir, TOWERS[family])
    assert len(vision) > 10

    plan = plan_job(spec_for(model_dir, "gptq", text))
    assert plan.towers == tuple(t.rstrip(".") for t in TOWERS[family]) and plan.quantized_count == len(expected)
    assert {d.pattern for d in plan.dense if d.kind == "tower"} == set(plan.towers)
    assert "dense towers: " + ", ".join(plan.towers) in "\n".join(summary_lines(plan.to_dict()))
    for method in ("rtn", "gptq", "awq"):
        out = tmp_path / method
        run_local(spec_for(model_dir, method, text), out)
        assert quantized_modules(out) == expected, method  # the language model's decoder Linears, nothing else
        written = tensors(out, TOWERS[family])
        assert written.keys() == vision.keys()
        for name, tensor in vision.items():
            assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name  # bit-identical
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == [type(reference).__name__]
        ignore = config["quantization_config"]["ignore"]
        for name in vision:  # every vision module is ignored, under its checkpoint and its module name
            module = name.rsplit(".", 1)[0]
            assert any(re.match(p[3:], module) and re.match(p[3:], f"model.{module}") for p in ignore if p.startswith("re:"))
        assert (out / "preprocessor_config.json").read_text() == (model_dir / "preprocessor_config.json").read_text()
        assert (out / "processor_config.json").is_file()

        ours = layerwise_logits(model, QuantizedWeights(out, model.model_dtype), ids)
        loaded = AutoModelForImageTextToText.from_pretrained(
            out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        ).float()  # transformers 5.17 leaves decompressed experts in the checkpoint's dtype
        assert type(loaded) is type(reference)
        with torch.no_grad():
            assert relative(loaded(ids).logits, ours) < 1e-3, method
        loaded_params = dict(loaded.named_parameters())
        towers = {n: p for n, p in reference.named_parameters() if n.startswith(tuple(f"model.{t}" for t in TOWERS[family]))}
        assert len(towers) == len(vision)
        assert all(torch.equal(loaded_params[n], p) for n, p in towers.items())  # the loaded towers are the originals
        assert 1e-4 < relative(ours, reference(ids).logits) < 1.0
        if method == "gptq":  # compressed-tensors' own modules (ignore applied): the towers must stay dense Linears
            compressed = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
            with torch.no_grad():
                assert relative(compressed(ids).logits.float(), ours) < 1e-3
