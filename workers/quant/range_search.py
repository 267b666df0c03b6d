"""Per-group range search (the "MSE observer"): instead of min-max, pick each group's range from a grid of
shrunk ranges so that the *importance-weighted* rounding error of the group is smallest.

    error(row, group, r) = Σ_j importance_j · (w_j − Q_r(w_j))²,   Q_r: the grid of range r·[min, max]

`importance` is one weight per input column: diag(H) (E[x_j²]) of the Linear's calibration inputs, which is
the first-order output error GPTQ and RTN pay per unit of weight error (llm-compressor's imatrix-MSE
observer, GPTQ's reference `mse` option); all ones without calibration (plain MSE). Shrinking trades
clipping the largest weights for a finer step on all the others; r = 1 (min-max) is always a candidate,
so the search is never worse than min-max on its own objective.

Returns scales and zero points exactly as `grid.compute_qparams` does, so every method and format takes them
unchanged; `grid.quantize_values` then clamps the weights outside the chosen range to the end levels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from workers.quant.grid import ScaleCheck, compute_qparams, num_groups, qrange
from workers.spec import QuantScheme

SHRINK_STEPS = 20  # candidates r = 1, 0.99, …, 0.80: compressed-tensors' MSE observer grid (grid 100, maxshrink 0.2)
MAX_SHRINK = 0.2
ROW_CHUNK_BYTES = 256 << 20  # float32 temporaries per step of the search: bounds its memory


def search_qparams(
    w: Tensor,
    scheme: QuantScheme,
    importance: Tensor | None = None,
    *,
    scale_dtype: torch.dtype | None = None,
    steps: int = SHRINK_STEPS,
    max_shrink: float = MAX_SHRINK,
) -> tuple[Tensor, Tensor | None]:
    """Scale (float32 `[out, n_groups]`) and zero point (int8 or None) of each group of `w` `[out, k]`
    minimising the `importance`-weighted squared rounding error (see the module docstring)."""
    w = w.detach().to(torch.float32)
    out, k = w.shape
    groups = num_groups(k, scheme)
    size = k // groups
    weight = (importance.detach().to(w.device, torch.float32) if importance is not None
              else torch.ones(k, device=w.device)).clamp(min=0).reshape(1, groups, size)
    grouped = w.reshape(out, groups, size)
    hi0, lo0 = grouped.amax(dim=2), grouped.amin(dim=2)
    check = ScaleCheck()
    best_scale = torch.empty(out, groups, device=w.device)
    best_zero = torch.empty(out, groups, dtype=torch.int8, device=w.device) if not scheme.symmetric else None
    qmin, qmax = qrange(scheme.bits)
    rows = max(1, ROW_CHUNK_BYTES // (4 * 4 * k))
    ratios = [1 - max_shrink * i / steps for i in range(steps + 1)] if steps > 0 and max_shrink > 0 else [1.0]
    for r1 in range(0, out, rows):
        part, hi_p, lo_p = grouped[r1 : r1 + rows], hi0[r1 : r1 + rows], lo0[r1 : r1 + rows]
        best_err = torch.full(hi_p.shape, float("inf"), device=w.device)
        for step, ratio in enumerate(ratios):
            scale, zero = compute_qparams(part.reshape(-1, k), scheme, max_val=hi_p * ratio, min_val=lo_p * ratio,
                                          scale_dtype=scale_dtype, check=check)
            # `grid.quantize_values` and `QuantizedTensor.dequantize`, broadcast over each group's columns; times
            # the reciprocal (a broadcast division is ~14× slower on CPU; a code can differ only on an exact tie)
            s3 = scale.unsqueeze(2)
            scaled = part * s3.reciprocal()
            if zero is not None:
                scaled = scaled + zero.unsqueeze(2).to(torch.float32)
            q = torch.clamp(torch.round(scaled), qmin, qmax)
            if zero is not None:
                q = q - zero.unsqueeze(2).to(torch.float32)
            err = (q.mul_(s3).sub_(part).square_() * weight).sum(dim=2)
            better = (err < best_err) | (step == 0)
            best_err = torch.where(better, err, best_err)
            best_scale[r1 : r1 + rows] = torch.where(better, scale, best_scale[r1 : r1 + rows])
            if best_zero is not None and zero is not None:
                best_zero[r1 : r1 + rows] = torch.where(better, zero, best_zero[r1 : r1 + rows])
    check.raise_first()
    return best_scale, best_zero
