"""AWQ: activation-aware scales and clip search lower the output error in the setting AWQ targets."""

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workers.errors import InputError, InvalidSpecError
from workers.quant.awq import (
    CLIP_CHUNK_BYTES,
    MIN_SCALE,
    TOKEN_CHUNK,
    apply_clip,
    clip_bytes_per_channel,
    clip_chunk,
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


def _mse(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ (w - w_hat).T).square().mean())


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
    scales, alpha, loss = search_scales(x, weights, scheme)
    assert scales.shape == (IN,) and bool((scales > 0).all())
    assert 0 < alpha < 1
    for w in weights:
        awq = rtn_quantize(w * scales, scheme).dequantize() / scales  # fold 1/s into the previous op
        assert _mse(x, w, awq) < 0.7 * _mse(x, w, rtn_quantize(w, scheme).dequantize())
    # the reported loss is the output MSE over all weights together
    stacked = torch.cat(weights)
    expected = _mse(x, stacked, fake_quantize(stacked * scales, scheme) / scales)
    assert loss == pytest.approx(expected, rel=1e-4)


def test_alpha_zero_is_plain_rtn(layer) -> None:
    x, weights = layer
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    scales, alpha, loss = search_scales(x, weights, scheme, grid=1)  # only α = 0 is tried
    assert alpha == 0.0 and torch.equal(scales, torch.ones(IN))
    stacked = torch.cat(weights)
    assert loss == pytest.approx(_mse(x, stacked, rtn_quantize(stacked, scheme).dequantize()), rel=1e-5)


def test_scale_search_is_never_worse_than_rtn_even_without_outliers() -> None:
    x = torch.randn(TOKENS, IN)
    w = torch.randn(64, IN)
    scheme = QuantScheme(bits=4, group_size=32)
    _, _, loss = search_scales(x, [w], scheme)
    assert loss <= _mse(x, w, rtn_quantize(w, scheme).dequantize()) * (1 + 1e-5)


