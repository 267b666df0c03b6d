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
"""

from __future__ import annotations

import torch
from torch import Tensor

from workers.errors import InvalidSpecError
from workers.quant.grid import check_group_size, fake_quantize, num_groups
from workers.spec import QuantScheme

MIN_SCALE = 1e-4  # floor for s_x^α, as in llm-awq: dead channels must not get a zero scale
TOKEN_CHUNK = 4096  # rows of x per matmul while measuring output error, to bound memory
CHANNEL_CHUNK = 64  # output channels per step of the clip search, to bound memory


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


def _output_mse(x: Tensor, weight_delta: Tensor) -> float:
    """Mean of (x @ ΔWᵀ)² over all tokens and outputs, in token chunks."""
    total = sum(float((chunk @ weight_delta.T).square().sum()) for chunk in x.split(TOKEN_CHUNK))
    return total / (x.shape[0] * weight_delta.shape[0])


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
    best = (torch.ones_like(s_x), 0.0, float("inf"))
    for step in range(grid):
        alpha = step / grid
        s = s_x.pow(alpha).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        loss = _output_mse(x, w - fake_quantize(w * s, scheme) / s)
        if loss < best[2]:
            best = (s, alpha, loss)
    return best


def search_clip(
    x: Tensor,
    weight: Tensor,
    scheme: QuantScheme,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
) -> Tensor:
    """Per-(out, group) clip bounds `[out, n_groups, 2]` minimising each group's share of the output error.

    Like llm-awq's auto_clip: for ratios r = 1, 1 - 1/grid, … (down to 1 - max_shrink, exclusive), clamp
    the group to the shrunk range, fake-quantize it and measure mean over tokens of (x_g·(w_g - q_g))²,
    using at most `max_tokens` evenly spaced tokens.
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
    for o1 in range(0, out, CHANNEL_CHUNK):
        w = w_all[o1 : o1 + CHANNEL_CHUNK]
        grouped = w.reshape(-1, groups, n // groups)
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
            clipped = apply_clip(w, torch.stack((lo, hi), dim=-1))
            q = fake_quantize(clipped, scheme, max_val=hi, min_val=lo).reshape(-1, groups, n // groups)
            err = (torch.einsum("tgk,ogk->otg", x, q) - reference).square().mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        clip[o1 : o1 + CHANNEL_CHUNK] = torch.stack((best_lo, best_hi), dim=-1)
    return clip


def apply_clip(weight: Tensor, clip: Tensor) -> Tensor:
    """Clamp each (row, group) of `weight` `[out, in]` to its bounds from `clip` `[out, n_groups, 2]`."""
    out, n = weight.shape
    if clip.ndim != 3 or clip.shape[0] != out or clip.shape[2] != 2 or n % clip.shape[1] != 0:
        raise InvalidSpecError(f"clip of shape {tuple(clip.shape)} does not fit a weight of shape {(out, n)}")
    group = n // clip.shape[1]
    lo = clip[..., 0].to(weight.dtype).repeat_interleave(group, dim=1)
    hi = clip[..., 1].to(weight.dtype).repeat_interleave(group, dim=1)
    return torch.minimum(torch.maximum(weight.detach(), lo), hi)
