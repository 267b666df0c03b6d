"""GPTQ on the FP8 E4M3 grid: the min-max scales of `fp8_quantize` (per channel, per tensor or per 128×128 block)
fixed from the original weight, and GPTQ's column sweep (workers/quant/column_sweep.py) choosing each weight's E4M3
value, so GPTQ's error compensation lands in what the checkpoint stores. E4M3 keeps 3 mantissa bits: a weight near
its scale's top is rounded by up to 1/16 of itself, coarser there than int8's grid, which is what the compensation
recovers. (The per-row scale choice RTN makes with the "mse" observer was tried here, each row keeping the candidate
with the lowest sweep loss: no better on held-out text, benchmarks/quality.md, so GPTQ keeps min-max scales.)"""

from __future__ import annotations

import torch
from torch import Tensor

from workers.quant.column_sweep import column_sweep
from workers.quant.fp8 import FloatQuantizedTensor, expand_scale, fp8_quantize, min_max_scale, round_to_e4m3
from workers.quant.inverse_hessian import PreparedHessian
from workers.spec import QuantScheme


def fp8_gptq_solve(
    weight: Tensor, prepared: PreparedHessian, scheme: QuantScheme, *, block_size: int = 128,
    scale_dtype: torch.dtype | None = None,
) -> tuple[FloatQuantizedTensor, float]:
    """One weight `[out, in]` against an already factored Hessian: (the FP8 tensor, GPTQ's summed loss); with no
    factor (Cholesky failed at every dampening) the min-max RTN tensor and NaN."""
    w = weight.detach().to(torch.float32).clone()
    if prepared.dead.shape != (w.shape[1],):
        raise ValueError(f"the prepared Hessian is for {prepared.dead.shape[0]} inputs, the weight has {w.shape[1]}")
    w[:, prepared.dead.to(w.device)] = 0.0
    dtype = scale_dtype or weight.dtype
    if prepared.hinv is None:
        return fp8_quantize(w, scheme, scale_dtype=dtype), float("nan")
    scale = min_max_scale(w, scheme, dtype)
    out, n = w.shape
    per_weight = expand_scale(scale, (out, n), str(scheme.strategy))

    def round_column(block: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        s = per_weight[:, j : j + 1]
        values = round_to_e4m3(block[:, i : i + 1] / s)
        return values[:, 0], values * s

    codes, losses = column_sweep(w, prepared.hinv, prepared.perm, round_column, codes_dtype=torch.float32,
                                 block_size=block_size)
    return FloatQuantizedTensor(codes.to(torch.float8_e4m3fn), scale, None, scheme), float(losses.sum())
