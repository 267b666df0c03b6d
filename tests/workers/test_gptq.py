"""GPTQ: the Hessian, the sweep's advantage over RTN on correlated inputs, act-order, and the fallbacks."""

import math

import pytest
import torch

from workers.quant.gptq import HessianAccumulator, gptq_quantize
from workers.quant.rtn import rtn_quantize
from workers.spec import QuantScheme

IN, OUT, TOKENS = 128, 48, 1024


def _correlated_inputs(seed: int = 0) -> torch.Tensor:
    """Inputs X = Z·A (+ a little noise): strongly correlated features, where GPTQ's updates pay off."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN, IN, generator=g) / math.sqrt(IN)
    return torch.randn(TOKENS, IN, generator=g) @ mixing + 0.1 * torch.randn(TOKENS, IN, generator=g)


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ (w - w_hat).T).norm())


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _correlated_inputs()
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(IN)
    acc.add(x)
    return x, w, acc.hessian


def test_hessian_accumulator_equals_the_direct_formula() -> None:
    x = _correlated_inputs(seed=3).to(torch.float64)
    x[100:101] = x[100:101].to(torch.bfloat16).to(torch.float64)  # exact in bf16: checks the cast
    acc = HessianAccumulator(IN)
    acc.add(x[:100].reshape(4, 25, IN).to(torch.float32))  # [batch, seq, in]
    acc.add(x[100:101].to(torch.bfloat16))
    acc.add(x[101:].to(torch.float32))
    acc.add(torch.empty(0, IN))
    direct = 2 / TOKENS * x.T @ x
    assert acc.num_samples == TOKENS
    assert acc.hessian.dtype == torch.float32
    assert torch.allclose(acc.hessian.double(), direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))
    with pytest.raises(ValueError, match="expects 128"):
        acc.add(torch.randn(3, 64))


def test_an_accumulator_without_magnitudes_has_the_same_hessian_and_no_abs_statistics() -> None:
    """GPTQ and RTN read only the Hessian: their capture skips Σ|x| and max|x| (AWQ's and static FP8's)."""
    x = _correlated_inputs(seed=4).to(torch.float32)
    both, bare = HessianAccumulator(IN), HessianAccumulator(IN, magnitudes=False)
    for acc in (both, bare):
        acc.add(x[:70])
        acc.add(x[70:])
    assert torch.equal(both.hessian, bare.hessian)
    assert torch.allclose(both.mean_abs, x.abs().mean(dim=0), rtol=1e-5)
    assert float(both.abs_max) == float(x.abs().max())
    for read in (lambda: bare.mean_abs, lambda: bare.abs_max, bare.abs_sum):
        with pytest.raises(ValueError, match="magnitudes=False"):
            read()


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(problem, bits, symmetric, group_size, act_order) -> None:
    x, w, hessian = problem
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    result = gptq_quantize(w, hessian, scheme, act_order=act_order, block_size=32)
    assert not result.fell_back_to_rtn and result.note is None and result.dampening == 0.01
    assert math.isfinite(result.loss) and result.loss > 0
    gptq_error = _output_error(x, w, result.quantized.dequantize())
    rtn_error = _output_error(x, w, rtn_quantize(w, scheme).dequantize())
    # 2-bit symmetric groups recomputed from error-updated weights grow their ranges (known GPTQ
    # behaviour), so that one case gains least; everywhere else the gain is large.
    limit = 0.99 if bits == 2 and symmetric and group_size != -1 and not act_order else 0.85
    assert gptq_error < limit * rtn_error


def test_block_size_does_not_change_the_result(problem) -> None:
    """Lazy batch updates are an exact reordering of the same arithmetic (up to float rounding)."""
    _, w, hessian = problem
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    small = gptq_quantize(w, hessian, scheme, block_size=32).quantized
    large = gptq_quantize(w, hessian, scheme, block_size=128).quantized
    assert (small.q != large.q).float().mean() < 0.01
    assert torch.allclose(small.scale, large.scale, rtol=1e-4)


def test_act_order_keeps_static_groups_in_the_original_layout(problem) -> None:
    """With act_order the group parameters are those of RTN on the original weight, and the codes are in
    the original column order (otherwise the output error would be far worse than RTN's)."""
    x, w, hessian = problem
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    result = gptq_quantize(w, hessian, scheme, act_order=True).quantized
    rtn = rtn_quantize(w, scheme)
    assert torch.equal(result.scale, rtn.scale)
    assert _output_error(x, w, result.dequantize()) < 0.85 * _output_error(x, w, rtn.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_reduce_gptq_to_rtn(act_order: bool) -> None:
    """With H = I there is no error to push anywhere, so GPTQ must give exactly RTN's codes."""
    w = torch.randn(OUT, IN)
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    result = gptq_quantize(w, torch.eye(IN), scheme, act_order=act_order).quantized
    rtn = rtn_quantize(w, scheme)
    assert torch.equal(result.q, rtn.q) and torch.equal(result.scale, rtn.scale)
    assert result.zero_point is not None and rtn.zero_point is not None
    assert torch.equal(result.zero_point, rtn.zero_point)


def test_inputs_are_not_modified(problem) -> None:
    _, w, hessian = problem
    w_before, h_before = w.clone(), hessian.clone()
    dead = hessian.clone()
    dead[:, 5] = 0
    dead[5, :] = 0
    dead_before = dead.clone()
    gptq_quantize(w, hessian, QuantScheme(bits=4, group_size=32), act_order=True)
    gptq_quantize(w, dead, QuantScheme(bits=4, group_size=32))
    assert torch.equal(w, w_before) and torch.equal(hessian, h_before) and torch.equal(dead, dead_before)


def test_dead_inputs_get_zero_weights_and_the_rest_still_improves() -> None:
    x = _correlated_inputs(seed=5)
    dead = [3, 40, 41, 127]
    x[:, dead] = 0
    w = torch.randn(OUT, IN)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    result = gptq_quantize(w, 2 / TOKENS * x.T @ x, scheme)
    dense = result.quantized.dequantize()
    assert not result.fell_back_to_rtn and math.isfinite(result.loss)
    assert torch.equal(dense[:, dead], torch.zeros(OUT, len(dead)))
    assert _output_error(x, w, dense) < 0.85 * _output_error(x, w, rtn_quantize(w, scheme).dequantize())


@pytest.mark.parametrize(
    "hessian",
    [torch.full((IN, IN), float("nan")), -torch.eye(IN) - 0.5, torch.diag(torch.linspace(-3.0, 1.0, IN))],
    ids=["nan", "negative-definite", "indefinite"],
)
def test_cholesky_failure_falls_back_to_rtn(hessian: torch.Tensor) -> None:
    w = torch.randn(OUT, IN)
    scheme = QuantScheme(bits=4, group_size=64)
    result = gptq_quantize(w, hessian, scheme)
    assert result.fell_back_to_rtn
    assert result.note is not None and "Cholesky" in result.note and "RTN" in result.note
    assert math.isnan(result.loss)
    assert bool(torch.isfinite(result.quantized.dequantize()).all())
    assert torch.equal(result.quantized.q, rtn_quantize(w, scheme).q)


def test_dampening_is_raised_before_giving_up() -> None:
    """Eigenvalues 2.02 and -0.02 with mean diagonal 1: λ = 0.01 is not enough, λ = 0.1 is."""
    hessian = torch.eye(64)
    hessian[0, 1] = hessian[1, 0] = 1.02
    result = gptq_quantize(torch.randn(8, 64), hessian, QuantScheme(bits=4, group_size=32))
    assert not result.fell_back_to_rtn
    assert result.dampening == pytest.approx(0.1)
    assert result.note is not None and "dampening raised to 0.1" in result.note


def test_bad_arguments_are_rejected(problem) -> None:
    _, w, hessian = problem
    with pytest.raises(ValueError, match="does not match weight input size 128"):
        gptq_quantize(w, hessian[:64, :64], QuantScheme())
    with pytest.raises(ValueError, match="block_size=0"):
        gptq_quantize(w, hessian, QuantScheme(group_size=32), block_size=0)
