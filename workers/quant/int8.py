"""Per-token dynamic int8 activations, as W8A8 int8 runtimes compute them (vLLM's `scaled_int8_quant`).

Each token (row) x of a Linear's input gets its own symmetric scale at run time:

    scale = max|x| / 127      q = clamp(round(x / scale), -128, 127)      x̂ = q · scale

(round half to even; an all-zero row gets scale 1 and codes 0). The weights of W8A8 are the shared integer
grid at 8 bits with one scale per output channel (workers/quant/grid.py, scheme w8a8-int8); this module
emulates only the activation side, for evaluation and tests of the fake-quantized model.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MIN, INT8_MAX = -128, 127


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes like x, float32 scales `[..., 1]`) of `x` `[..., features]`, one scale per row."""
    values = x.to(torch.float32)
    amax = values.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.clamp(torch.round(values / scale), INT8_MIN, INT8_MAX).to(torch.int8), scale


def fake_quantize_per_token(x: Tensor) -> Tensor:
    """x quantized per token to int8 and back, in x's dtype."""
    q, scale = quantize_per_token(x)
    return (q.to(torch.float32) * scale).to(x.dtype)
