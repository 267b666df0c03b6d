"""FP8 (E4M3) checkpoints: compressed-tensors `float-quantized` exactly as vLLM reads it (issue 12, item 1).

Each FP8 scheme runs through `run_local` on a tiny Llama; the checkpoint is read back by transformers +
compressed-tensors (an independent dequantizer) and must give the logits of our fake-quantized model; the
FP8 rounding is checked against torch's own float8_e4m3fn cast; config.json's quantization_config is
validated by compressed-tensors' own pydantic model and compared with llm-compressor's presets.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils.quantization_config import CompressedTensorsConfig

from tests.helpers import make_tiny_llama
from workers.calibration import calibration_windows
from workers.engine import run_local
from workers.errors import InvalidSpecError
from workers.formats import float_quantized
from workers.formats.reader import QuantizedCheckpoint
from workers.quant.fp8 import (
    CHANNEL_SCALE_FACTORS,
    E4M3_MAX,
    FloatQuantizedTensor,
    fp8_quantize,
    min_max_scale,
    round_to_e4m3,
)
from workers.quant.fp8_gptq import fp8_gptq_solve
from workers.quant.inverse_hessian import prepare_hessian
from workers.spec import FP8_PRESETS, JobSpec, OutputFormat, QuantScheme
from workers.validation import check_against_model

LLM_COMPRESSOR_PRESET = {"fp8-dynamic": "FP8_DYNAMIC", "fp8-static": "FP8", "fp8-block": "FP8_BLOCK"}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def block_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose every Linear tiles into whole 128×128 blocks (hidden 128, 4 KV heads of 32)."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("models") / "tiny-llama-128", num_layers=2, seed=1, hidden_size=128,
        intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
    )


def fp8_spec(make_spec: Callable[..., JobSpec], preset: str, **kwargs: object) -> JobSpec:
    return dataclasses.replace(make_spec("rtn", **kwargs), scheme=QuantScheme.from_preset(preset))


# --- the grid --------------------------------------------------------------------------------------------


def test_round_to_e4m3_matches_torchs_cast() -> None:
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=generator) * torch.exp2(torch.randint(-14, 10, (200_000,), generator=generator))
    every_code = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    every_code = every_code[torch.isfinite(every_code)]
    ordered = every_code.unique()
    midpoints = (ordered[1:] + ordered[:-1]) / 2  # exact ties: both neighbours' rounding directions
    x = torch.cat([spread.clamp(-E4M3_MAX, E4M3_MAX), every_code, midpoints, torch.tensor([0.0, -0.0, 2.0**-10])])
    ours = round_to_e4m3(x)
    torch_cast = x.to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(ours, torch_cast)
    assert torch.equal(round_to_e4m3(torch.tensor([460.0, -1e6])), torch.tensor([E4M3_MAX, -E4M3_MAX]))  # saturating


@pytest.mark.parametrize("preset", list(FP8_PRESETS))
def test_fp8_quantize_scales_codes_and_shapes(preset: str) -> None:
    scheme = FP8_PRESETS[preset]
    w = (torch.randn(200, 300, generator=torch.Generator().manual_seed(1)) * 0.05).to(torch.bfloat16)
    w[3, :] = 0  # an all-zero row: a positive scale, codes 0
    qt = fp8_quantize(w, scheme, scale_dtype=torch.bfloat16)
    wf = w.to(torch.float32)
    if scheme.strategy == "channel":
        amax = wf.abs().amax(dim=1, keepdim=True)
        expanded = qt.scale.expand(200, 300)
    elif scheme.strategy == "tensor":
        amax = wf.abs().amax().reshape(1)
        expanded = qt.scale.reshape(1, 1).expand(200, 300)
    else:  # ceil(200/128) × ceil(300/128) blocks, the last ones partial
        amax = torch.stack([torch.stack([wf[r : r + 128, c : c + 128].abs().amax() for c in range(0, 300, 128)])
                            for r in range(0, 200, 128)])
        expanded = qt.scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert qt.scale.shape == amax.shape
    expected_scale = (amax / 448).to(torch.bfloat16).to(torch.float32)
    assert torch.equal(torch.where(expected_scale == 0, qt.scale, expected_scale), qt.scale)
    assert bool((qt.scale > 0).all())
    assert qt.q.dtype == torch.float8_e4m3fn
    independent = (wf / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)  # torch's own rounding
    assert torch.equal(qt.q.view(torch.uint8), independent.view(torch.uint8))
    assert torch.equal(qt.dequantize(), qt.q.to(torch.float32) * expanded)
    assert float(((qt.dequantize() - wf).abs() / expanded).max()) <= 16  # half a step of the top binade, at most


@pytest.mark.parametrize("preset", list(FP8_PRESETS))
def test_gptq_on_the_e4m3_grid(preset: str) -> None:
    """With a diagonal Hessian GPTQ has nothing to propagate: exactly RTN's codes. With correlated inputs it keeps
    RTN's min-max scales and lowers the Hessian-weighted error that it minimises, which `loss` reports."""
    scheme = FP8_PRESETS[preset]
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(160, 256, generator=g) * 0.05).to(torch.bfloat16)
    rtn = fp8_quantize(w, scheme, scale_dtype=torch.bfloat16)
    diagonal = prepare_hessian(torch.diag(torch.rand(256, generator=g) + 0.5))
    same, _ = fp8_gptq_solve(w, diagonal, scheme, scale_dtype=torch.bfloat16)
    assert torch.equal(same.q.view(torch.uint8), rtn.q.view(torch.uint8)) and torch.equal(same.scale, rtn.scale)
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.5 * torch.randn(256, 256, generator=g) / 16)
    hessian = 2 * x.T @ x / 2048
    solved, loss = fp8_gptq_solve(w, prepare_hessian(hessian, act_order=True), scheme, scale_dtype=torch.bfloat16)
    assert torch.equal(solved.scale, rtn.scale) and solved.q.dtype == torch.float8_e4m3fn

    def error(qt: FloatQuantizedTensor) -> float:
        delta = qt.dequantize() - w.float()
        return float(torch.einsum("ri,ij,rj->", delta, hessian, delta))

    assert error(solved) < 0.8 * error(rtn)
    assert loss == pytest.approx(error(solved) / 2, rel=0.05)  # Σ err²/2: ½ of the damped Hessian-weighted error


