"""compressed-tensors `float-quantized` checkpoints: FP8 E4M3 weights (and activations), as vLLM reads them.

Per quantized Linear `<module>` with weight `[out, in]` (llm-compressor's FP8_DYNAMIC / FP8 / FP8_BLOCK):
  weight        float8_e4m3fn `[out, in]`
  weight_scale  model dtype `[out, 1]` (strategy channel), `[1]` (tensor) or `[ceil(out/128), ceil(in/128)]`
                (block, `block_structure [128, 128]`)
  input_scale   model dtype `[1]`: only for static activations (max|x| / 448 over the calibration tokens)
and dequantization is weight · scale (workers/quant/fp8.py). Dynamic activations are quantized by the runtime:
per token (channel/tensor weights) or per 128-column group of each token (block weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from workers.errors import InputError, InvalidSpecError
from workers.formats.compressed_tensors import config_group_document
from workers.quant.fp8 import FloatQuantizedTensor
from workers.quant.grid import QuantizedTensor
from workers.spec import FP8_BLOCK, Activations, OutputFormat, QuantScheme

FORMAT = "float-quantized"
SUFFIXES = ("weight", "weight_scale", "input_scale")
MARKER = "weight_scale"  # the tensor that tells a quantized Linear from a dense one
OUTPUT = OutputFormat.COMPRESSED_TENSORS


def _args(strategy: str, *, dynamic: bool, group_size: int | None = None, block: bool = False) -> dict[str, Any]:
    """One QuantizationArgs entry of FP8 (E4M3, symmetric), with the fields compressed-tensors 0.19/0.20 dump."""
    return {
        "actorder": None,
        "block_structure": [FP8_BLOCK, FP8_BLOCK] if block else None,
        "dynamic": dynamic,
        "group_size": group_size,
        "num_bits": 8,
        "observer": None if dynamic else "memoryless_minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
        "zp_dtype": None,
    }


def writes(output: OutputFormat, scheme: QuantScheme) -> bool:
    """FP8 schemes, as compressed-tensors."""
    return output is OutputFormat.COMPRESSED_TENSORS and scheme.is_float


def reads(quant_config: dict[str, Any]) -> bool:
    return quant_config.get("quant_method") == "compressed-tensors" and quant_config.get("format") == FORMAT


def check_scheme(scheme: QuantScheme) -> None:
    scheme.validate()
    if not scheme.is_float:
        raise InvalidSpecError(f"the {FORMAT} format holds FP8 schemes (type 'float'), not {scheme}")


def quantization_config(scheme: QuantScheme, *, act_order: bool = False) -> dict[str, Any]:
    """The `quantization_config` entry of config.json, as llm-compressor writes it for its FP8 presets."""
    check_scheme(scheme)
    strategy = str(scheme.strategy)
    weights = _args(strategy, dynamic=False, block=strategy == "block")
    if scheme.activations == "static":
        inputs = _args("tensor", dynamic=False)
        inputs["observer"] = "static_minmax"
    elif strategy == "block":
        inputs = _args("group", dynamic=True, group_size=FP8_BLOCK)
    else:
        inputs = _args("token", dynamic=True)
    return config_group_document(FORMAT, weights, inputs)


def linear_tensors(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of one FP8 Linear, keyed by suffix (prefix them with "<module>.")."""
    if not isinstance(qt, FloatQuantizedTensor) or qt.q.dtype != torch.float8_e4m3fn:
        raise InvalidSpecError(f"the {FORMAT} format takes FP8 weights, got {type(qt).__name__} of {qt.q.dtype}")
    tensors = {"weight": qt.q.contiguous(), "weight_scale": qt.scale.to(dtype).contiguous()}
    if qt.scheme.activations == "static":
        if qt.input_scale is None:
            raise InvalidSpecError("static FP8 activations need an input_scale from calibration, and none was observed")
        tensors["input_scale"] = qt.input_scale.to(dtype).reshape(1).contiguous()
    return tensors


def from_linear_tensors(tensors: dict[str, Tensor], scheme: QuantScheme) -> FloatQuantizedTensor:
    """Rebuild the FloatQuantizedTensor of one Linear from its stored tensors (suffix → tensor)."""
    missing = [k for k in SUFFIXES[:2] if k not in tensors]
    if scheme.activations == "static" and "input_scale" not in tensors:
        missing.append("input_scale")
    if missing:
        raise InputError(f"{FORMAT} Linear is missing {', '.join(missing)}")
    if tensors["weight"].dtype != torch.float8_e4m3fn:
        raise InputError(f"{FORMAT} weight must be float8_e4m3fn, not {tensors['weight'].dtype}")
    scale = tensors["weight_scale"].to(torch.float32)
    input_scale = tensors["input_scale"].to(torch.float32) if "input_scale" in tensors else None
    return FloatQuantizedTensor(tensors["weight"], scale, None, scheme, input_scale)


def scheme_from_config(quant_config: dict[str, Any]) -> QuantScheme:
    """The FP8 scheme of a float-quantized config with one config group, as we (and llm-compressor) write it."""
    groups = list(quant_config.get("config_groups", {}).values())
    if quant_config.get("format") != FORMAT or len(groups) != 1 or not groups[0].get("weights"):
        raise InputError(f"only compressed-tensors {FORMAT} checkpoints with one config group are supported")
    w, a = groups[0]["weights"], groups[0].get("input_activations")
    if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
        raise InputError(f"{FORMAT}: only 8-bit float (FP8 E4M3) weights are supported, got {w}")
    strategy = w.get("strategy")
    if strategy == "block" and list(w.get("block_structure") or []) != [FP8_BLOCK, FP8_BLOCK]:
        raise InputError(f"{FORMAT}: only {FP8_BLOCK}×{FP8_BLOCK} weight blocks are supported, got {w}")
    activations: Activations = "static" if a and not a.get("dynamic") else "dynamic"
    scheme = QuantScheme(bits=8, group_size=-1, symmetric=True, type="float", strategy=strategy, activations=activations)
    try:
        scheme.validate()
    except InvalidSpecError as e:
        raise InputError(f"{FORMAT}: {e}") from e
    return scheme


def read_scheme(quant_config: dict[str, Any]) -> tuple[QuantScheme, bool]:
    return scheme_from_config(quant_config), False