def _group_errors(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, group: int) -> torch.Tensor:
    """Per (out, group): mean over tokens of (x_g · (w_g - ŵ_g))², the objective of the clip search."""
    xg = x.reshape(x.shape[0], -1, group)
    delta = (w - w_hat).reshape(w.shape[0], -1, group)
    return torch.einsum("tgk,ogk->otg", xg, delta).square().mean(dim=1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_clip_search_never_increases_the_error(layer, scheme: QuantScheme) -> None:
    x, weights = layer
    w = weights[0].clone()
    w[:, ::17] *= 6  # heavy-tailed weights: clipping the outliers should pay off
    clip = search_clip(x, w, scheme)
    groups = 1 if scheme.group_size == -1 else IN // scheme.group_size
    assert clip.shape == (96, groups, 2)
    assert bool((clip[..., 0] <= 0).all()) and bool((clip[..., 1] >= 0).all())
    if scheme.symmetric:
        assert torch.equal(clip[..., 0], -clip[..., 1])
    clipped = rtn_quantize(apply_clip(w, clip), scheme).dequantize()
    plain = rtn_quantize(w, scheme).dequantize()
    group = IN // groups
    assert bool((_group_errors(x, w, clipped, group) <= _group_errors(x, w, plain, group) * (1 + 1e-5)).all())
    assert _mse(x, w, clipped) < _mse(x, w, plain)


def test_clip_bounds_are_the_grid_rtn_rebuilds() -> None:
    """After apply_clip, min-max RTN uses exactly the searched bounds: scale = upper / (2^(b-1) - 1)."""
    x, w = torch.randn(64, IN), torch.randn(40, IN)
    w[:, 0] = 20.0  # an outlier in every row: the search clips it in some rows
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    clip = search_clip(x, w, scheme, max_tokens=16)
    assert bool((clip[:, 0, 1] < 20.0).any())
    assert torch.allclose(rtn_quantize(apply_clip(w, clip), scheme).scale, clip[..., 1] / 7)


def test_apply_clip_clamps_each_group_to_its_bounds() -> None:
    w = torch.tensor([[-4.0, 1.0, 3.0, -0.5]])
    clip = torch.tensor([[[-2.0, 2.0], [-0.25, 1.0]]])
    assert torch.equal(apply_clip(w, clip), torch.tensor([[-2.0, 1.0, 1.0, -0.25]]))
    with pytest.raises(InvalidSpecError, match="does not fit a weight"):
        apply_clip(w, torch.zeros(1, 3, 2))


def test_bad_inputs_are_rejected() -> None:
    scheme = QuantScheme(bits=4, group_size=32)
    with pytest.raises(InvalidSpecError, match="does not take inputs of 128 features"):
        search_scales(torch.randn(8, IN), [torch.randn(4, 64)], scheme)
    with pytest.raises(InvalidSpecError, match="at least one weight"):
        search_scales(torch.randn(8, IN), [], scheme)
    with pytest.raises(InvalidSpecError, match="at least one token"):
        search_clip(torch.randn(0, IN), torch.randn(4, IN), scheme)
    with pytest.raises(InvalidSpecError, match="max_shrink"):
        search_clip(torch.randn(8, IN), torch.randn(4, IN), scheme, max_shrink=1.5)


def test_non_finite_weights_are_rejected_after_the_search() -> None:
    scheme = QuantScheme(bits=4, group_size=32)
    w = torch.randn(8, IN)
    w[5, 70] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        search_clip(torch.randn(16, IN), w, scheme, chunk_bytes=1)
    with pytest.raises(InputError, match="non-finite"):
        search_scales(torch.randn(16, IN), [torch.randn(4, IN), w], scheme)
    x = torch.randn(16, IN)
    x[3, 9] = float("inf")  # α > 0 turns the infinite channel mean into NaN scales
    with pytest.raises(InputError, match="non-finite"):
        search_scales(x, [torch.randn(4, IN)], scheme)


# --- Equivalence with the version that evaluated one candidate at a time -------------------------------
# Frozen copies of search_scales / search_clip before the sync-free rewrite (64 output channels per clip
# step, a Python float loss per α). The rewrite must make exactly the same choices on the CPU.

_OLD_CHANNEL_CHUNK = 64


def _old_output_mse(x: torch.Tensor, weight_delta: torch.Tensor) -> float:
    total = sum(float((chunk @ weight_delta.T).square().sum()) for chunk in x.split(TOKEN_CHUNK))
    return total / (x.shape[0] * weight_delta.shape[0])


def _old_search_scales(
    x: torch.Tensor, weights: list[torch.Tensor], scheme: QuantScheme, grid: int = 20
) -> tuple[torch.Tensor, float, float]:
    w = torch.cat(weights)
    s_x = x.abs().mean(dim=0)
    best = (torch.ones_like(s_x), 0.0, float("inf"))
    for step in range(grid):
        alpha = step / grid
        s = s_x.pow(alpha).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        loss = _old_output_mse(x, w - fake_quantize(w * s, scheme) / s)
        if loss < best[2]:
            best = (s, alpha, loss)
    return best


def _old_search_clip(
    x: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5,
    max_tokens: int = 512,
) -> torch.Tensor:
    out, n = weight.shape
    groups = num_groups(n, scheme)
    x = x[:: max(1, x.shape[0] // max_tokens)][:max_tokens].reshape(-1, groups, n // groups)
    clip = torch.empty(out, groups, 2, dtype=torch.float32)
    for o1 in range(0, out, _OLD_CHANNEL_CHUNK):
        w = weight[o1 : o1 + _OLD_CHANNEL_CHUNK]
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
        clip[o1 : o1 + _OLD_CHANNEL_CHUNK] = torch.stack((best_lo, best_hi), dim=-1)
    return clip


EQUIVALENCE_SCHEMES = [QuantScheme(b, g, s) for b in (3, 4) for g in (32, 64, -1) for s in (True, False)]


def _random_layer(seed: int, out: int, n: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, torch.randperm(n, generator=g)[:5]] *= 20
    w = 0.05 * torch.randn(out, n, generator=g)
    w[torch.rand(out, n, generator=g) < 0.02] *= 8  # outliers: many groups prefer a ratio below 1
    return x, w


@pytest.mark.parametrize("scheme", EQUIVALENCE_SCHEMES, ids=str)
def test_clip_search_makes_the_choices_of_the_old_version(scheme: QuantScheme) -> None:
    x, w = _random_layer(scheme.bits * 100 + scheme.group_size, 200, 256, 300)
    expected = _old_search_clip(x, w, scheme, max_tokens=128)
    clipped = (expected != _old_search_clip(x, w, scheme, max_shrink=0.0, max_tokens=128)).any(dim=-1)
    assert bool(clipped.any()) and not bool(clipped.all())  # the test covers clipped and unclipped groups
    # one chunk of all 200 channels (either default budget), and chunks of 1, 7 and 64 channels
    per_channel = clip_bytes_per_channel(128, num_groups(256, scheme), 256)
    for chunk_bytes in (None, CLIP_CHUNK_BYTES, 1, 7 * per_channel, 64 * per_channel):
        got = search_clip(x, w, scheme, max_tokens=128, chunk_bytes=chunk_bytes)
        assert torch.equal(got, expected), chunk_bytes


@pytest.mark.parametrize("scheme", EQUIVALENCE_SCHEMES, ids=str)
def test_scale_search_makes_the_choices_of_the_old_version(scheme: QuantScheme) -> None:
    x, w = _random_layer(scheme.bits * 10 + scheme.group_size, 96, 256, 384)
    weights = [w[:64], w[64:]]
    expected = _old_search_scales(x, weights, scheme)
    scales, alpha, loss = search_scales(x, weights, scheme)
    assert alpha > 0 and alpha == expected[1] and loss == expected[2]  # exact floats, not approx
    assert torch.equal(scales, expected[0])


def test_scale_search_ties_go_to_the_first_minimum() -> None:
    """A weight RTN reproduces exactly at every α has loss 0 at every step: α = 0 must win, as before."""
    x = torch.randn(32, 64)
    w = torch.zeros(4, 64)
    scales, alpha, loss = search_scales(x, [w], QuantScheme(bits=4, group_size=32), grid=5)
    assert (alpha, loss) == (0.0, 0.0) == _old_search_scales(x, [w], QuantScheme(4, 32), grid=5)[1:]
    assert torch.equal(scales, torch.ones(64))


def test_clip_chunk_follows_the_memory_budget() -> None:
    # Llama-3-8B down_proj (in 14336, group 128 → 112 groups), 512 tokens: 2·512·112 + 8·14336 floats/channel
    assert clip_chunk(512, 112, 14336) == (1 << 30) // (4 * (2 * 512 * 112 + 8 * 14336)) == 1170
    assert clip_chunk(512, 32, 4096) == 4096  # q/k/v/o/gate/up inputs: 4096 channels per step
    assert clip_chunk(512, 112, 14336, budget=1) == 1  # never zero
    assert clip_chunk(128, 8, 256, budget=7 * clip_bytes_per_channel(128, 8, 256) + 5) == 7


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
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    for chunk_bytes in (1, CLIP_CHUNK_BYTES):  # 40 chunks of one channel, or one chunk
        with _CountOps() as counted:
            search_clip(x, w, scheme, chunk_bytes=chunk_bytes)
        assert counted.ops["aten._local_scalar_dense"] == 1
    with _CountOps() as counted:
        search_scales(x, [w], scheme)  # plus one .tolist() of the 20 losses, which bypasses dispatch
    assert counted.ops["aten._local_scalar_dense"] == 1
