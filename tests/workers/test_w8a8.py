"""INT8 W8A8 (issue 12, item 2): SmoothQuant then GPTQ or RTN to per-channel int8 weights, per-token dynamic int8
activations, written as compressed-tensors `int-quantized` exactly as llm-compressor's W8A8 preset.

Checkpoints are read back by transformers + compressed-tensors (an independent dequantizer) and must hold our
weights bit for bit; the config is validated by compressed-tensors and compared with llm-compressor's W8A8
preset; the activation rule is checked against an independent per-row computation; SmoothQuant must lower
the W8A8 error of a model with outlier activation channels.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from tests.helpers import make_tiny_llama
from workers import activation_quant
from workers.engine import run_local
from workers.errors import InvalidSpecError
from workers.formats import int_quantized
from workers.formats.reader import QuantizedCheckpoint
from workers.quant.int8 import quantize_per_token
from workers.quant.smoothquant import smoothing_scales
from workers.spec import W8A8_INT8, JobSpec, OutputFormat, QuantScheme

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def w8a8_spec(make_spec: Callable[..., JobSpec], method: str, smoothquant: float | None = None, **kw: object) -> JobSpec:
    spec = make_spec(method, num_samples=8, seq_len=32, **kw)
    return dataclasses.replace(spec, scheme=W8A8_INT8, smoothquant=smoothquant)


def test_per_token_int8_matches_an_independent_row_by_row_computation() -> None:
    x = torch.randn(7, 5, 48, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0] = 0  # an all-zero token: scale 1, codes 0
    q, scale = quantize_per_token(x)
    rows = x.reshape(-1, 48).numpy().astype(np.float64)
    for i, row in enumerate(rows):
        amax = np.abs(row).max()
        s = amax / 127 if amax > 0 else 1.0
        expected = np.clip(np.round(row / s), -128, 127)  # numpy rounds half to even, as torch does
        assert np.array_equal(q.reshape(-1, 48)[i].numpy(), expected.astype(np.int8))
        assert scale.reshape(-1)[i].item() == pytest.approx(s, rel=1e-6)
    assert int(q.abs().max()) == 127


def test_smoothing_scales_are_the_reference_formula() -> None:
    g = torch.Generator().manual_seed(1)
    act = torch.rand(64, generator=g) * 10
    act[3] = 0.0  # a dead channel: clamped, finite
    weights = [torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g) * 4]
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smoothing_scales(act, weights, alpha)
        w_max = torch.cat(weights).abs().amax(dim=0)
        expected = act.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)  # SmoothQuant's code
        assert torch.allclose(s, expected.clamp(min=1e-5), rtol=1e-6)
    assert bool(torch.isfinite(smoothing_scales(act, weights, 0.8, torch.float16)).all())


def test_config_is_compressed_tensors_and_llm_compressors_w8a8_preset() -> None:
    config = int_quantized.quantization_config(W8A8_INT8)
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "int-quantized" and parsed.quant_method == "compressed-tensors"
    group = parsed.config_groups["group_0"]
    reference = preset_name_to_scheme("W8A8", ["Linear"])
    fields = ("num_bits", "type", "strategy", "dynamic", "symmetric", "group_size")
    for ours, theirs in ((group.weights, reference.weights), (group.input_activations, reference.input_activations)):
        assert ours is not None and theirs is not None
        assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert group.format == "int-quantized" and group.output_activations is None
    assert int_quantized.scheme_from_config(config) == W8A8_INT8


@pytest.mark.parametrize(("method", "smoothquant"), [("rtn", None), ("gptq", None), ("gptq", 0.8), ("rtn", 0.5)])
def test_w8a8_checkpoint_loads_in_transformers_with_our_weights(
    make_spec: Callable[..., JobSpec], tiny_model_dir: Path, tmp_path: Path, method: str, smoothquant: float | None,
) -> None:
    spec = dataclasses.replace(w8a8_spec(make_spec, method, smoothquant), observer="minmax")
    out = tmp_path / "out"
    report = run_local(spec, out)
    assert report.eval is not None and report.bits == 8
    assert report.bits_per_weight is not None and 8.0 < report.bits_per_weight < 8.6  # int8 + an fp16 scale per row

    config = json.loads((out / "config.json").read_text())
    assert QuantizationConfig.model_validate(config["quantization_config"]).format == "int-quantized"
    tensors = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    dtype = next(iter(original.values())).dtype
    for layer in range(2):
        for name in LINEARS:
            prefix = f"model.layers.{layer}.{name}."
            out_f, in_f = original[prefix + "weight"].shape
            assert {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)} == {"weight", "weight_scale"}
            assert tensors[prefix + "weight"].dtype == torch.int8 and tensors[prefix + "weight"].shape == (out_f, in_f)
            assert tensors[prefix + "weight_scale"].dtype == dtype and tensors[prefix + "weight_scale"].shape == (out_f, 1)
            if method == "rtn" and smoothquant is None:  # min-max: scale = max|w|/127.5 (toward zero), q = round(w/s)
                w = original[prefix + "weight"].to(torch.float32)
                scale = tensors[prefix + "weight_scale"].to(torch.float32)
                assert torch.allclose(scale, w.abs().amax(dim=1, keepdim=True) / 127.5, rtol=2e-3)
                assert torch.equal(tensors[prefix + "weight"], torch.clamp(torch.round(w / scale), -128, 127).to(torch.int8))
    smoothed = not torch.equal(tensors["model.layers.0.input_layernorm.weight"], original["model.layers.0.input_layernorm.weight"])
    assert smoothed == (smoothquant is not None)  # SmoothQuant's 1/s is folded into the norms

    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    ).eval()
    ours = QuantizedCheckpoint(out)
    for layer in range(2):
        dense = ours.dense_prefix(f"model.layers.{layer}.", dtype=dtype)
        for name in LINEARS:  # compressed-tensors' int-quantized decompressor gives our weights exactly
            theirs = loaded.model.layers[layer].get_submodule(name).weight.to(dtype)
            assert torch.equal(dense[f"{name}.weight"], theirs), (layer, name)
        assert set(ours.input_quantizers(f"model.layers.{layer}.")) == set(LINEARS)

    # the loaded model with the runtime's per-token int8 activations stays close to the original model
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for layer in loaded.model.layers:
        activation_quant.attach(layer, {name: activation_quant.input_quantizer(W8A8_INT8) for name in LINEARS})  # type: ignore[misc]
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = reference(ids).logits, loaded(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < 0.05


@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose norms put a few activation channels 40× above the rest (LLM-style outliers)."""
    directory = make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-outliers", num_layers=2, seed=3)
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    for layer in range(2):
        for norm, channels in (("input_layernorm", [3, 17, 40]), ("post_attention_layernorm", [5, 29])):
            weight = tensors[f"model.layers.{layer}.{norm}.weight"]
            weight[channels] *= 40
    save_file(tensors, str(path), metadata={"format": "pt"})
    return directory


