"""GPTQ on a GGUF grid: GPTQ's column sweep (workers/quant/column_sweep.py) against ggml's own blocks.

The grid is fixed before the sweep ("static groups"): the file's fields of every sub-block — d (and m) of
a Q4_0/Q4_1/Q8_0 block, or for K-quants the super-block's d/dmin with the 6-bit (Q4_K) or 8-bit (Q6_K)
sub-scales already on their grid — come from the original weight (`gguf_grid.choose_params`, weighted by
the Hessian's diagonal), and the sweep only chooses the integer codes, pushing each column's rounding error
onto the columns not yet quantized. What GPTQ compensates is therefore exactly what the file stores.
Act-order (columns by descending diag H) needs no layout change because the grid does not move.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from workers.quant.column_sweep import column_sweep
from workers.quant.gguf_grid import BlockType, GGUFTensor, choose_params, nearest_codes, quantize
from workers.quant.inverse_hessian import PreparedHessian, prepare_hessian


def gguf_gptq_quantize_shared(
    weights: Sequence[Tensor],
    kinds: Sequence[BlockType],
    hessian: Tensor,
    *,
    dampening: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> list[tuple[GGUFTensor, bool]]:
    """GPTQ of weights sharing one input (one factored Hessian), each on its own block type; returns
    (tensor, fell_back_to_rtn) per weight."""
    if not weights:
        return []
    prepared = prepare_hessian(hessian, dampening=dampening, act_order=act_order, device=weights[0].device)
    return [gguf_gptq_solve(w, kind, prepared, block_size=block_size) for w, kind in zip(weights, kinds, strict=True)]


def gguf_gptq_solve(
    weight: Tensor, kind: BlockType, prepared: PreparedHessian, *, block_size: int = 128
) -> tuple[GGUFTensor, bool]:
    """One weight `[out, in]` against an already factored Hessian; RTN (flagged) if Cholesky failed."""
    w = weight.detach().to(torch.float32).clone()
    out, n = w.shape
    if prepared.dead.shape != (n,):
        raise ValueError(f"the prepared Hessian is for {prepared.dead.shape[0]} inputs, the weight has {n}")
    w[:, prepared.dead.to(w.device)] = 0.0
    importance = prepared.importance.to(w.device)
    if prepared.hinv is None:
        return quantize(kind, w, importance), True
    fields = choose_params(kind, w, importance)
    result = GGUFTensor(kind, torch.zeros(out, n, dtype=torch.int16, device=w.device), fields)
    scale, bias = result.grid()
    result.codes = _sweep(w, kind, prepared, scale, bias, block_size)
    return result, False


def _sweep(
    w: Tensor, kind: BlockType, prepared: PreparedHessian, scale: Tensor, bias: Tensor | None, block_size: int
) -> Tensor:
    single = _single(kind)

    def round_column(block: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        g = j // kind.sub
        s = scale[:, g : g + 1]
        b = bias[:, g : g + 1] if bias is not None else None
        c = nearest_codes(single, block[:, i : i + 1], s, b)
        return c[:, 0], (c.to(torch.float32) * s if b is None else c.to(torch.float32) * s + b)

    assert prepared.hinv is not None
    return column_sweep(w, prepared.hinv, prepared.perm, round_column, codes_dtype=torch.int16, block_size=block_size,
                        align=kind.sub)[0]


def _single(kind: BlockType) -> BlockType:
    """The same code range with one column per sub-block (one column of the sweep at a time)."""
    return BlockType(kind.name, 1, kind.cmin, kind.cmax, kind.block, kind.has_bias, kind.offset)
