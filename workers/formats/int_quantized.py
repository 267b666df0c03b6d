"""compressed-tensors `int-quantized` checkpoints: integer W8A8 (int8 weights, int8 activations), as vLLM reads
them (llm-compressor's W8A8 preset, vLLM's CompressedTensorsW8A8Int8).

Per quantized Linear `<module>` with weight `[out, in]`:
  weight        int8 `[out, in]`: the signed codes q (no offset, no packing)
  weight_scale  model dtype `[out, 1]`: one symmetric scale per output channel
and dequantization is q · scale (workers/quant/grid.py, bits 8, group_size -1). Activations are quantized by
the runtime: per token, dynamically, symmetric int8 (workers/quant/int8.py emulates it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from workers.errors import InputError, InvalidSpecError
from workers.formats.compressed_tensors import config_group_document
from workers.quant.grid import QuantizedTensor
from workers.spec import W8A8_INT8, OutputFormat, QuantScheme

FORMAT = "int-quantized"
SUFFIXES = ("weight", "weight_scale")
MARKER = "weight_scale"  # the tensor that tells a quantized Linear from a dense one
OUTPUT = OutputFormat.COMPRESSED_TENSORS


def writes(output: OutputFormat, scheme: QuantScheme) -> bool:
    """Integer W8A8 (int8 weights and per-token int8 activations), as compressed-tensors."""
    return output is OutputFormat.COMPRESSED_TENSORS and scheme.is_w8a8_int


def reads(quant_config: dict[str, Any]) -> bool:
    return quant_config.get("quant_method") == "compressed-tensors" and quant_config.get("format") == FORMAT


def _args(strategy: str, *, dynamic: bool) -> dict[str, Any]:
    """One QuantizationArgs entry of symmetric int8, with the fields compressed-tensors 0.19/0.20 dump."""
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": dynamic,
        "group_size": None,
        "num_bits": 8,
        "observer": None if dynamic else "memoryless_minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": strategy,
        "symmetric": True,
        "type": "int",
        "zp_dtype": None,
    }


def check_scheme(scheme: QuantScheme) -> None:
    scheme.validate()
    if scheme != W8A8_INT8:
        raise InvalidSpecError(f"the {FORMAT} format holds W8A8 int8 (scheme w8a8-int8), not {scheme}")


def quantization_config(scheme: QuantScheme, *, act_order: bool = False) -> dict[str, Any]:
    """The `quantization_config` entry of config.json, as llm-compressor writes its W8A8 preset. `act_order`
    does not show: with one scale per row the column order of GPTQ's sweep leaves no trace in the layout."""
    check_scheme(scheme)
    return config_group_document(FORMAT, _args("channel", dynamic=False), _args("token", dynamic=True))


def linear_tensors(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of one W8A8 Linear, keyed by suffix (prefix them with "<module>.")."""
    if qt.scheme != W8A8_INT8 or qt.zero_point is not None or qt.scale.shape != (qt.shape[0], 1):
        raise InvalidSpecError(f"the {FORMAT} format takes per-channel symmetric int8 weights, got {qt.scheme}")
    return {"weight": qt.q.to(torch.int8).contiguous(), "weight_scale": qt.scale.to(dtype).contiguous()}


def from_linear_tensors(tensors: dict[str, Tensor], scheme: QuantScheme) -> QuantizedTensor:
    """Rebuild the QuantizedTensor of one Linear from its stored tensors (suffix → tensor)."""
    missing = [k for k in SUFFIXES if k not in tensors]
    if missing:
        raise InputError(f"{FORMAT} Linear is missing {', '.join(missing)}")
    if tensors["weight"].dtype != torch.int8:
        raise InputError(f"{FORMAT} weight must be int8, not {tensors['weight'].dtype}")
    return QuantizedTensor(tensors["weight"], tensors["weight_scale"].to(torch.float32).reshape(-1, 1), None, scheme)


def scheme_from_config(quant_config: dict[str, Any]) -> QuantScheme:
    """The W8A8 scheme of an int-quantized config with one config group, as we (and llm-compressor) write it."""
    groups = list(quant_config.get("config_groups", {}).values())
    if quant_config.get("format") != FORMAT or len(groups) != 1 or not groups[0].get("weights"):
        raise InputError(f"only compressed-tensors {FORMAT} checkpoints with one config group are supported")
    w, a = groups[0]["weights"], groups[0].get("input_activations") or {}
    wanted = {"type": "int", "num_bits": 8, "strategy": "channel", "symmetric": True}
    if {k: w.get(k) for k in wanted} != wanted or not a.get("dynamic") or a.get("strategy") != "token":
        raise InputError(
            f"{FORMAT}: only per-channel symmetric int8 weights with dynamic per-token int8 activations (W8A8) are"
            f" supported, got weights {w} and activations {a}"
        )
    return W8A8_INT8


def read_scheme(quant_config: dict[str, Any]) -> tuple[QuantScheme, bool]:
    return scheme_from_config(quant_config), False
