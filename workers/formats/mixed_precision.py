"""compressed-tensors `mixed-precision` checkpoints: integer weight-only grids that differ per Linear (W4A16
mixed precision), each Linear's tensors exactly as `pack-quantized` stores them (workers/formats/
compressed_tensors.py), one config group per grid whose `targets` are the full names of its Linears:

    "config_groups": {"group_0": {"format": "pack-quantized", "targets": ["model.layers.0.self_attn.q_proj", ...],
                                  "weights": {"num_bits": 8, ...}}, "group_1": {...}},
    "format": "mixed-precision"

vLLM and compressed-tensors match a Linear to the group naming it exactly (a fused q/k/v or gate/up needs
one grid for all its parts, which is how workers/mixed_precision.py allocates).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from workers.errors import InputError, InvalidSpecError
from workers.formats import compressed_tensors
from workers.quant.grid import QuantizedTensor
from workers.spec import QuantScheme

FORMAT = "mixed-precision"
SUFFIXES = compressed_tensors.SUFFIXES
MARKER = "weight_packed"


def check_scheme(scheme: QuantScheme) -> None:
    scheme.validate()
    if scheme.is_float or scheme.activations != "none":
        raise InvalidSpecError(f"the {FORMAT} format mixes integer weight-only grids, not {scheme}")


class MixedPrecisionDocument:
    """Collects each written Linear's grid and builds the quantization_config of all of them."""

    def __init__(self) -> None:
        self.schemes: dict[str, QuantScheme] = {}

    def record(self, module_name: str, scheme: QuantScheme) -> None:
        check_scheme(scheme)
        self.schemes[module_name] = scheme

    def linear_tensors(self, qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Tensor]:
        return compressed_tensors.linear_tensors(qt, dtype)

    def quantization_config(self, scheme: QuantScheme, *, act_order: bool = False) -> dict[str, Any]:
        """config.json's quantization_config; `scheme` (the job's base grid) is unused: the recorded grids are."""
        if not self.schemes:
            raise InvalidSpecError("no quantized Linear was recorded for the mixed-precision config")
        return quantization_config(self.schemes, act_order=act_order)


def quantization_config(schemes: dict[str, QuantScheme], *, act_order: bool = False) -> dict[str, Any]:
    """One pack-quantized config group per distinct grid, in order of first appearance, targets by full name."""
    by_scheme: dict[QuantScheme, list[str]] = defaultdict(list)
    for name, scheme in schemes.items():
        by_scheme[scheme].append(name)
    groups = {}
    for i, (scheme, names) in enumerate(by_scheme.items()):
        group = copy.deepcopy(compressed_tensors.quantization_config(scheme, act_order=act_order)["config_groups"]["group_0"])
        if scheme.group_size == -1:
            group["weights"]["actorder"] = None  # act-order only shows in group layouts
        group["targets"] = sorted(names)
        groups[f"group_{i}"] = group
    document = compressed_tensors.config_group_document(FORMAT, {})
    document["config_groups"] = groups
    return document


def schemes_from_config(quant_config: dict[str, Any]) -> dict[str, QuantScheme]:
    """Full Linear name → grid of a mixed-precision config of pack-quantized groups (as written above)."""
    if quant_config.get("format") != FORMAT:
        raise InputError(f"not a compressed-tensors {FORMAT} config")
    schemes: dict[str, QuantScheme] = {}
    for name, group in quant_config.get("config_groups", {}).items():
        if group.get("format") != compressed_tensors.FORMAT or not group.get("weights"):
            raise InputError(f"{FORMAT} group {name}: only pack-quantized weight-only groups are supported")
        if any(t == "Linear" or t.startswith("re:") for t in group.get("targets", [])):
            raise InputError(f"{FORMAT} group {name}: only targets naming Linears exactly are supported")
        single = {"format": compressed_tensors.FORMAT, "config_groups": {"group_0": group}}
        scheme, _ = compressed_tensors.scheme_from_config(single)
        schemes.update(dict.fromkeys(group["targets"], scheme))
    return schemes
