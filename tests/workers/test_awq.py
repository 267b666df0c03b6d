"""AWQ: activation-aware scales and clip search lower the output error in the setting AWQ targets, and the
searches on input statistics make the choices of token-based searches over *all* calibration tokens."""

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workers.errors import InputError, InvalidSpecError
from workers.quant.awq import (
    MIN_SCALE,
    apply_clip,
    clip_chunk,
    group_blocks,
    search_clip,
    search_scales,
)
from workers.quant.grid import fake_quantize, num_groups
from workers.quant.rtn import rtn_quantize
from workers.spec import QuantScheme

IN, TOKENS = 128, 512
SCHEMES = [QuantScheme(b, g, s) for b in (3, 4) for g in (-1, 32) for s in (True, False)]


def _outlier_activations(seed: int = 0) -> torch.Tensor:
    """Activations where a few input channels are ~30× larger than the rest, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, IN, generator=g)
    x[:, torch.randperm(IN, generator=g)[:6]] *= 30
    return x


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ = E[x xᵀ] and E|x| (float64 sums, so the references below are exact to float32 rounding)."""
    x64 = x.to(torch.float64)
    return (x64.T @ x64 / x.shape[0]).to(torch.float32), x.abs().mean(dim=0)


def _mse(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x.double() @ (w - w_hat).double().T).square().mean())


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return _outlier_activations(), [
        0.05 * torch.randn(96, IN, generator=g),
        0.05 * torch.randn(32, IN, generator=g),
    ]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_scaling_then_rtn_beats_plain_rtn(layer, scheme: QuantScheme) -> None:
    x, weights = layer
    scales, alpha, loss = search_scales(*_stats(x), weights, scheme)
    assert scales.shape == (IN,) and bool((scales > 0).all())
    assert 0 < alpha < 1
    for w in weights:
        awq = rtn_quantize(w * scales, scheme).dequantize() / scales  # fold 1/s into the previous op
        assert _mse(x, w, awq) < 0.7 * _mse(x, w, rtn_quantize(w, scheme).dequantize())
    # the reported loss is the output MSE over all tokens and all weights together
    stacked = torch.cat(weights)
    expected = _mse(x, stacked, fake_quantize(stacked * scales, scheme) / scales)
    assert loss == pytest.approx(expected, rel=1e-4)


def test_alpha_zero_is_plain_rtn(layer) -> None:
    x, weights = layer
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    scales, alpha, loss = search_scales(*_stats(x), weights, scheme, grid=1)  # only α = 0 is tried
    assert alpha == 0.0 and torch.equal(scales, torch.ones(IN))
    stacked = torch.cat(weights)
    assert loss == pytest.approx(_mse(x, stacked, rtn_quantize(stacked, scheme).dequantize()), rel=1e-4)


def test_scale_search_is_never_worse_than_rtn_even_without_outliers() -> None:
    x = torch.randn(TOKENS, IN)
    w = torch.randn(64, IN)
    scheme = QuantScheme(bits=4, group_size=32)
    _, _, loss = search_scales(*_stats(x), [w], scheme)
    assert loss <= _mse(x, w, rtn_quantize(w, scheme).dequantize()) * (1 + 1e-4)


