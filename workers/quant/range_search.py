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

from workers.quant.grid import ScaleCheck, compute_qparams, num_groups, quantize_values
from workers.spec import QuantScheme

SHRINK_STEPS = 40  # candidates r = 1, 1 − 1/steps·max_shrink, …
MAX_SHRINK = 0.25  # smallest range tried: 75% of min-max (llm-compressor's MSE observer: 0.2; GPTQ's: 0.8)
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
    rows = max(1, ROW_CHUNK_BYTES // (4 * 6 * k))
    ratios = [1 - max_shrink * i / steps for i in range(steps + 1)] if steps > 0 and max_shrink > 0 else [1.0]
    for r1 in range(0, out, rows):
        part, hi_p, lo_p = grouped[r1 : r1 + rows], hi0[r1 : r1 + rows], lo0[r1 : r1 + rows]
        flat = part.reshape(-1, k)
        best_err = torch.full(hi_p.shape, float("inf"), device=w.device)
        for step, ratio in enumerate(ratios):
            scale, zero = compute_qparams(flat, scheme, max_val=hi_p * ratio, min_val=lo_p * ratio,
                                          scale_dtype=scale_dtype, check=check)
            q = quantize_values(flat, scale, zero, scheme).to(torch.float32)
            if zero is not None:
                q = q - zero.to(torch.float32).repeat_interleave(size, dim=1)
            err = ((q * scale.repeat_interleave(size, dim=1) - flat).reshape(part.shape).square() * weight).sum(dim=2)
            better = (err < best_err) | (step == 0)
            best_err = torch.where(better, err, best_err)
            best_scale[r1 : r1 + rows] = torch.where(better, scale, best_scale[r1 : r1 + rows])
            if best_zero is not None and zero is not None:
                best_zero[r1 : r1 + rows] = torch.where(better, zero, best_zero[r1 : r1 + rows])
    check.raise_first()
    return best_scale, best_zero
