"""AWQ: activation-aware scales and clip search lower the output error in the setting AWQ targets."""

import pytest
import torch

from workers.errors import InvalidSpecError
from workers.quant.awq import apply_clip, search_clip, search_scales
from workers.quant.grid import fake_quantize
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
