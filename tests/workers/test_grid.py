"""The quantization grid and RTN: scale conventions, compressed-tensors agreement, guards and errors."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from workers.errors import InputError, InvalidSpecError
from workers.quant.grid import (
    QuantizedTensor,
    ScaleCheck,
    check_group_size,
    compute_qparams,
    fake_quantize,
    qrange,
    quantize_values,
)
from workers.quant.rtn import rtn_quantize
from workers.spec import QuantScheme

SCHEMES = [QuantScheme(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 32) for s in (True, False)]


def _ct_args(scheme: QuantScheme) -> QuantizationArgs:
    if scheme.group_size == -1:
        return QuantizationArgs(num_bits=scheme.bits, symmetric=scheme.symmetric, strategy="channel")
    return QuantizationArgs(
        num_bits=scheme.bits, symmetric=scheme.symmetric, strategy="group", group_size=scheme.group_size
    )


def test_symmetric_grid_uses_all_two_to_the_b_levels() -> None:
    """scale = 2·max|w| / (2^b − 1): −max|w| reaches −2^(b−1) and +max|w| clips by half a step to 2^(b−1) − 1."""
    w = torch.tensor([[0.5, -1.4, 0.7, 0.1], [0.0, 0.3, -0.2, 0.6]])
    qt = rtn_quantize(w, QuantScheme(bits=4, group_size=-1, symmetric=True))
    assert torch.allclose(qt.scale, torch.tensor([[1.4 / 7.5], [0.6 / 7.5]]), rtol=1e-6, atol=0)
    assert qt.zero_point is None
    assert qt.q[0, 1] == -8 and qt.q[1, 3] == 7
    for bits in (2, 3, 4, 8):  # the step is 2/(2^b − 1) of the range: 2^b levels span it (the old grid: 2^b − 1)
        ramp = rtn_quantize(torch.linspace(-1, 1, 4096).reshape(1, -1), QuantScheme(bits, -1, True))
        assert torch.allclose(ramp.scale, torch.tensor([[2 / (2**bits - 1)]]), rtol=1e-6, atol=0)
        assert torch.unique(ramp.q).numel() >= 2**bits - 1
    expected = torch.round(w / qt.scale).clamp(-8, 7)
    assert torch.equal(qt.q.float(), expected)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_rtn_agrees_with_compressed_tensors(scheme: QuantScheme) -> None:
    """Params equal calculate_qparams (both grids); codes equal compressed-tensors' quantize; and its
    dequantize of our codes equals ours, so checkpoints we write mean what we think they mean."""
    torch.manual_seed(scheme.bits)
    w = torch.randn(16, 64) + 0.3
    qt = rtn_quantize(w, scheme)
    args = _ct_args(scheme)
    groups = w.reshape(16, qt.scale.shape[1], -1)
    scale, zero = calculate_qparams(groups.amin(dim=2), groups.amax(dim=2), args)
    assert torch.allclose(qt.scale, scale, rtol=1e-6, atol=0)
    if not scheme.symmetric:
        assert qt.zero_point is not None and torch.equal(qt.zero_point, zero)
    zero = qt.zero_point if qt.zero_point is not None else torch.zeros_like(qt.scale, dtype=torch.int8)
    assert torch.equal(ct_quantize(w, qt.scale, zero, args, dtype=torch.int8), qt.q)
    assert torch.equal(ct_dequantize(qt.q, qt.scale, zero, args), qt.dequantize())


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_rtn_error_is_at_most_half_a_step(scheme: QuantScheme) -> None:
    w = torch.randn(8, 64, dtype=torch.float64).to(torch.float32)
    qt = rtn_quantize(w, scheme)
    qmin, qmax = qrange(scheme.bits)
    assert qt.q.dtype == torch.int8 and int(qt.q.min()) >= qmin and int(qt.q.max()) <= qmax
    assert qt.scale.shape == (8, 1 if scheme.group_size == -1 else 2)
    step = qt.scale.repeat_interleave(64 // qt.scale.shape[1], dim=1)
    assert bool(((w - qt.dequantize()).abs() <= step / 2 * (1 + 1e-4)).all())  # +max clips by exactly half a step


def test_dequantize_follows_the_group_formula() -> None:
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    q = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
    scale = torch.rand(3, 2) + 0.1
    zero = torch.randint(-8, 8, (3, 2), dtype=torch.int8)
    dense = QuantizedTensor(q, scale, zero, scheme).dequantize()
    for i in range(3):
        for j in range(64):
            expected = (float(q[i, j]) - float(zero[i, j // 32])) * float(scale[i, j // 32])
            assert dense[i, j].item() == pytest.approx(expected, rel=1e-6)


def test_zero_groups_get_a_positive_scale_and_quantize_to_zero() -> None:
    w = torch.zeros(4, 64)
    w[0, 32:] = torch.linspace(-1, 1, 32)
    for symmetric in (True, False):
        qt = rtn_quantize(w, QuantScheme(bits=4, group_size=32, symmetric=symmetric))
        assert bool((qt.scale > 0).all())
        assert torch.equal(qt.dequantize()[:, :32], torch.zeros(4, 32))
        assert torch.equal(qt.dequantize()[1:], torch.zeros(3, 64))


def test_asymmetric_range_always_includes_zero() -> None:
    w = torch.full((1, 32), 2.0)
    w[0, 0] = 3.0  # all positive: the range is widened to [0, 3]
    scale, zero = compute_qparams(w, QuantScheme(bits=4, group_size=32, symmetric=False))
    assert scale.item() == pytest.approx(3.0 / 15)
    assert zero is not None and zero.item() == -8  # unsigned zero point 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scales_are_rounded_to_the_storage_dtype(dtype: torch.dtype) -> None:
    """So a checkpoint storing the scale in `dtype` dequantizes to exactly qt.dequantize()."""
    w = torch.randn(16, 64).to(dtype)
    qt = rtn_quantize(w, QuantScheme(bits=4, group_size=32, symmetric=False))
    assert torch.equal(qt.scale.to(dtype).to(torch.float32), qt.scale)
    qt32 = rtn_quantize(w.float(), QuantScheme(bits=4, group_size=32), scale_dtype=dtype)
    assert torch.equal(qt32.scale.to(dtype).to(torch.float32), qt32.scale)


def test_compute_qparams_for_one_group_and_with_given_ranges() -> None:
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    w = torch.randn(4, 64)
    all_scales, _ = compute_qparams(w, scheme)
    one_scale, _ = compute_qparams(w[:, 32:], scheme)
    assert torch.equal(all_scales[:, 1:], one_scale)
    clipped, _ = compute_qparams(w, scheme, max_val=torch.full((4, 2), 0.7), min_val=torch.full((4, 2), -0.7))
    assert torch.allclose(clipped, torch.full((4, 2), 0.7 / 7.5))
    q = quantize_values(w, clipped, None, scheme)
    assert int(q.max()) <= 7 and int(q.min()) >= -8


def test_check_group_size_names_the_module() -> None:
    scheme = QuantScheme(bits=4, group_size=128)
    check_group_size("model.layers.0.self_attn.q_proj", 512, scheme)
    check_group_size("any", 576, QuantScheme(bits=4, group_size=-1))
    with pytest.raises(
        InvalidSpecError, match="group_size 128 does not divide in_features 576 of model.layers.0.mlp"
    ):
        check_group_size("model.layers.0.mlp.down_proj", 576, scheme)


def test_bad_weights_are_rejected() -> None:
    scheme = QuantScheme(bits=4, group_size=32)
    with pytest.raises(InvalidSpecError, match="2-D floating-point"):
        rtn_quantize(torch.randn(64), scheme)
    with pytest.raises(InvalidSpecError, match="2-D floating-point"):
        rtn_quantize(torch.ones(2, 64, dtype=torch.int32), scheme)
    with pytest.raises(InvalidSpecError, match="does not divide in_features 48"):
        rtn_quantize(torch.randn(2, 48), scheme)
    with pytest.raises(InvalidSpecError, match="bits=5"):
        rtn_quantize(torch.randn(2, 64), QuantScheme(bits=5, group_size=32))
    bad = torch.randn(2, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        rtn_quantize(bad, scheme)


def test_too_large_scales_are_rejected_for_the_storage_dtype() -> None:
    w = torch.full((2, 32), 1e6)  # scale 1e6 / 7.5 > 65504, the largest float16
    with pytest.raises(InputError, match="exceeds the largest torch.float16 value 65504"):
        rtn_quantize(w, QuantScheme(bits=4, group_size=32), scale_dtype=torch.float16)


def test_scale_check_defers_the_errors_and_keeps_the_values() -> None:
    """With a ScaleCheck, quantizing records instead of raising, returns what the eager call returns, and
    `raise_first` raises the error of the first failed call, as the eager checks would have."""
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    w = torch.randn(4, 64)
    check = ScaleCheck()
    assert torch.equal(fake_quantize(w, scheme, check=check), fake_quantize(w, scheme))
    check.raise_first()  # nothing failed

    check = ScaleCheck()
    scale, zero = compute_qparams(w, scheme, scale_dtype=torch.float16, check=check)
    eager_scale, eager_zero = compute_qparams(w, scheme, scale_dtype=torch.float16)
    assert torch.equal(scale, eager_scale) and zero is not None and eager_zero is not None
    assert torch.equal(zero, eager_zero)
    huge, bad = torch.full((4, 64), 1e6), w.clone()
    bad[2, 40] = float("inf")
    compute_qparams(huge, scheme, scale_dtype=torch.float16, check=check)  # first failure: too large
    compute_qparams(bad, scheme, scale_dtype=torch.float16, check=check)
    with pytest.raises(ValueError, match="one scale dtype"):
        compute_qparams(w, scheme, scale_dtype=torch.bfloat16, check=check)
    with pytest.raises(InputError, match="exceeds the largest torch.float16"):
        check.raise_first()

    check = ScaleCheck()
    fake_quantize(bad, scheme, check=check)  # first failure: non-finite
    fake_quantize(torch.full((4, 64), 1e38), scheme, check=check)
    with pytest.raises(InputError, match="non-finite"):
        check.raise_first()


def test_eager_checks_still_raise_at_the_call() -> None:
    scheme = QuantScheme(bits=4, group_size=32)
    with pytest.raises(InputError, match="non-finite"):
        fake_quantize(torch.full((1, 32), float("nan")), scheme)
    with pytest.raises(InputError, match="non-finite"):  # 3e38 - (-3e38) overflows to inf
        compute_qparams(torch.tensor([[3e38] * 16 + [-3e38] * 16]), QuantScheme(4, 32, symmetric=False))
