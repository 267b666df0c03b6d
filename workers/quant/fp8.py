"""The FP8 E4M3 weight grid (compressed-tensors `float-quantized`, what vLLM's FP8 kernels read).

E4M3 (`torch.float8_e4m3fn`): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities, largest finite
value 448. Normal numbers 2^e·(1 + m/8) for e in [-6, 8]; subnormals m/8·2^-6, so the grid step is
2^(e-3) with e = max(floor(log2|x|), -6). Symmetric, no zero point:

    scale = max|w| / 448  over the scale's region (an output row, the whole tensor, or a 128×128 block)
    q     = e4m3(clamp(w / scale, -448, 448))   round to nearest, ties to even (saturating)
    value = q · scale

Scales are stored in the model dtype (rounded to nearest; a rounded-down scale only saturates the largest
weight by less than a step of the 448 level, which is what compressed-tensors does too) and are never 0 (an
all-zero region gets the dtype's smallest normal number). The rounding is computed here in float32 by the
rule above (`round_to_e4m3`); the cast to float8_e4m3fn is then exact, and the tests check the rule against
torch's own cast.

Static activations: `input_scale` = max|x| / 448 over the calibration tokens of the Linear's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.errors import InputError, InvalidSpecError
from workers.quant.grid import QuantizedTensor
from workers.spec import FP8_BLOCK, QuantScheme

E4M3_MAX = 448.0
E4M3_MIN_EXPONENT = -6  # of the smallest normal number; subnormals share its step 2^-9
MANTISSA_BITS = 3


def round_to_e4m3(x: Tensor) -> Tensor:
    """float32 values of `x` rounded to the nearest E4M3 number (ties to even), saturated at ±448."""
    x = x.to(torch.float32).clamp(-E4M3_MAX, E4M3_MAX)
    _, exponent = torch.frexp(x)  # |x| = f·2^exponent with f in [0.5, 1): floor(log2|x|) = exponent - 1
    exponent = torch.clamp(exponent - 1, min=E4M3_MIN_EXPONENT)
    step = torch.ldexp(torch.ones_like(x), exponent - MANTISSA_BITS)
    return (torch.round(x / step) * step).clamp(-E4M3_MAX, E4M3_MAX)  # x/step and ·step are exact


def _scale_of(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """max|w| / 448 stored in `dtype` (float32 values of it), never 0; raises InputError on inf/NaN weights."""
    if not bool(torch.isfinite(amax).all()):
        raise InputError("the weight has non-finite values (inf or NaN); quantization needs finite weights")
    stored = (amax.to(torch.float32) / E4M3_MAX).to(dtype).to(torch.float32)
    return torch.where(stored == 0, torch.full_like(stored, torch.finfo(dtype).smallest_normal), stored)


def expand_scale(scale: Tensor, shape: tuple[int, int], strategy: str) -> Tensor:
    """The scale of every weight `[out, in]`."""
    out, n = shape
    if strategy == "block":
        return scale.repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :n]
    return scale.reshape(-1, 1).expand(out, n) if strategy == "channel" else scale.reshape(1, 1).expand(out, n)


@dataclass
class FloatQuantizedTensor(QuantizedTensor):
    """An FP8 weight: `q` float8_e4m3fn `[out, in]`; `scale` float32 `[out, 1]` (channel), `[1]` (tensor) or
    `[ceil(out/128), ceil(in/128)]` (block); `input_scale` float32 `[1]` for static activations."""

    input_scale: Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        values = self.q.to(torch.float32) * expand_scale(self.scale.to(torch.float32), self.shape, str(self.scheme.strategy))
        return values.to(dtype)


def fp8_quantize(weight: Tensor, scheme: QuantScheme, *, scale_dtype: torch.dtype | None = None) -> FloatQuantizedTensor:
    """FP8 E4M3 codes of `weight` `[out, in]` with min-max scales of the scheme's strategy (module docstring)."""
    scheme.validate()
    if not scheme.is_float:
        raise InvalidSpecError(f"fp8_quantize takes an FP8 scheme (type 'float'), not {scheme}")
    if weight.ndim != 2 or not weight.is_floating_point():
        raise InvalidSpecError(
            f"expected a 2-D floating-point weight [out, in], got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    w = weight.detach().to(torch.float32)
    out, n = w.shape
    dtype = scale_dtype or weight.dtype
    if scheme.strategy == "channel":
        scale = _scale_of(w.abs().amax(dim=1, keepdim=True), dtype)
    elif scheme.strategy == "tensor":
        scale = _scale_of(w.abs().amax().reshape(1), dtype)
    else:
        rows, cols = math.ceil(out / FP8_BLOCK), math.ceil(n / FP8_BLOCK)
        padded = torch.nn.functional.pad(w.abs(), (0, cols * FP8_BLOCK - n, 0, rows * FP8_BLOCK - out))
        scale = _scale_of(padded.reshape(rows, FP8_BLOCK, cols, FP8_BLOCK).amax(dim=(1, 3)), dtype)
    q = round_to_e4m3(w / expand_scale(scale, (out, n), str(scheme.strategy))).to(torch.float8_e4m3fn)
    return FloatQuantizedTensor(q, scale, None, scheme)


def input_scale(abs_max: Tensor | float, dtype: torch.dtype) -> Tensor:
    """Static per-tensor activation scale `[1]` (float32 values of `dtype`) from the observed max|x|."""
    return _scale_of(torch.as_tensor(abs_max, dtype=torch.float32).reshape(1), dtype)
