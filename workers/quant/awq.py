"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling them up before
rounding, and shrink each group's range where clipping outliers lowers the output error.

The caller runs the recipe for each set of Linears that share one input x:
    scales, alpha, loss = search_scales(x, [w_q, w_k, w_v], scheme)
    fold 1/scales into the op that produces x (norm weight or previous Linear), multiply each W by scales
    clip = search_clip(x / scales, w * scales, scheme);  w' = apply_clip(w * scales, clip)
    rtn_quantize(w', scheme)
Since α = 0 gives s = 1 and a clip ratio of 1 is always a candidate, neither search can do worse than
plain RTN on the calibration inputs it is given.

Clip representation: a float32 tensor `[out, n_groups, 2]` of (lower, upper) bounds per group. For a
symmetric grid the bounds are ±r·max|w|, for an asymmetric one (r·min, r·max), with the shrink ratio
r ∈ (1 - max_shrink, 1] chosen per (out, group). `apply_clip` clamps every group to its bounds, after which
min-max RTN rebuilds exactly the grid the search evaluated.

GPU speed: neither search syncs the device with the host inside its loops. The grid's scale checks are
recorded on the device (`grid.ScaleCheck`) and raised once at the end; the scale search keeps its losses on
the device and picks the best α at the end; the clip search takes as many output channels per step as its
memory budget allows. The choices are those of evaluating one candidate at a time, ties included (the
first minimum wins).
"""

from __future__ import annotations

import torch
from torch import Tensor

from workers.errors import InvalidSpecError
from workers.quant.grid import ScaleCheck, check_group_size, fake_quantize, num_groups
from workers.spec import QuantScheme

MIN_SCALE = 1e-4  # floor for s_x^α, as in llm-awq: dead channels must not get a zero scale
TOKEN_CHUNK = 4096  # rows of x per matmul while measuring output error, to bound memory
# Memory budget of one clip-search step; sets its number of output channels. A GPU wants few, large steps
# (each step is ~30 kernel launches); a CPU runs faster when a step's temporaries stay near its caches.
CLIP_CHUNK_BYTES = 1 << 30
CPU_CLIP_CHUNK_BYTES = 64 << 20


def _check_inputs(x: Tensor, weights: list[Tensor], scheme: QuantScheme) -> None:
    scheme.validate()
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidSpecError(
            f"AWQ needs activations [tokens, in] with at least one token, got {tuple(x.shape)}"
        )
    for w in weights:
        if w.ndim != 2 or w.shape[1] != x.shape[1]:
            raise InvalidSpecError(
                f"weight of shape {tuple(w.shape)} does not take inputs of {x.shape[1]} features"
            )
        check_group_size(f"a weight of shape {tuple(w.shape)}", w.shape[1], scheme)


def _output_square_sum(x: Tensor, weight_delta: Tensor) -> Tensor:
    """Sum of (x @ ΔWᵀ)² over all tokens and outputs, a float64 0-dim tensor on x's device.

    Token chunks' float32 sums are widened and added in order, exactly as a Python sum of floats.
    """
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for chunk in x.split(TOKEN_CHUNK):
        total = total + (chunk @ weight_delta.T).square().sum().to(torch.float64)
    return total


def search_scales(
    x: Tensor, weights: list[Tensor], scheme: QuantScheme, *, grid: int = 20
) -> tuple[Tensor, float, float]:
    """Per-input-channel scales s `[in]` minimising the output MSE of RTN(W·s)/s over all `weights`.

    Returns (scales, best α, best loss). s = s_x^α with s_x = mean|x| per channel, normalised by
    sqrt(max(s)·min(s)) so the scales stay centred around 1.
    """
    if not weights:
        raise InvalidSpecError("search_scales needs at least one weight")
    _check_inputs(x, weights, scheme)
    x = x.detach().to(torch.float32)
    w = torch.cat([wi.detach().to(x.device, torch.float32) for wi in weights])
    s_x = x.abs().mean(dim=0)
    check = ScaleCheck()
    candidates: list[Tensor] = []
    totals: list[Tensor] = []
    for step in range(grid):
        s = s_x.pow(step / grid).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        candidates.append(s)
        totals.append(_output_square_sum(x, w - fake_quantize(w * s, scheme, check=check) / s))
    check.raise_first()
    best = (torch.ones_like(s_x), 0.0, float("inf"))
    count = x.shape[0] * w.shape[0]
    for step, total in enumerate(torch.stack(totals).tolist() if totals else []):  # one sync for all
        loss = total / count
        if loss < best[2]:
            best = (candidates[step], step / grid, loss)
    return best


def clip_bytes_per_channel(tokens: int, groups: int, in_features: int) -> int:
    """Float32 temporaries of one output channel in a clip-search step: the reference and candidate outputs
    `[tokens, groups]` (the candidate's error is formed in place), and ~8 weight-sized rows (the chunk, its
    clipped copy and `fake_quantize`'s intermediates)."""
    return 4 * (2 * tokens * groups + 8 * in_features)


def clip_chunk(tokens: int, groups: int, in_features: int, budget: int = CLIP_CHUNK_BYTES) -> int:
    """Output channels per clip-search step so that its temporaries stay within `budget` bytes."""
    return max(1, budget // clip_bytes_per_channel(tokens, groups, in_features))


def search_clip(
    x: Tensor,
    weight: Tensor,
    scheme: QuantScheme,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Per-(out, group) clip bounds `[out, n_groups, 2]` minimising each group's share of the output error.

    Like llm-awq's auto_clip: for ratios r = 1, 1 - 1/grid, … (down to 1 - max_shrink, exclusive), clamp
    the group to the shrunk range, fake-quantize it and measure mean over tokens of (x_g·(w_g - q_g))²,
    using at most `max_tokens` evenly spaced tokens. Output channels are searched in chunks sized by
    `chunk_bytes` (see `clip_chunk`; default CLIP_CHUNK_BYTES on a GPU, CPU_CLIP_CHUNK_BYTES on a CPU); each
    (out, group) is independent, so the chunking only sets speed and memory, never the result.
    """
    _check_inputs(x, [weight], scheme)
    if not 0 <= max_shrink < 1:
        raise InvalidSpecError(f"max_shrink={max_shrink} must be in [0, 1)")
    out, n = weight.shape
    groups = num_groups(n, scheme)
    x = x.detach().to(torch.float32)
    x = x[:: max(1, x.shape[0] // max_tokens)][:max_tokens].reshape(-1, groups, n // groups)
    w_all = weight.detach().to(x.device, torch.float32)
    clip = torch.empty(out, groups, 2, dtype=torch.float32, device=x.device)
    if chunk_bytes is None:
        chunk_bytes = CPU_CLIP_CHUNK_BYTES if x.device.type == "cpu" else CLIP_CHUNK_BYTES
    chunk = clip_chunk(x.shape[0], groups, n, chunk_bytes)
    check = ScaleCheck()
    for o1 in range(0, out, chunk):
        grouped = w_all[o1 : o1 + chunk].reshape(-1, groups, n // groups)
        hi0 = grouped.amax(dim=2).clamp(min=0)
        lo0 = grouped.amin(dim=2).clamp(max=0)
        if scheme.symmetric:
            hi0 = torch.maximum(hi0, -lo0)
            lo0 = -hi0
        reference = torch.einsum("tgk,ogk->otg", x, grouped)
        best_err = torch.full_like(hi0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for step in range(max(1, int(max_shrink * grid))):
            ratio = 1 - step / grid
            lo, hi = lo0 * ratio, hi0 * ratio
            clipped = apply_clip(grouped.reshape(-1, n), torch.stack((lo, hi), dim=-1))
            q = fake_quantize(clipped, scheme, max_val=hi, min_val=lo, check=check)
            err = torch.einsum("tgk,ogk->otg", x, q.reshape(-1, groups, n // groups))
            err = err.sub_(reference).square_().mean(dim=1)
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