def test_the_mse_observer_picks_each_rows_scale_among_the_candidates() -> None:
    """observer "mse" (per-channel scales): each row's scale is min-max's times one of CHANNEL_SCALE_FACTORS, the one
    with the lowest importance-weighted rounding error, never worse than min-max on any row."""
    scheme = FP8_PRESETS["fp8-dynamic"]
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(96, 256, generator=g) * 0.05).to(torch.bfloat16)
    importance = torch.rand(256, generator=g) + 0.1
    plain = fp8_quantize(w, scheme, scale_dtype=torch.bfloat16)
    searched = fp8_quantize(w, scheme, scale_dtype=torch.bfloat16, observer="mse", importance=importance)
    candidates = torch.cat([min_max_scale(w.float(), scheme, torch.bfloat16, f) for f in CHANNEL_SCALE_FACTORS], dim=1)
    assert bool((searched.scale == candidates).any(dim=1).all())  # every row: one candidate, exactly
    assert 0 < int((searched.scale != plain.scale).sum()) < 96  # the choice is made per row

    def row_error(qt: FloatQuantizedTensor) -> torch.Tensor:
        return ((qt.dequantize() - w.float()).square() * importance).sum(dim=1)

    assert bool((row_error(searched) <= row_error(plain)).all()) and float(row_error(searched).sum()) < float(
        row_error(plain).sum())