def test_smoothquant_lowers_w8a8_error_on_a_model_with_outlier_channels(
    make_spec: Callable[..., JobSpec], outlier_model_dir: Path, tmp_path: Path
) -> None:
    kl = {}
    for alpha in (None, 0.8):
        spec = w8a8_spec(make_spec, "rtn", alpha, model_dir=outlier_model_dir)
        report = run_local(spec, tmp_path / f"out-{alpha}")
        assert report.eval is not None
        kl[alpha] = report.eval.kl_mean
    assert kl[0.8] < 0.7 * kl[None], kl  # evaluation quantizes activations per token, as the runtime does


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "awq"}, "solved by method gptq or rtn"),
        ({"formats": (OutputFormat.COMPRESSED_TENSORS, OutputFormat.GPTQ)}, "written only as compressed-tensors"),
        ({"scheme": QuantScheme(8, 128, True, activations="dynamic")}, "integer schemes are weight-only, or W8A8"),
        ({"scheme": QuantScheme(4, 32), "smoothquant": 0.8}, "SmoothQuant moves activation outliers"),
        ({"smoothquant": 1.5}, "must be in [0, 1]"),
        ({"smoothquant": 0.8, "calibration": False}, "SmoothQuant's scales come from calibration"),
        ({"devices": 2}, "runs on one device"),
    ],
)
def test_invalid_w8a8_specs_say_what_to_change(
    make_spec: Callable[..., JobSpec], change: dict[str, object], message: str
) -> None:
    change = dict(change)
    method = str(change.pop("method", "gptq" if "calibration" not in change else "rtn"))
    calibration = bool(change.pop("calibration", True))
    spec = dataclasses.replace(make_spec(method, calibration=calibration), scheme=W8A8_INT8)
    spec = dataclasses.replace(spec, **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec.validate()
