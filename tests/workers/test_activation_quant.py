"""The runtime's activation quantization that evaluation applies to W8A8 and FP8 checkpoints
(workers/activation_quant.py), against torch's own float8_e4m3fn cast and a plain int8 rounding."""

from __future__ import annotations

import torch
from torch import nn

from workers import activation_quant
from workers.spec import FP8_PRESETS, W8A8_INT8, QuantScheme


def _x() -> torch.Tensor:
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(0))
    x[..., 7] *= 50  # an outlier channel
    return x


def test_fp8_per_token_and_per_group_are_torchs_e4m3_cast_with_max_over_448_scales() -> None:
    x = _x()
    for group in (None, 128):
        shaped = x.reshape(3, 5, -1, group) if group else x.unsqueeze(-2)
        scale = shaped.abs().amax(dim=-1, keepdim=True) / 448
        expected = ((shaped / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale).reshape(x.shape)
        assert torch.equal(activation_quant.fp8_per_token(x, group), expected)
    scale = torch.tensor([0.05])
    expected = (x / 0.05).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * 0.05
    assert torch.allclose(activation_quant.fp8_static(x, scale), expected, rtol=0, atol=1e-6)


def test_quantizers_by_scheme_and_hooks_on_a_linear() -> None:
    assert activation_quant.input_quantizer(QuantScheme(4, 32)) is None  # weight-only: no hook
    assert activation_quant.input_quantizer(W8A8_INT8) is not None
    assert activation_quant.input_quantizer(FP8_PRESETS["fp8-static"], torch.tensor([0.1])) is not None
    linear = nn.Linear(256, 4, bias=False)
    x = _x()
    quantize = activation_quant.input_quantizer(W8A8_INT8)
    assert quantize is not None
    handles = activation_quant.attach(nn.ModuleDict({"proj": linear}), {"proj": quantize})
    with torch.no_grad():
        hooked = linear(x)
        for handle in handles:
            handle.remove()
        amax = x.abs().amax(dim=-1, keepdim=True)
        expected = linear(torch.clamp(torch.round(x / (amax / 127)), -128, 127) * (amax / 127))
    assert torch.allclose(hooked, expected, atol=1e-5)
