"""compressed-tensors `pack-quantized` checkpoints (what vLLM and llm-compressor use natively).

Per quantized Linear `<module>` with weight `[out, in]`:
  weight_packed      int32 `[out, ceil(in·bits/32)]`: q + 2^(bits-1) packed LSB-first along the input dim
  weight_scale       model dtype `[out, n_groups]` (`[out, 1]` per channel)
  weight_shape       int64 `[2]` = (out, in)
  weight_zero_point  int32 `[ceil(out·bits/32), n_groups]`: zero + 2^(bits-1) packed along the *output*
                     dim; only for asymmetric grids
and dequantization is (q - zero) · scale in the signed domain, as in `workers.quant.grid`.
"""

from __future__ import annotations

from typing import Any

import compressed_tensors
import torch
from torch import Tensor

from workers.errors import InputError
from workers.formats.packing import pack_int32, unpack_int32
from workers.quant.grid import QuantizedTensor
from workers.spec import OutputFormat, QuantScheme

FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
MARKER = "weight_packed"
OUTPUT = OutputFormat.COMPRESSED_TENSORS


def writes(output: OutputFormat, scheme: QuantScheme) -> bool:
    """Integer weight-only grids, as compressed-tensors."""
    return output is OutputFormat.COMPRESSED_TENSORS and scheme.type == "int" and scheme.activations == "none"


def reads(quant_config: dict[str, Any]) -> bool:
    return quant_config.get("quant_method") == "compressed-tensors" and quant_config.get("format") == FORMAT


def check_scheme(scheme: QuantScheme) -> None:
    scheme.validate()


def quantization_config(scheme: QuantScheme, *, act_order: bool = False) -> dict[str, Any]:
    """The `quantization_config` entry of config.json, as llm-compressor writes it for W{bits}A16."""
    scheme.validate()
    weights: dict[str, Any] = {
        "actorder": "static" if act_order else None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None if scheme.group_size == -1 else scheme.group_size,
        "num_bits": scheme.bits,
        "observer": "memoryless_minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": "channel" if scheme.group_size == -1 else "group",
        "symmetric": scheme.symmetric,
        "type": "int",
        "zp_dtype": None,
    }
    return config_group_document(FORMAT, weights)


def config_group_document(
    fmt: str, weights: dict[str, Any], input_activations: dict[str, Any] | None = None
) -> dict[str, Any]:
    """config.json's `quantization_config`: one config group of Linears in format `fmt` (lm_head kept dense),
    shared by every compressed-tensors format QuantFleet writes."""
    return {
        "config_groups": {
            "group_0": {
                "format": fmt,
                "input_activations": input_activations,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": compressed_tensors.__version__,
    }


def linear_tensors(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of one quantized Linear, keyed by suffix (prefix them with "<module>.")."""
    bits = qt.scheme.bits
    offset = 2 ** (bits - 1)
    out, n = qt.shape
    tensors = {
        "weight_packed": pack_int32(qt.q.to(torch.int32) + offset, bits),
        "weight_scale": qt.scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor([out, n], dtype=torch.int64),
    }
    if qt.zero_point is not None:
        zero = qt.zero_point.to(torch.int32) + offset  # [out, n_groups] → packed along out
        tensors["weight_zero_point"] = pack_int32(zero.T.contiguous(), bits).T.contiguous()
    return tensors


def from_linear_tensors(tensors: dict[str, Tensor], scheme: QuantScheme) -> QuantizedTensor:
    """Rebuild the QuantizedTensor of one Linear from its stored tensors (suffix → tensor)."""
    missing = [k for k in SUFFIXES[:3] if k not in tensors]
    if not scheme.symmetric and "weight_zero_point" not in tensors:
        missing.append("weight_zero_point")
    if missing:
        raise InputError(f"pack-quantized Linear is missing {', '.join(missing)}")
    bits = scheme.bits
    offset = 2 ** (bits - 1)
    out, n = (int(v) for v in tensors["weight_shape"].tolist())
    scale = tensors["weight_scale"].to(torch.float32)
    q = (unpack_int32(tensors["weight_packed"], bits, n) - offset).to(torch.int8)
    zero_point = None
    if not scheme.symmetric:
        packed_zero = tensors["weight_zero_point"].T.contiguous()  # [n_groups, words along out]
        zero_point = (unpack_int32(packed_zero, bits, out) - offset).T.contiguous().to(torch.int8)
    return QuantizedTensor(q, scale, zero_point, scheme)


def scheme_from_config(quant_config: dict[str, Any]) -> tuple[QuantScheme, bool]:
    """(scheme, act_order) of a pack-quantized config with one int weight-only group, as we write them."""
    groups = list(quant_config.get("config_groups", {}).values())
    if quant_config.get("format") != FORMAT or len(groups) != 1 or not groups[0].get("weights"):
        raise InputError(
            "only compressed-tensors pack-quantized checkpoints with one weight-only config group are supported"
        )
    w = groups[0]["weights"]
    group_size = -1 if w.get("strategy") == "channel" else int(w["group_size"])
    scheme = QuantScheme(bits=int(w["num_bits"]), group_size=group_size, symmetric=bool(w["symmetric"]))
    return scheme, w.get("actorder") is not None


def read_scheme(quant_config: dict[str, Any]) -> tuple[QuantScheme, bool]:
    return scheme_from_config(quant_config)
