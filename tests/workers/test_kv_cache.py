"""FP8 KV-cache scales (issue 12, item 1): `k_scale` / `v_scale` of every attention module, max|k_proj(x)| / 448
and max|v_proj(x)| / 448 over the calibration tokens, stored where compressed-tensors and vLLM look for them
(`<layer>.self_attn.k_scale`, `kv_cache_scheme` in the quantization_config)."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams
from compressed_tensors.quantization.quant_metadata import KVCacheScaleType
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils.quantization_config import CompressedTensorsConfig

from workers.calibration import calibration_windows
from workers.engine import run_local
from workers.errors import InvalidSpecError
from workers.formats.reader import QuantizedCheckpoint
from workers.spec import JobSpec, OutputFormat


def test_kv_cache_scales_are_where_compressed_tensors_puts_them_with_calibrated_values(
    make_spec: Callable[..., JobSpec], tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = dataclasses.replace(make_spec("gptq", num_samples=8, seq_len=32, with_eval=True), kv_cache_fp8=True)
    out = tmp_path / "out"
    report = run_local(spec, out)
    assert report.eval is not None  # our evaluation reads past the scales
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    quant_config = QuantizationConfig.model_validate(config["quantization_config"])
    kv = quant_config.kv_cache_scheme
    assert kv is not None and (kv.num_bits, kv.type, kv.strategy, kv.dynamic) == (8, "float", "tensor", False)

    # compressed-tensors' own initialisation of a KV-cache scheme registers `k`/`v` qparams on each attention
    # module (what its kv-cache lifecycle does; that lifecycle itself does not hook this transformers version's
    # attention forward): same names and shapes as ours
    skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    heads, head_dim = skeleton.config.num_key_value_heads, skeleton.config.head_dim
    for layer in skeleton.model.layers:
        for base in ("k", "v"):
            initialize_qparams(layer.self_attn, base, kv, observed_shape=(heads, None, head_dim),
                               observed_dtype=torch.float16, force_zero_point=False)
    names = (KVCacheScaleType.KEY.value, KVCacheScaleType.VALUE.value)
    expected = {name: tuple(p.shape) for name, p in skeleton.named_parameters() if name.endswith(names)}
    ours = {name: tuple(t.shape) for name, t in tensors.items() if name.endswith(("k_scale", "v_scale"))}
    assert ours == expected and len(ours) == 4
    assert all(tensors[name].dtype == torch.float16 for name in ours)
    assert set(QuantizedCheckpoint(out).dense_prefix("model.layers.0.")) >= {"self_attn.q_proj.weight"}

    # the values: max|k_proj(x)| / 448 over the calibration windows, each layer seeing the inputs the engine
    # calibrates it on (earlier layers quantized, as read back by transformers + compressed-tensors)
    windows = calibration_windows(spec.calibration, AutoTokenizer.from_pretrained(tiny_model_dir))
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    ).eval()
    for index in range(2):
        model = copy.deepcopy(quantized)
        model.model.layers[index] = original.model.layers[index]
        seen: dict[str, float] = {}

        def record(key: str, seen: dict[str, float] = seen) -> Callable[..., None]:
            return lambda _m, _a, output: seen.__setitem__(key, max(seen.get(key, 0.0), float(output.abs().max())))

        attention = model.model.layers[index].self_attn
        hooks = [attention.k_proj.register_forward_hook(record("k_scale")),
                 attention.v_proj.register_forward_hook(record("v_scale"))]
        with torch.no_grad():
            model(windows)
        for handle in hooks:
            handle.remove()
        for key, amax in seen.items():
            stored = float(tensors[f"model.layers.{index}.self_attn.{key}"])
            assert stored == pytest.approx(amax / 448, rel=2e-2), (index, key)  # fp16 engine vs fp32 here


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"calibration": False}, "observed on calibration data"),
        ({"formats": (OutputFormat.COMPRESSED_TENSORS, OutputFormat.GPTQ)}, "written only as compressed-tensors"),
    ],
)
def test_invalid_kv_cache_specs_say_what_to_change(
    make_spec: Callable[..., JobSpec], change: dict[str, object], message: str
) -> None:
    change = dict(change)
    calibration = bool(change.pop("calibration", True))
    spec = dataclasses.replace(make_spec("rtn" if not calibration else "gptq", calibration=calibration),
                               kv_cache_fp8=True, **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpecError, match=message):
        spec.validate()
