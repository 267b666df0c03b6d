"""Bits per weight of a written checkpoint: every stored byte of its quantized Linears (codes, scales, zero
points, shapes, input scales) per weight of the original Linears, from the safetensors headers alone."""

from __future__ import annotations

import math
from pathlib import Path

from workers.tensor_source import TensorSource

DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
MARKERS = ("weight_scale", "scales")  # every quantized Linear of our formats stores one of these (GPTQ v1: scales)


def bits_per_weight(original_dir: str | Path, quantized_dir: str | Path) -> float | None:
    """8 · (bytes of the quantized Linears' tensors) / (their weights in the original); None if none is quantized."""
    stored = TensorSource(quantized_dir).headers()
    original = TensorSource(original_dir).headers()
    modules = {name.rsplit(".", 1)[0] for name in stored if name.rsplit(".", 1)[-1] in MARKERS}
    weights = sum(math.prod(original[f"{m}.weight"][1]) for m in modules if f"{m}.weight" in original)
    if not weights:
        return None
    stored_bytes = sum(
        DTYPE_BYTES[dtype] * math.prod(shape) for name, (dtype, shape) in stored.items() if name.rsplit(".", 1)[0] in modules
    )
    return 8 * stored_bytes / weights
