"""GPTQ's column sweep, one loop for every grid: integer groups (workers/quant/gptq.py, the reference on CPU),
GGUF blocks (workers/quant/gguf_gptq.py) and FP8 E4M3 (workers/quant/fp8_gptq.py).

Columns are visited in the sweep order (`perm`, or the natural one) in blocks with lazy updates (IST-DASLab's
gptq.py): each column is rounded to the grid by `round_column(block, i, j)` — column `i` of `block` (the
error-updated weights of the current block of columns, float32), original column index `j` — which returns
(its codes `[out]`, their decoded values `[out, 1]`), and its rounding error, divided by the upper Cholesky
factor of H⁻¹'s diagonal, is pushed onto the columns not yet quantized. A row's summed err²/2 is its damped
Hessian-weighted error. The grids that stay fixed ignore `block` beyond the column; the integer grid without
act-order sets a group's parameters from the block when the sweep reaches the group's first column.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

RoundColumn = Callable[[Tensor, int, int], tuple[Tensor, Tensor]]


def column_sweep(
    w: Tensor, hinv: Tensor, perm: Tensor | None, round_column: RoundColumn, *, codes_dtype: torch.dtype,
    block_size: int = 128, align: int = 1,
) -> tuple[Tensor, Tensor]:
    """(The codes `[out, in]` in the original column order, the per-row losses `[out]`) of `w` (float32, dead
    inputs zeroed; not modified); `block_size` is rounded up to a multiple of `align`."""
    out, n = w.shape
    hinv = hinv.to(w.device)
    order = perm.to(w.device) if perm is not None else torch.arange(n, device=w.device)
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
            c, decoded = round_column(w_block, i, columns[b1 + i])
            codes[:, b1 + i] = c
            err = (w_block[:, i : i + 1] - decoded)[:, 0] / hinv_block[i, i]
            losses += err.square() / 2
            w_block[:, i:] -= err.unsqueeze(1) @ hinv_block[i : i + 1, i:]
            err_block[:, i] = err
        w[:, b2:] -= err_block @ hinv[b1:b2, b2:]
    return codes[:, torch.argsort(order)], losses