# --- the config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(FP8_PRESETS))
def test_quantization_config_is_compressed_tensors_and_llm_compressors_preset(preset: str) -> None:
    config = float_quantized.quantization_config(FP8_PRESETS[preset])
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "float-quantized" and parsed.quant_method == "compressed-tensors"
    group = parsed.config_groups["group_0"]
    reference = preset_name_to_scheme(LLM_COMPRESSOR_PRESET[preset], ["Linear"])
    fields = ("num_bits", "type", "strategy", "dynamic", "symmetric", "group_size", "block_structure")
    for ours, theirs in ((group.weights, reference.weights), (group.input_activations, reference.input_activations)):
        assert ours is not None and theirs is not None
        assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert group.format == "float-quantized" and group.output_activations is None
    assert float_quantized.scheme_from_config(config) == FP8_PRESETS[preset]


# --- end to end ------------------------------------------------------------------------------------------


def _fake_quantized(model_dir: Path, scheme: QuantScheme) -> torch.nn.Module:
    """The original model with every decoder Linear replaced by our dequantized FP8 weight (float32 compute)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stored = json.loads((model_dir / "config.json").read_text())
    dtype = getattr(torch, stored.get("dtype") or stored["torch_dtype"])
    with torch.no_grad():
        for layer in model.model.layers:
            for name in LINEARS:
                linear = layer.get_submodule(name)
                original = linear.weight.to(dtype)
                qt = fp8_quantize(original, scheme, scale_dtype=dtype)
                linear.weight.copy_(qt.dequantize(dtype).to(torch.float32))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(ids).logits


# the presets, and the explicit form: static activations with one weight scale per output channel
CHANNEL_STATIC = dataclasses.replace(FP8_PRESETS["fp8-static"], strategy="channel")
END_TO_END = [*FP8_PRESETS.values(), CHANNEL_STATIC]


@pytest.mark.parametrize("scheme", END_TO_END, ids=[*FP8_PRESETS, "channel-static"])
def test_fp8_checkpoint_loads_in_transformers_with_our_logits(
    make_spec: Callable[..., JobSpec], tiny_model_dir: Path, block_model_dir: Path, tmp_path: Path,
    scheme: QuantScheme,
) -> None:
    model_dir = block_model_dir if scheme.strategy == "block" else tiny_model_dir
    spec = dataclasses.replace(
        make_spec("rtn", model_dir=model_dir, calibration=scheme.activations == "static", num_samples=8, seq_len=32),
        scheme=scheme, observer="minmax",  # min-max scales, as llm-compressor's presets (the "mse" choice: below)
    )
    out = tmp_path / "out"
    report = run_local(spec, out)
    assert report.eval is not None and report.bits == 8  # evaluated through our reader of the FP8 checkpoint

    # config.json: compressed-tensors' own model accepts it
    config = json.loads((out / "config.json").read_text())
    assert QuantizationConfig.model_validate(config["quantization_config"]).format == "float-quantized"

    # tensors: exactly what vLLM's CompressedTensorsW8A8Fp8 loads
    tensors = load_file(str(out / "model.safetensors"))
    original = load_file(str(model_dir / "model.safetensors"))
    dtype = next(iter(original.values())).dtype
    for layer in range(2):
        for name in LINEARS:
            prefix = f"model.layers.{layer}.{name}."
            w = original[prefix + "weight"]
            out_f, in_f = w.shape
            names = {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)}
            assert names == ({"weight", "weight_scale", "input_scale"} if scheme.activations == "static"
                             else {"weight", "weight_scale"})
            assert tensors[prefix + "weight"].dtype == torch.float8_e4m3fn
            assert tensors[prefix + "weight"].shape == (out_f, in_f)
            scale = tensors[prefix + "weight_scale"]
            expected_shape = {"channel": (out_f, 1), "tensor": (1,), "block": (-(-out_f // 128), -(-in_f // 128))}
            assert scale.dtype == dtype and tuple(scale.shape) == expected_shape[str(scheme.strategy)]
            if scheme.activations == "static":
                assert tensors[prefix + "input_scale"].dtype == dtype and tensors[prefix + "input_scale"].shape == (1,)
            # the codes: torch's own cast of w / scale
            expanded = fp8_quantize(w, scheme, scale_dtype=dtype)
            assert torch.equal(scale.to(torch.float32), expanded.scale)
            assert torch.equal(tensors[prefix + "weight"].view(torch.uint8), expanded.q.view(torch.uint8))
    assert "lm_head.weight" not in tensors or tensors["lm_head.weight"].dtype == dtype

    # an independent dequantizer (transformers + compressed-tensors) gives the fake-quantized model's logits
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    ).eval()
    reference = _fake_quantized(model_dir, scheme)
    ours, theirs = _logits(reference), _logits(loaded)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-3
    # and our own reader agrees with it weight for weight (both dequantize into the model dtype)
    dense = QuantizedCheckpoint(out).dense_prefix("model.layers.1.", dtype=dtype)
    assert torch.equal(dense["mlp.down_proj.weight"], loaded.model.layers[1].mlp.down_proj.weight.to(dtype))


@pytest.mark.parametrize("preset", list(FP8_PRESETS))
def test_fp8_gptq_checkpoint_beats_rtn_and_loads_in_transformers(
    make_spec: Callable[..., JobSpec], tiny_model_dir: Path, block_model_dir: Path, tmp_path: Path, preset: str
) -> None:
    """Method gptq with an FP8 scheme: min-max scales (RTN's per-channel ones are the "mse" observer's choice), the
    same layer-0 input scales, other E4M3 codes, a lower Hessian-weighted output error for the layer as a whole, and
    a checkpoint transformers + compressed-tensors dequantizes to exactly our reader's weights."""
    scheme = FP8_PRESETS[preset]
    model_dir = block_model_dir if scheme.strategy == "block" else tiny_model_dir
    reports = {m: run_local(dataclasses.replace(make_spec(m, model_dir=model_dir, num_samples=8, seq_len=32),
                                                scheme=scheme), tmp_path / m) for m in ("rtn", "gptq")}
    errors = {m: sum(e.error for e in r.module_errors) for m, r in reports.items()}
    assert [e.module for e in reports["gptq"].module_errors] == [e.module for e in reports["rtn"].module_errors]
    assert errors["gptq"] < 0.9 * errors["rtn"], errors
    assert not reports["gptq"].fallback_modules
    rtn, gptq = (load_file(str(tmp_path / m / "model.safetensors")) for m in ("rtn", "gptq"))
    assert rtn.keys() == gptq.keys()
    original = load_file(str(model_dir / "model.safetensors"))
    for name in rtn:  # input scales: layer 0's only, later layers' inputs come from each job's quantized layers
        if name.endswith("input_scale") and name.startswith("model.layers.0."):
            assert torch.equal(rtn[name], gptq[name]), name
        if name.endswith("weight_scale"):  # GPTQ: min-max; RTN: per channel one of the "mse" observer's candidates
            w = original[name.removesuffix("_scale")].float()
            assert torch.equal(gptq[name].float(), min_max_scale(w, scheme, gptq[name].dtype).reshape(gptq[name].shape))
            factors = CHANNEL_SCALE_FACTORS if scheme.strategy == "channel" else (1.0,)
            candidates = [min_max_scale(w, scheme, rtn[name].dtype, f).reshape(rtn[name].shape) for f in factors]
            assert bool(torch.stack([rtn[name].float() == c for c in candidates]).any(dim=0).all()), name
    codes = [n for n in rtn if rtn[n].dtype == torch.float8_e4m3fn]
    assert any(not torch.equal(rtn[n].view(torch.uint8), gptq[n].view(torch.uint8)) for n in codes)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "gptq", quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    )
    dtype = next(iter(load_file(str(model_dir / "model.safetensors")).values())).dtype
    for layer in range(2):
        dense = QuantizedCheckpoint(tmp_path / "gptq").dense_prefix(f"model.layers.{layer}.", dtype=dtype)
        for name in LINEARS:
            theirs = loaded.model.layers[layer].get_submodule(name).weight.to(dtype)
            assert torch.equal(dense[f"{name}.weight"], theirs), (layer, name)


