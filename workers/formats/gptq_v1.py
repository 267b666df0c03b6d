"""GPTQ v1 checkpoints (AutoGPTQ / GPTQModel `checkpoint_format: gptq`; vLLM `gptq` and `gptq_marlin`).

Per quantized Linear `<module>` with weight `[out, in]` and pf = 32 / bits values per word:
  qweight  int32 `[in / pf, out]`: unsigned q (= signed q + 2^(bits-1)) packed LSB-first along the input dim
  qzeros   int32 `[n_groups, out / pf]`: (unsigned zero − 1) packed LSB-first along the output dim
  scales   float16 `[n_groups, out]`
  g_idx    int32 `[in]` = j // group_size (we only write "static" act-order, so the order stays plain)
and w[j, :] = scales[g_idx[j]] · (q[j] − (qzeros[g_idx[j]] + 1)).

The "− 1" is v1's historical quirk: a stored zero of 0 would need −1, which loaders read back as 2^bits − 1,
so an asymmetric group whose unsigned zero point is 0 (no negative weights) cannot be written; we refuse it
rather than write a checkpoint that dequantizes wrongly. Only 2, 4 and 8 bits have a v1 layout.

Modules kept dense (lm_head, MoE routers and gates, multimodal towers) are listed in `quantization_config.dynamic`
as GPTQModel's negative rules, `"-:<regex>": {}` (`skip_dense`). vLLM (0.26, `gptq` and `gptq_marlin`,
utils/gptq_utils.py `get_dynamic_override`) reads `dynamic` from the config and builds a module whose prefix
`re.match`es a negative rule unquantized (Linears and fused MoE layers alike); GPTQModel's own loader does the
same. transformers' GPTQ loader (optimum's `GPTQQuantizer`) has no `dynamic` argument and ignores it: it
replaces the `nn.Linear`s under the one block list it finds, filtered by `modules_in_block_to_quantize` only
(transformers 5's routers are no Linears, and it cannot put per-expert Linears into fused experts anyway). The rules are those of compressed-tensors' `ignore`
(workers/multimodal.py): `re.match` against the module name, anchored at the end.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from workers.errors import InputError, InvalidSpecError
from workers.formats.packing import pack_int32, unpack_int32
from workers.quant.grid import QuantizedTensor
from workers.spec import OutputFormat, QuantScheme

GPTQ_BITS = (2, 4, 8)
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
MARKER = "qweight"
OUTPUT = OutputFormat.GPTQ


def writes(output: OutputFormat, scheme: QuantScheme) -> bool:
    return output is OutputFormat.GPTQ


def reads(quant_config: dict[str, Any]) -> bool:
    return quant_config.get("quant_method") == "gptq"


def check_scheme(scheme: QuantScheme) -> None:
    scheme.validate()
    if scheme.bits not in GPTQ_BITS:
        raise InvalidSpecError(f"the gptq output format supports bits 2, 4 and 8, not {scheme.bits}")


def quantization_config(scheme: QuantScheme, *, act_order: bool = False) -> dict[str, Any]:
    """The `quantization_config` entry of config.json. Static act-order needs no desc_act: g_idx is plain."""
    check_scheme(scheme)
    return {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": False,
        "sym": scheme.symmetric,
        "checkpoint_format": "gptq",
        "lm_head": False,
    }


def skip_dense(quant_config: dict[str, Any], entries: list[str], lm_head: str = "lm_head") -> None:
    """Add a negative `dynamic` rule to `quant_config` for each compressed-tensors style `ignore` entry ("re:<regex>"
    or a literal module name) and, with them, for the output head (see the module docstring)."""
    if not entries:  # only the head: `"lm_head": false` says it (and the bytes of dense checkpoints stay as they were)
        return
    dynamic: dict[str, Any] = quant_config.setdefault("dynamic", {})
    for entry in [*entries, f"re:(.*\\.)?{re.escape(lm_head)}$"]:
        regex = entry.removeprefix("re:") if entry.startswith("re:") else f"{re.escape(entry)}$"
        dynamic.setdefault(f"-:{regex}", {})


def dense_rules(quant_config: dict[str, Any]) -> list[str]:
    """The regexes of the negative `dynamic` rules of a config (what vLLM skips)."""
    return [key.removeprefix("-:") for key in quant_config.get("dynamic", {}) if key.startswith("-:")]


def linear_tensors(qt: QuantizedTensor, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """The tensors of one quantized Linear, keyed by suffix.

    Scales are always float16 in this format (`dtype` is accepted for symmetry with the compressed-tensors
    writer and ignored): quantize with `scale_dtype=torch.float16` (or a float16/bfloat16 model) and the
    export dequantizes to exactly `qt.dequantize()`; float32 scales are rounded here.
    """
    scheme = qt.scheme
    check_scheme(scheme)
    bits, (out, n) = scheme.bits, qt.shape
    per_word = 32 // bits
    if n % per_word or out % per_word:
        raise InvalidSpecError(
            f"gptq format needs in and out features divisible by {per_word} for {bits}-bit, got [{out}, {n}]"
        )
    scales = qt.scale.T.contiguous()  # [n_groups, out]
    fp16 = torch.finfo(torch.float16)
    if bool((scales > fp16.max).any()) or not bool(torch.isfinite(scales).all()):
        raise InvalidSpecError(
            f"a scale ({float(scales.max()):g}) does not fit in float16 (max {fp16.max:g}); "
            "the gptq format stores float16 scales: use the compressed-tensors format for this model"
        )
    offset = 2 ** (bits - 1)
    zeros = torch.full_like(scales, offset, dtype=torch.int32)
    if qt.zero_point is not None:
        zeros = qt.zero_point.T.to(torch.int32) + offset
        if bool((zeros == 0).any()):
            raise InvalidSpecError(
                "a group has asymmetric zero point 0 (no negative weights), which gptq v1 checkpoints cannot "
                "store (they keep zero − 1); use symmetric quantization or the compressed-tensors format"
            )
    group = n if scheme.group_size == -1 else scheme.group_size
    return {
        "qweight": pack_int32(qt.q.to(torch.int32) + offset, bits).T.contiguous(),
        "qzeros": pack_int32(zeros - 1, bits),
        # the smallest float16 subnormal keeps a tiny (underflowing) scale from becoming 0
        "scales": scales.clamp(min=2.0**-24).to(torch.float16),
        "g_idx": (torch.arange(n) // group).to(torch.int32),
    }


def from_linear_tensors(tensors: dict[str, Tensor], scheme: QuantScheme) -> QuantizedTensor:
    """Rebuild the QuantizedTensor of one Linear (needs the plain g_idx = j // group we write)."""
    missing = [k for k in SUFFIXES if k not in tensors]
    if missing:
        raise InputError(f"gptq Linear is missing {', '.join(missing)}")
    bits = scheme.bits
    offset = 2 ** (bits - 1)
    per_word = 32 // bits
    n, out = tensors["qweight"].shape[0] * per_word, tensors["qweight"].shape[1]
    group = n if scheme.group_size == -1 else scheme.group_size
    if not torch.equal(tensors["g_idx"].to(torch.int64).cpu(), torch.arange(n) // group):
        raise InputError("gptq checkpoints with reordered g_idx (desc_act) are not supported")
    q = (unpack_int32(tensors["qweight"].T.contiguous(), bits, n) - offset).to(torch.int8)
    zero = (unpack_int32(tensors["qzeros"], bits, out) + 1).T.contiguous()  # [out, n_groups], unsigned
    scale = tensors["scales"].T.to(torch.float32).contiguous()
    zero_point = None if scheme.symmetric else (zero - offset).to(torch.int8)
    return QuantizedTensor(q, scale, zero_point, scheme)


def read_scheme(quant_config: dict[str, Any]) -> tuple[QuantScheme, bool]:
    return scheme_from_config(quant_config), False


def scheme_from_config(quant_config: dict[str, Any]) -> QuantScheme:
    if quant_config.get("checkpoint_format", "gptq") != "gptq" or quant_config.get("desc_act"):
        raise InputError("only gptq v1 checkpoints without desc_act are supported")
    return QuantScheme(
        bits=int(quant_config["bits"]),
        group_size=int(quant_config["group_size"]),
        symmetric=bool(quant_config["sym"]),
    )


def dequantize_gptq_v1(tensors: dict[str, Tensor], bits: int, group_size: int) -> Tensor:
    """Reference dequantization `[out, in]` float32, written like AutoGPTQ's (shifts and masks over the
    stored words, honouring g_idx) and independent of our packer, so tests can check one against the other."""
    qweight, qzeros, scales, g_idx = (tensors[k] for k in SUFFIXES)
    per_word, mask = 32 // bits, 2**bits - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    weight_int = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [in/pf, pf, out]
    weight_int = weight_int.reshape(-1, qweight.shape[1])  # [in, out]
    zeros = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask  # [groups, out/pf, pf]
    zeros = zeros.reshape(qzeros.shape[0], -1) + 1  # [groups, out]
    n = qweight.shape[0] * per_word
    if g_idx.shape[0] != n or scales.shape[0] != (1 if group_size == -1 else n // group_size):
        raise ValueError(f"g_idx / scales do not fit {n} input features with group_size {group_size}")
    groups = g_idx.long()
    dense = scales[groups].to(torch.float32) * (weight_int - zeros[groups]).to(torch.float32)
    return dense.T.contiguous()
