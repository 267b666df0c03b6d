"""Every dense decoder-only family runs through the whole engine with no per-family code but AWQ's pairs.

For each family (a tiny random model from transformers' own config class, tests/families.py) and each
method, `run_local` writes a compressed-tensors checkpoint, and:
- transformers + compressed-tensors (`CompressedTensorsConfig(dequantize=True)`) loads it, and its logits
  equal QuantFleet's own fake-quantized model (the layerwise model over the checkpoint read back) within 1e-3;
- every Linear of every decoder layer is quantized (counted in the checkpoint);
- GPTQ's output error (the modules' output MSE on the calibration inputs, summed) beats RTN's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from tests.families import FAMILIES, make_tiny_family
from tests.helpers import write_text_corpus
from tests.workers.layerwise import layerwise_logits, relative
from workers.awq_mappings import AWQ_MAPPINGS
from workers.engine import run_local
from workers.errors import InvalidSpecError
from workers.evaluate import QuantizedWeights
from workers.loading import CheckpointWeights, LayerwiseModel
from workers.spec import CalibrationSpec, EvalSpec, JobSpec, Method, QuantScheme
from workers.tensor_source import TensorSource

CPU = torch.device("cpu")
SEQ_LEN = 32  # longer than the tiny models' sliding windows (16): the per-layer masks matter


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text") / "calibration.txt", 3000, seed=1)


def _spec(model_dir: Path, method: str, text: Path, *, calibrate: bool = True, evaluate: bool = False) -> JobSpec:
    return JobSpec(
        model_dir=str(model_dir), method=Method(method), scheme=QuantScheme(bits=3, group_size=32, symmetric=True),
        calibration=CalibrationSpec(path=str(text) if calibrate else None, num_samples=8, seq_len=SEQ_LEN),
        eval=EvalSpec(path=str(text), seq_len=SEQ_LEN, max_windows=4) if evaluate else None,
    )


def _quantized_linears(out: Path) -> set[str]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {name.removesuffix(".weight_packed") for name in f.keys() if name.endswith(".weight_packed")}  # noqa: SIM118


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_quantizes_loads_and_matches(family: str, text: Path, tmp_path: Path) -> None:
    model_dir = make_tiny_family(family, tmp_path / "model")
    model = LayerwiseModel(model_dir, CPU)
    ids = torch.randint(4, 300, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    original = layerwise_logits(model, CheckpointWeights(TensorSource(model_dir)), ids)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert relative(original, reference(ids).logits) < 1e-5  # the layerwise model is the model

    layer_linears = [n for n, m in reference.get_decoder().layers[0].named_modules() if isinstance(m, nn.Linear)]
    expected = {f"{model.graph.layer_prefix(i)}{n}" for i in range(model.num_layers) for n in layer_linears}
    methods = ["rtn", "gptq"] + (["awq"] if family in _AWQ_FAMILIES else [])
    errors = {}
    for method in methods:
        out = tmp_path / method
        report = run_local(_spec(model_dir, method, text, evaluate=method == "gptq"), out)
        assert report.architecture == model.arch.name
        assert _quantized_linears(out) == expected, method  # every Linear of every decoder layer
        ours = layerwise_logits(model, QuantizedWeights(out, model.model_dtype), ids)
        loaded = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        with torch.no_grad():
            assert relative(loaded(ids).logits, ours) < 1e-3, method
        errors[method] = sum(e.error for e in report.module_errors)  # output MSE of every module, calibration inputs
        assert relative(ours, original) < 1.0
        if method == "gptq":
            assert report.eval is not None and report.eval.kl_mean >= 0
    assert errors["gptq"] < errors["rtn"], errors
    if "awq" in errors:
        assert errors["awq"] < 2 * errors["rtn"], errors  # smoothing folded correctly (a wrong fold is far worse)


_AWQ_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "granite", "cohere",
                 "stablelm", "gpt_neox"}
assert {"llama", "phi3", "gemma3_text", "gpt_neox"} <= set(AWQ_MAPPINGS)


def test_awq_is_refused_at_validation_for_a_family_without_pairs(text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = make_tiny_family("olmo2", tmp_path / "model")
    monkeypatch.delitem(AWQ_MAPPINGS, "olmo2")
    with pytest.raises(InvalidSpecError, match="method awq needs smoothing pairs"):
        run_local(_spec(model_dir, "awq", text), tmp_path / "out")
    assert not (tmp_path / "out").exists()
