"""The checkpoint-format interface: a format is one module of this package, found by `for_writing` /
`for_reading`, so a new format is one new file. A format module defines:

    OUTPUT: OutputFormat                            the job's output format it belongs to
    MARKER: str                                     the tensor suffix that marks a quantized Linear ("weight_packed")
    SUFFIXES: tuple[str, ...]                       every tensor suffix a quantized Linear may have
    writes(output: OutputFormat, scheme) -> bool    it is the format that writes `scheme` as `output`
    reads(quant_config: dict) -> bool               it reads checkpoints whose config.json has this quantization_config
    check_scheme(scheme) -> None                    InvalidSpecError (saying what to change) if it cannot hold `scheme`
    quantization_config(scheme, *, act_order) -> dict     the config document (config.json's quantization_config)
    linear_tensors(qt, dtype) -> dict[str, Tensor]        writer: one quantized Linear's tensors, keyed by suffix
    from_linear_tensors(tensors, scheme) -> QuantizedTensor  reader: the same tensors back
    read_scheme(quant_config) -> (scheme, act_order)      reader: the grid a config document describes

`workers/formats/writer.py` streams any such format into sharded safetensors with config.json, and
`workers/formats/reader.py` reads it back lazily; neither names a format. Formats today: compressed-tensors
pack-quantized (`compressed_tensors.py`), float-quantized FP8 (`float_quantized.py`) and GPTQ v1 (`gptq_v1.py`).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import Tensor

from workers.errors import InvalidSpecError
from workers.quant.grid import QuantizedTensor
from workers.spec import OutputFormat, QuantScheme

NOT_FORMATS = {"base", "reader", "writer", "packing"}  # modules of the package that are no format


class CheckpointFormat(Protocol):
    OUTPUT: OutputFormat
    MARKER: str
    SUFFIXES: tuple[str, ...]

    def writes(self, output: OutputFormat, scheme: QuantScheme) -> bool: ...
    def reads(self, quant_config: dict[str, Any]) -> bool: ...
    def check_scheme(self, scheme: QuantScheme) -> None: ...
    def quantization_config(self, scheme: QuantScheme, *, act_order: bool = False) -> dict[str, Any]: ...
    def linear_tensors(self, qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Tensor]: ...
    def from_linear_tensors(self, tensors: dict[str, Tensor], scheme: QuantScheme) -> QuantizedTensor: ...
    def read_scheme(self, quant_config: dict[str, Any]) -> tuple[QuantScheme, bool]: ...


def formats() -> list[ModuleType]:
    """Every format module of this package (those defining both `writes` and `reads`), by file name."""
    package = importlib.import_module("workers.formats")
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in NOT_FORMATS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"workers.formats.{info.name}")
        if callable(getattr(module, "writes", None)) and callable(getattr(module, "reads", None)):
            found.append(module)
    return found


def for_writing(output: OutputFormat, scheme: QuantScheme) -> CheckpointFormat:
    """The format that writes `scheme` as `output`; InvalidSpecError if none does."""
    for module in formats():
        if module.writes(output, scheme):
            fmt: CheckpointFormat = module  # type: ignore[assignment]
            return fmt
    raise InvalidSpecError(f"no checkpoint format writes {scheme} as {output!r}")


def for_reading(quant_config: dict[str, Any]) -> CheckpointFormat | None:
    """The format that reads a checkpoint with this `quantization_config`, if any."""
    for module in formats():
        if module.reads(quant_config):
            fmt: CheckpointFormat = module  # type: ignore[assignment]
            return fmt
    return None
