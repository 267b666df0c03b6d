"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling them up before
rounding, and shrink each group's range where clipping outliers lowers the output error.

Both searches score candidates on the statistics of *all* calibration tokens of a Linear's input x:
Σ = E[x xᵀ] (`[in, in]`, the GPTQ Hessian / 2) and s_x = E|x| (`[in]`). For a weight error ΔW the mean
squared output error over the tokens is exactly trace(ΔW Σ ΔWᵀ) / out, so no token sample is needed and
the cost no longer grows with the number of tokens.

The caller runs the recipe for each set of Linears that share one input x:
    scales, alpha, loss = search_scales(Σ, s_x, [w_q, w_k, w_v], scheme)
    fold 1/scales into the op that produces x (norm weight or previous Linear), multiply each W by scales;
    the input statistics become Σ / (s sᵀ) and s_x / s
    clip = search_clip(Σ', w * scales, scheme);  w' = apply_clip(w * scales, clip)
    rtn_quantize(w', scheme)
Since α = 0 gives s = 1 and a clip ratio of 1 is always a candidate, neither search can do worse than
plain RTN on the calibration statistics.

Clip representation: a float32 tensor `[out, n_groups, 2]` of (lower, upper) bounds per group. For a
symmetric grid the bounds are ±r·max|w|, for an asymmetric one (r·min, r·max), with the shrink ratio
r ∈ (1 - max_shrink, 1] chosen per (out, group). A group's error counts only its own block of Σ (the
input channels of that group), as llm-awq's per-group clip objective does. `apply_clip` clamps every group
to its bounds, after which min-max RTN rebuilds exactly the grid the search evaluated.

Candidates are scored with their scales rounded to `scale_dtype`, the dtype the checkpoint stores, so the
search sees the grid that is written. Neither search syncs the device with the host inside its loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from workers.errors import InvalidSpecError
from workers.quant.grid import ScaleCheck, check_group_size, fake_quantize, num_groups
from workers.spec import QuantScheme

MIN_SCALE = 1e-4  # floor for s_x^α, as in llm-awq: dead channels must not get a zero scale
# Memory budget of one clip-search step; sets its number of output channels.
CLIP_CHUNK_BYTES = 1 << 30
CPU_CLIP_CHUNK_BYTES = 64 << 20
def _check(sigma: Tensor, weights: list[Tensor], scheme: QuantScheme) -> None:
    scheme.validate()
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise InvalidSpecError(f"AWQ needs the input second moment [in, in], got {tuple(sigma.shape)}")
    for w in weights:
        if w.ndim != 2 or w.shape[1] != sigma.shape[0]:
            raise InvalidSpecError(f"weight of shape {tuple(w.shape)} does not take inputs of {sigma.shape[0]} features")
        check_group_size(f"a weight of shape {tuple(w.shape)}", w.shape[1], scheme)


def output_mse(sigma: Tensor, delta: Tensor) -> Tensor:
    """Mean over tokens and outputs of (x·ΔWᵀ)², i.e. trace(ΔW Σ ΔWᵀ) / out, a 0-dim float32 tensor."""
    return ((delta @ sigma) * delta).sum() / delta.shape[0]


def candidate_scales(mean_abs: Tensor, alpha: float) -> Tensor:
    """AWQ's candidate s = s_x^α (floored at MIN_SCALE), normalised by sqrt(max(s)·min(s))."""
    s = mean_abs.pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def search_scales(
    sigma: Tensor,
    mean_abs: Tensor,
    weights: list[Tensor],
    scheme: QuantScheme | None,
    *,
    grid: int = 20,
    scale_dtype: torch.dtype | None = None,
    quantizers: Sequence[Callable[[Tensor, Tensor], Tensor]] | None = None,
) -> tuple[Tensor, float, float]:
    """Per-input-channel scales s `[in]` minimising the output MSE of RTN(W·s)/s over all `weights`.

    Returns (scales, best α, best loss). s = s_x^α with s_x = `mean_abs`, normalised by sqrt(max(s)·min(s))
    so the scales stay centred around 1. Ties go to the smallest α. RTN is `scheme`'s grid, or per weight the
    dequantized result of `quantizers[i](W·s, s)` (another grid, e.g. a GGUF block type, which may weigh its
    columns by the scaled inputs' statistics; `scheme` is then unused).
    """
    if not weights:
        raise InvalidSpecError("search_scales needs at least one weight")
    if quantizers is None:
        if scheme is None:
            raise ValueError("search_scales needs a scheme or one quantizer per weight")
        _check(sigma, weights, scheme)
    elif len(quantizers) != len(weights):
        raise ValueError("search_scales needs one quantizer per weight")
    sigma = sigma.detach().to(torch.float32)
    parts = [wi.detach().to(sigma.device, torch.float32) for wi in weights]
    w = torch.cat(parts)
    s_x = mean_abs.detach().to(sigma.device, torch.float32)
    check = ScaleCheck()

    def rounded(s: Tensor) -> Tensor:
        if quantizers is None:
            assert scheme is not None
            return fake_quantize(w * s, scheme, check=check, scale_dtype=scale_dtype)
        return torch.cat([q(part * s, s).to(torch.float32) for q, part in zip(quantizers, parts, strict=True)])

    candidates, losses = [], []
    for step in range(grid):
        s = candidate_scales(s_x, step / grid)
        candidates.append(s)
        losses.append(output_mse(sigma, w - rounded(s) / s))
    check.raise_first()
    values = torch.stack(losses).tolist()  # one sync for all candidates
    best = min(range(grid), key=lambda i: (values[i], i))
    return candidates[best], best / grid, values[best]


def group_blocks(sigma: Tensor, groups: int) -> Tensor:
    """The diagonal blocks `[groups, k, k]` of Σ `[in, in]`, one per group of k = in / groups input channels."""
    n = sigma.shape[0]
    k = n // groups
    return sigma.reshape(groups, k, groups, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def clip_chunk(groups: int, in_features: int, budget: int = CLIP_CHUNK_BYTES) -> int:
    """Output channels per clip-search step: ~8 float32 weight-sized rows each (the chunk, its clipped and
    quantized copies, the error and its product with Σ's blocks), within `budget` bytes."""
    return max(1, budget // (4 * 8 * in_features))


def search_clip(
    sigma: Tensor,
    weight: Tensor,
    scheme: QuantScheme,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype | None = None,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Per-(out, group) clip bounds `[out, n_groups, 2]` minimising each group's output error δ Σ_g δᵀ.

    Ratios r = 1, 1 - 1/grid, … (down to 1 - max_shrink, exclusive); the first minimum wins. Output
    channels are searched in chunks sized by `chunk_bytes` (default CLIP_CHUNK_BYTES on a GPU,
    CPU_CLIP_CHUNK_BYTES on a CPU); each (out, group) is independent, so chunking never changes the result.
    """
    _check(sigma, [weight], scheme)
    if not 0 <= max_shrink < 1:
        raise InvalidSpecError(f"max_shrink={max_shrink} must be in [0, 1)")
    out, n = weight.shape
    groups = num_groups(n, scheme)
    blocks = group_blocks(sigma.detach().to(torch.float32), groups)
    w_all = weight.detach().to(sigma.device, torch.float32)
    clip = torch.empty(out, groups, 2, dtype=torch.float32, device=sigma.device)
    if chunk_bytes is None:
        chunk_bytes = CPU_CLIP_CHUNK_BYTES if sigma.device.type == "cpu" else CLIP_CHUNK_BYTES
    chunk = clip_chunk(groups, n, chunk_bytes)
    check = ScaleCheck()
    for o1 in range(0, out, chunk):
        grouped = w_all[o1 : o1 + chunk].reshape(-1, groups, n // groups)
        hi0 = grouped.amax(dim=2).clamp(min=0)
        lo0 = grouped.amin(dim=2).clamp(max=0)
        if scheme.symmetric:
            hi0 = torch.maximum(hi0, -lo0)
            lo0 = -hi0
        best_err = torch.full_like(hi0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for step in range(max(1, int(max_shrink * grid))):
            ratio = 1 - step / grid
            lo, hi = lo0 * ratio, hi0 * ratio
            clipped = apply_clip(grouped.reshape(-1, n), torch.stack((lo, hi), dim=-1))
            q = fake_quantize(clipped, scheme, max_val=hi, min_val=lo, check=check, scale_dtype=scale_dtype)
            delta = q.reshape(-1, groups, n // groups).sub_(grouped)
            err = (torch.einsum("ogk,gkl->ogl", delta, blocks) * delta).sum(dim=2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        clip[o1 : o1 + chunk] = torch.stack((best_lo, best_hi), dim=-1)
    check.raise_first()
    return clip


def apply_clip(weight: Tensor, clip: Tensor) -> Tensor:
    """Clamp each (row, group) of `weight` `[out, in]` to its bounds from `clip` `[out, n_groups, 2]`."""
    out, n = weight.shape
    if clip.ndim != 3 or clip.shape[0] != out or clip.shape[2] != 2 or n % clip.shape[1] != 0:
        raise InvalidSpecError(f"clip of shape {tuple(clip.shape)} does not fit a weight of shape {(out, n)}")
    grouped = weight.detach().reshape(out, clip.shape[1], n // clip.shape[1])
    lo, hi = clip[..., 0:1].to(weight.dtype), clip[..., 1:2].to(weight.dtype)  # broadcast over each group
    return torch.minimum(torch.maximum(grouped, lo), hi).reshape(out, n)