def test_static_input_scale_is_max_abs_input_over_calibration_over_448(
    make_spec: Callable[..., JobSpec], tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = fp8_spec(make_spec, "fp8-static", with_eval=False, num_samples=8, seq_len=32)
    out = tmp_path / "out"
    run_local(spec, out)
    tensors = load_file(str(out / "model.safetensors"))

    # The inputs each Linear of layer i sees during calibration: the engine quantizes sequentially, so layers
    # before i are quantized and layer i itself is still the original (its inputs are captured before it is
    # solved); the same windows through transformers' own model.
    windows = calibration_windows(spec.calibration, AutoTokenizer.from_pretrained(tiny_model_dir))
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    quantized = _fake_quantized(tiny_model_dir, spec.scheme)
    seen: dict[str, float] = {}
    for index in range(len(original.model.layers)):
        model = copy.deepcopy(quantized)
        model.model.layers[index] = original.model.layers[index]
        hooks = []
        for name in LINEARS:
            key = f"model.layers.{index}.{name}"

            def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], key: str = key) -> None:
                seen[key] = max(seen.get(key, 0.0), float(args[0].abs().max()))

            hooks.append(model.model.layers[index].get_submodule(name).register_forward_pre_hook(hook))
        with torch.no_grad():
            model(windows)
        for handle in hooks:
            handle.remove()
    assert len(seen) == 2 * len(LINEARS)
    for key, amax in seen.items():
        stored = float(tensors[f"{key}.input_scale"])
        assert stored == pytest.approx(amax / 448, rel=2e-3), key  # fp16 storage, fp16 vs fp32 layer compute
    q, k = float(tensors["model.layers.0.self_attn.q_proj.input_scale"]), float(tensors["model.layers.0.self_attn.k_proj.input_scale"])
    assert q == k  # one input, one range


