"""Emulate a W8A8 runtime's input quantization on a materialised decoder layer: forward pre-hooks that
quantize each quantized Linear's input the way the serving kernel does, so evaluation scores what vLLM runs.

* int8 W8A8 (`int-quantized`): per token, dynamic, symmetric int8 (workers/quant/int8.py);
* FP8 dynamic: per token E4M3, scale max|x|/448 (block FP8: per token and 128-column group);
* FP8 static: E4M3 with the checkpoint's per-tensor `input_scale`.
Weight-only schemes get no hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from workers.quant.fp8 import E4M3_MAX, round_to_e4m3
from workers.quant.int8 import fake_quantize_per_token
from workers.spec import FP8_BLOCK, QuantScheme

Quantizer = Callable[[Tensor], Tensor]


def fp8_per_token(x: Tensor, group: int | None = None) -> Tensor:
    """x through E4M3 with one scale (max|x|/448) per token, or per `group` columns of each token."""
    values = x.to(torch.float32)
    shaped = values.reshape(*values.shape[:-1], -1, group) if group else values.unsqueeze(-2)
    amax = shaped.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (round_to_e4m3(shaped / scale) * scale).reshape(values.shape).to(x.dtype)


def fp8_static(x: Tensor, scale: Tensor) -> Tensor:
    s = scale.to(x.device, torch.float32).reshape(())
    return (round_to_e4m3(x.to(torch.float32) / s) * s).to(x.dtype)


def input_quantizer(scheme: QuantScheme, input_scale: Tensor | None = None) -> Quantizer | None:
    """The runtime's input quantization of a Linear on `scheme`, or None for weight-only schemes."""
    if scheme.is_w8a8_int:
        return fake_quantize_per_token
    if not scheme.is_float:
        return None
    if scheme.activations == "static":
        if input_scale is None:
            raise ValueError("static FP8 activations need the Linear's input_scale")
        scale = input_scale
        return lambda x: fp8_static(x, scale)
    group = FP8_BLOCK if scheme.strategy == "block" else None
    return lambda x: fp8_per_token(x, group) if group is None or x.shape[-1] % group == 0 else fp8_per_token(x)


def attach(layer: nn.Module, quantizers: dict[str, Quantizer]) -> list[RemovableHandle]:
    """Quantize the input of each named Linear of `layer` (name relative to the layer) on every forward."""
    handles = []
    for name, quantize in quantizers.items():

        def hook(_m: nn.Module, args: tuple[Tensor, ...], quantize: Quantizer = quantize) -> tuple[Tensor, ...]:
            return (quantize(args[0]), *args[1:])

        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    return handles
