"""GPTQ's column sweep against a grid fixed before the sweep: GGUF blocks (workers/quant/gguf_gptq.py) and FP8
E4M3 with min-max scales (workers/quant/fp8.py).

The grid's parameters (scales, offsets) come from the original weight; the sweep only picks each weight's point
on it, column by column in the prepared Hessian's order, pushing the rounding error onto the columns not yet
quantized (the update of workers/quant/gptq.py's reference sweep: blocks of columns with lazy updates, the upper
Cholesky factor of H⁻¹). `round_column(column, j)` rounds one column `[out, 1]` (float32, original index `j`) to
the grid and returns (its codes `[out]`, their decoded values `[out, 1]`). Act-order needs no layout change
because the grid does not move. Each row's summed err²/2 is its damped Hessian-weighted error (as in gptq.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from workers.quant.inverse_hessian import PreparedHessian

RoundColumn = Callable[[Tensor, int], tuple[Tensor, Tensor]]


def fixed_grid_sweep(
    w: Tensor, prepared: PreparedHessian, round_column: RoundColumn, *, codes_dtype: torch.dtype,
    block_size: int = 128, align: int = 1,
) -> tuple[Tensor, Tensor]:
    """(The codes `[out, in]` in the original column order, the per-row losses `[out]`) of `w` (float32, dead
    inputs zeroed) on the fixed grid; `block_size` is rounded up to a multiple of `align`."""
    assert prepared.hinv is not None
    out, n = w.shape
    hinv = prepared.hinv.to(w.device)
    order = prepared.perm.to(w.device) if prepared.perm is not None else torch.arange(n, device=w.device)
    w = w[:, order]
    columns = order.tolist()
    block_size = max(1, math.ceil(block_size / align) * align)
    codes = torch.zeros(out, n, dtype=codes_dtype, device=w.device)
    losses = torch.zeros(out, dtype=torch.float32, device=w.device)
    for b1 in range(0, n, block_size):
        b2 = min(b1 + block_size, n)
        w_block = w[:, b1:b2].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            column = w_block[:, i : i + 1]
            c, decoded = round_column(column, columns[b1 + i])
            codes[:, b1 + i] = c
            err = (column - decoded)[:, 0] / hinv_block[i, i]
            losses += err.square() / 2
            w_block[:, i:] -= err.unsqueeze(1) @ hinv_block[i : i + 1, i:]
            err_block[:, i] = err
        w[:, b2:] -= err_block @ hinv[b1:b2, b2:]
    return codes[:, torch.argsort(order)], losses