def _group_errors(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, group: int) -> torch.Tensor:
    """Per (out, group): mean over tokens of (x_g · (w_g - ŵ_g))², the objective of the clip search."""
    xg = x.double().reshape(x.shape[0], -1, group)
    delta = (w - w_hat).double().reshape(w.shape[0], -1, group)
    return torch.einsum("tgk,ogk->otg", xg, delta).square().mean(dim=1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_clip_search_never_increases_the_error(layer, scheme: QuantScheme) -> None:
    x, weights = layer
    w = weights[0].clone()
    w[:, ::17] *= 6  # heavy-tailed weights: clipping the outliers should pay off
    clip = search_clip(_stats(x)[0], w, scheme)
    groups = 1 if scheme.group_size == -1 else IN // scheme.group_size
    assert clip.shape == (96, groups, 2)
    assert bool((clip[..., 0] <= 0).all()) and bool((clip[..., 1] >= 0).all())
    if scheme.symmetric:
        assert torch.equal(clip[..., 0], -clip[..., 1])
    clipped = rtn_quantize(apply_clip(w, clip), scheme).dequantize()
    plain = rtn_quantize(w, scheme).dequantize()
    group = IN // groups
    assert bool((_group_errors(x, w, clipped, group) <= _group_errors(x, w, plain, group) * (1 + 1e-4)).all())
    assert _mse(x, w, clipped) < _mse(x, w, plain)


def test_clip_bounds_are_the_grid_rtn_rebuilds() -> None:
    """After apply_clip, min-max RTN uses exactly the searched bounds: scale = 2·upper / (2^b − 1)."""
    x, w = torch.randn(64, IN), torch.randn(40, IN)
    w[:, 0] = 20.0  # an outlier in every row: the search clips it in some rows
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    clip = search_clip(_stats(x)[0], w, scheme)
    assert bool((clip[:, 0, 1] < 20.0).any())
    assert torch.allclose(rtn_quantize(apply_clip(w, clip), scheme).scale, clip[..., 1] / 7.5)


def test_apply_clip_clamps_each_group_to_its_bounds() -> None:
    w = torch.tensor([[-4.0, 1.0, 3.0, -0.5]])
    clip = torch.tensor([[[-2.0, 2.0], [-0.25, 1.0]]])
    assert torch.equal(apply_clip(w, clip), torch.tensor([[-2.0, 1.0, 1.0, -0.25]]))
    with pytest.raises(InvalidSpecError, match="does not fit a weight"):
        apply_clip(w, torch.zeros(1, 3, 2))


def test_group_blocks_are_the_diagonal_blocks() -> None:
    sigma = torch.arange(36.0).reshape(6, 6)
    blocks = group_blocks(sigma, 3)
    assert blocks.shape == (3, 2, 2)
    for g in range(3):
        assert torch.equal(blocks[g], sigma[2 * g : 2 * g + 2, 2 * g : 2 * g + 2])


def test_bad_inputs_are_rejected() -> None:
    scheme = QuantScheme(bits=4, group_size=32)
    sigma, mean_abs = _stats(torch.randn(8, IN))
    with pytest.raises(InvalidSpecError, match="does not take inputs of 128 features"):
        search_scales(sigma, mean_abs, [torch.randn(4, 64)], scheme)
    with pytest.raises(InvalidSpecError, match="at least one weight"):
        search_scales(sigma, mean_abs, [], scheme)
    with pytest.raises(InvalidSpecError, match=r"second moment \[in, in\]"):
        search_clip(torch.randn(IN), torch.randn(4, IN), scheme)
    with pytest.raises(InvalidSpecError, match="max_shrink"):
        search_clip(sigma, torch.randn(4, IN), scheme, max_shrink=1.5)


def test_non_finite_weights_are_rejected_after_the_search() -> None:
    scheme = QuantScheme(bits=4, group_size=32)
    sigma, mean_abs = _stats(torch.randn(16, IN))
    w = torch.randn(8, IN)
    w[5, 70] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        search_clip(sigma, w, scheme, chunk_bytes=1)
    with pytest.raises(InputError, match="non-finite"):
        search_scales(sigma, mean_abs, [torch.randn(4, IN), w], scheme)
    mean_abs = mean_abs.clone()
    mean_abs[9] = float("inf")  # α > 0 turns the infinite channel mean into NaN scales
    with pytest.raises(InputError, match="non-finite"):
        search_scales(sigma, mean_abs, [torch.randn(4, IN)], scheme)


# --- Token-based references over ALL tokens ------------------------------------------------------------
# The searches score candidates on Σ = E[x xᵀ] instead of on a sample of tokens. These references score the
# same candidates token by token over every calibration token (what the statistics stand for); the choices
# must agree, so nothing depends on which tokens a sample would have kept.


def _token_search_scales(
    x: torch.Tensor, weights: list[torch.Tensor], scheme: QuantScheme, grid: int = 20
) -> tuple[torch.Tensor, float, float]:
    w = torch.cat(weights)
    s_x = x.abs().mean(dim=0)
    best = (torch.ones_like(s_x), 0.0, float("inf"))
    for step in range(grid):
        alpha = step / grid
        s = s_x.pow(alpha).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        loss = _mse(x, w, fake_quantize(w * s, scheme) / s)
        if loss < best[2]:
            best = (s, alpha, loss)
    return best


def _token_search_clip(
    x: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip bounds, per-group error of the best candidate), every token counted."""
    out, n = weight.shape
    groups = num_groups(n, scheme)
    grouped = weight.reshape(out, groups, n // groups)
    hi0, lo0 = grouped.amax(dim=2).clamp(min=0), grouped.amin(dim=2).clamp(max=0)
    if scheme.symmetric:
        hi0 = torch.maximum(hi0, -lo0)
        lo0 = -hi0
    best_err = torch.full(hi0.shape, float("inf"), dtype=torch.float64)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for step in range(max(1, int(max_shrink * grid))):
        ratio = 1 - step / grid
        lo, hi = lo0 * ratio, hi0 * ratio
        q = fake_quantize(apply_clip(weight, torch.stack((lo, hi), dim=-1)), scheme, max_val=hi, min_val=lo)
        err = _group_errors(x, weight, q, n // groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return torch.stack((best_lo, best_hi), dim=-1), best_err


EQUIVALENCE_SCHEMES = [QuantScheme(b, g, s) for b in (3, 4) for g in (32, 64, -1) for s in (True, False)]


def _random_layer(seed: int, out: int, n: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, torch.randperm(n, generator=g)[:5]] *= 20
    w = 0.05 * torch.randn(out, n, generator=g)
    w[torch.rand(out, n, generator=g) < 0.02] *= 8  # outliers: many groups prefer a ratio below 1
    return x, w


@pytest.mark.parametrize("scheme", EQUIVALENCE_SCHEMES, ids=str)
def test_scale_search_on_statistics_chooses_what_all_tokens_choose(scheme: QuantScheme) -> None:
    x, w = _random_layer(scheme.bits * 10 + scheme.group_size, 96, 256, 2048)
    weights = [w[:64], w[64:]]
    scales, alpha, loss = search_scales(*_stats(x), weights, scheme)
    expected = _token_search_scales(x, weights, scheme)
    assert alpha > 0 and alpha == expected[1]
    assert loss == pytest.approx(expected[2], rel=1e-4)
    assert torch.allclose(scales, expected[0], rtol=1e-5)


@pytest.mark.parametrize("scheme", EQUIVALENCE_SCHEMES, ids=str)
def test_clip_search_on_statistics_chooses_what_all_tokens_choose(scheme: QuantScheme) -> None:
    """Same bounds wherever two candidates are not tied to float32 rounding; never a worse group error."""
    x, w = _random_layer(scheme.bits * 100 + scheme.group_size, 200, 256, 2048)
    expected, expected_err = _token_search_clip(x, w, scheme)
    got = search_clip(_stats(x)[0], w, scheme)
    unclipped, _ = _token_search_clip(x, w, scheme, max_shrink=0.0)
    clipped = (expected != unclipped).any(dim=-1)
    assert bool(clipped.any()) and not bool(clipped.all())  # the test covers clipped and unclipped groups
    same = (got == expected).all(dim=-1)
    assert float(same.float().mean()) >= 0.99
    q = fake_quantize(apply_clip(w, got), scheme, max_val=got[..., 1], min_val=got[..., 0])
    err = _group_errors(x, w, q, w.shape[1] // num_groups(w.shape[1], scheme))
    assert bool((err <= expected_err * (1 + 1e-4) + 1e-12).all())


def test_clip_chunking_never_changes_the_result() -> None:
    x, w = _random_layer(7, 200, 256, 300)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    sigma = _stats(x)[0]
    whole = search_clip(sigma, w, scheme)
    for chunk_bytes in (1, 7 * 4 * 8 * 256, 64 * 4 * 8 * 256):
        assert torch.equal(search_clip(sigma, w, scheme, chunk_bytes=chunk_bytes), whole), chunk_bytes


def test_scale_search_ties_go_to_the_first_minimum() -> None:
    """A weight RTN reproduces exactly at every α has loss 0 at every step: α = 0 must win."""
    sigma, mean_abs = _stats(torch.randn(32, 64))
    scales, alpha, loss = search_scales(sigma, mean_abs, [torch.zeros(4, 64)], QuantScheme(bits=4, group_size=32), grid=5)
    assert (alpha, loss) == (0.0, 0.0)
    assert torch.equal(scales, torch.ones(64))


def test_searches_score_the_grid_the_checkpoint_stores() -> None:
    """With bf16 scales (the model dtype), the reported loss is that of bf16-rounded scales."""
    x, w = _random_layer(3, 64, 128, 256)
    sigma, mean_abs = _stats(x)
    scheme = QuantScheme(bits=4, group_size=32)
    scales, _, loss = search_scales(sigma, mean_abs, [w], scheme, scale_dtype=torch.bfloat16)
    stored = fake_quantize(w * scales, scheme, scale_dtype=torch.bfloat16) / scales
    assert loss == pytest.approx(_mse(x, w, stored), rel=1e-4)


def test_clip_chunk_follows_the_memory_budget() -> None:
    assert clip_chunk(112, 14336) == (1 << 30) // (4 * 8 * 14336)
    assert clip_chunk(112, 14336, budget=1) == 1  # never zero


class _CountOps(TorchDispatchMode):
    """Counts the aten ops a block runs; `_local_scalar_dense` is what .item()/float()/bool() of a tensor do,
    the device→host syncs on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_searches_read_scalars_once_not_per_step() -> None:
    """One scalar read (the deferred scale check) per search, however many chunks and grid steps."""
    x, w = _random_layer(0, 40, 64, 32)
    sigma, mean_abs = _stats(x)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    for chunk_bytes in (1, 1 << 30):  # 40 chunks of one channel, or one chunk
        with _CountOps() as counted:
            search_clip(sigma, w, scheme, chunk_bytes=chunk_bytes)
        assert counted.ops["aten._local_scalar_dense"] == 1
    with _CountOps() as counted:
        search_scales(sigma, mean_abs, [w], scheme)  # plus one .tolist() of the 20 losses, which bypasses dispatch
    assert counted.ops["aten._local_scalar_dense"] == 1
