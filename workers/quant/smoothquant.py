"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 quantization.

A Linear computes y = x·Wᵀ. For any positive per-input-channel s, y = (x / s)·(W·diag(s))ᵀ; dividing the
activations' channel j by s_j and multiplying the weights' column j by s_j leaves the output unchanged but
evens out the channels that per-token int8 activation quantization must share one scale across:

    s_j = max|X_j|^α / max|W_·j|^(1−α)        (α: the migration strength, 0.8 by default here)

max|X_j| is channel j's largest magnitude over all calibration tokens; max|W_·j| the largest magnitude of
column j over every Linear that reads the same input (q/k/v, gate/up: they share one s). Both are clamped
to at least 1e-5 (the reference code's rule), so a dead channel gets a finite, positive scale. 1/s is folded
into the op before the Linears (a norm's weight, or the rows of a previous Linear), exactly where AWQ folds
its scales (workers/awq_mappings.py), so the smoothed model computes the same function in exact arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from workers.errors import InputError

CLAMP = 1e-5


class ChannelAbsMax:
    """Running max|x| per input channel over all rows (tokens) seen, in float32."""

    def __init__(self, in_features: int, device: str | torch.device = "cpu") -> None:
        self.value = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, self.value.numel())
        if rows.shape[0]:
            self.value = torch.maximum(self.value, rows.abs().amax(dim=0).to(self.value.device, torch.float32))


def smoothing_scales(
    act_abs_max: Tensor, weights: Sequence[Tensor], alpha: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """SmoothQuant's s `[in]` (module docstring) for Linears `weights` `[out_i, in]` sharing one input whose
    per-channel max|x| is `act_abs_max` `[in]`; float32 values of `dtype` (the dtype they are folded in)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"migration strength alpha={alpha} must be in [0, 1]")
    if not weights:
        raise ValueError("smoothing_scales needs at least one weight")
    w_max = torch.stack([w.detach().abs().amax(dim=0).to(torch.float32) for w in weights]).amax(dim=0)
    a_max = act_abs_max.to(w_max.device, torch.float32)
    if a_max.shape != w_max.shape:
        raise ValueError(f"activation statistics of {a_max.numel()} channels for weights of {w_max.numel()} inputs")
    if not bool(torch.isfinite(a_max).all() and torch.isfinite(w_max).all()):
        raise InputError("non-finite activations or weights (inf or NaN): SmoothQuant needs finite values")
    scales = a_max.clamp(min=CLAMP).pow(alpha) / w_max.clamp(min=CLAMP).pow(1 - alpha)
    stored = scales.clamp(min=CLAMP).to(dtype)
    info = torch.finfo(dtype)
    return stored.clamp(min=info.smallest_normal, max=info.max).to(torch.float32)