# --- refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "awq"}, "FP8 schemes are quantized by method rtn or gptq"),
        ({"formats": (OutputFormat.COMPRESSED_TENSORS, OutputFormat.GPTQ)}, "GPTQ v1 has no FP8 layout"),
        ({"scheme": dataclasses.replace(FP8_PRESETS["fp8-dynamic"], bits=4)}, "not bits=4"),
        ({"scheme": dataclasses.replace(FP8_PRESETS["fp8-dynamic"], group_size=128)}, "FP8 weights take no group_size"),
        ({"scheme": dataclasses.replace(FP8_PRESETS["fp8-block"], activations="static")}, "block FP8 quantizes"),
        ({"scheme": FP8_PRESETS["fp8-static"], "calibration": None}, "static FP8 activation scales are observed"),
        ({"scheme": QuantScheme(bits=4, group_size=32, activations="static")}, "integer schemes are weight-only"),
    ],
)
def test_invalid_fp8_specs_say_what_to_change(
    make_spec: Callable[..., JobSpec], change: dict[str, object], message: str
) -> None:
    change = dict(change)
    method = str(change.pop("method", "rtn"))
    kwargs: dict[str, object] = {}
    if "calibration" in change:
        kwargs["calibration"] = change.pop("calibration") is not None
    spec = make_spec(method, **kwargs)
    spec = dataclasses.replace(spec, **{"scheme": FP8_PRESETS["fp8-dynamic"], **change})  # type: ignore[arg-type]
    with pytest.raises(InvalidSpecError, match=message):
        spec.validate()


def test_block_fp8_on_dimensions_128_does_not_divide_is_refused_at_submit(make_spec: Callable[..., JobSpec]) -> None:
    spec = fp8_spec(make_spec, "fp8-block", calibration=False, with_eval=False)
    spec.validate()
    with pytest.raises(InvalidSpecError, match=r"block FP8 needs every quantized Linear's dimensions divisible by 128.*"
                                               r"\[64, 64\]; use scheme fp8-dynamic"):
        check_against_model(spec)
