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
torch's own cast. Per-channel scales with the "mse" observer (the job default): each row takes the one of four
candidate scales (min-max's times 2^(t/4)) with the lowest rounding error, weighted by the inputs' E[x²] when the
job calibrates (`CHANNEL_SCALE_FACTORS`); GPTQ keeps min-max scales (workers/quant/fp8_gptq.py says why).

Static activations: `input_scale` = max|x| / 448 over the calibration tokens of the Linear's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.errors import InputError, InvalidSpecError
from workers.quant.grid import QuantizedTensor
from workers.spec import FP8_BLOCK, Observer, QuantScheme

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


# The "mse" observer's per-channel candidates: the min-max scale times 2^(t/4), t = 0..3, over one octave (a factor
# of 2 maps the E4M3 grid onto itself but for saturation and subnormals), so the row's weights fall at other points
# of the grid; each row keeps the candidate with the lowest error. Factors ≥ 1: nothing saturates.
CHANNEL_SCALE_FACTORS = (1.0, 2**0.25, 2**0.5, 2**0.75)


def fp8_quantize(
    weight: Tensor, scheme: QuantScheme, *, scale_dtype: torch.dtype | None = None, observer: Observer = "minmax",
    importance: Tensor | None = None,
) -> FloatQuantizedTensor:
    """FP8 E4M3 codes of `weight` `[out, in]` with min-max scales of the scheme's strategy (module docstring); with
    `observer="mse"` and per-channel scales, each row takes the scale of `CHANNEL_SCALE_FACTORS` whose rounding
    error, each input column weighted by `importance` (E[x²]; None: uniform), is lowest."""
    scheme.validate()
    if not scheme.is_float:
        raise InvalidSpecError(f"fp8_quantize takes an FP8 scheme (type 'float'), not {scheme}")
    if weight.ndim != 2 or not weight.is_floating_point():
        raise InvalidSpecError(
            f"expected a 2-D floating-point weight [out, in], got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    w = weight.detach().to(torch.float32)
    dtype = scale_dtype or weight.dtype
    if observer != "mse" or scheme.strategy != "channel":
        return rounded(w, min_max_scale(w, scheme, dtype), scheme)
    candidates = [rounded(w, min_max_scale(w, scheme, dtype, factor), scheme) for factor in CHANNEL_SCALE_FACTORS]
    columns = importance.to(w.device, torch.float32) if importance is not None else torch.ones_like(w[0])
    errors = torch.stack([((c.dequantize() - w).square() * columns).sum(dim=1) for c in candidates])
    return best_rows(candidates, errors)


def min_max_scale(w: Tensor, scheme: QuantScheme, dtype: torch.dtype, factor: float = 1.0) -> Tensor:
    """max|w|·factor / 448 per channel, tensor or 128×128 block, stored in `dtype`."""
    out, n = w.shape
    if scheme.strategy == "channel":
        return _scale_of(w.abs().amax(dim=1, keepdim=True) * factor, dtype)
    if scheme.strategy == "tensor":
        return _scale_of(w.abs().amax().reshape(1) * factor, dtype)
    rows, cols = math.ceil(out / FP8_BLOCK), math.ceil(n / FP8_BLOCK)
    padded = torch.nn.functional.pad(w.abs(), (0, cols * FP8_BLOCK - n, 0, rows * FP8_BLOCK - out))
    return _scale_of(padded.reshape(rows, FP8_BLOCK, cols, FP8_BLOCK).amax(dim=(1, 3)) * factor, dtype)


def rounded(w: Tensor, scale: Tensor, scheme: QuantScheme) -> FloatQuantizedTensor:
    """`w` (float32) rounded to E4M3 on `scale`."""
    out, n = w.shape
    q = round_to_e4m3(w / expand_scale(scale, (out, n), str(scheme.strategy))).to(torch.float8_e4m3fn)
    return FloatQuantizedTensor(q, scale, None, scheme)


def best_rows(candidates: list[FloatQuantizedTensor], errors: Tensor) -> FloatQuantizedTensor:
    """Per output row, the per-channel candidate with the lowest of `errors` `[candidates, out]`."""
    pick = errors.argmin(dim=0)
    rows = torch.arange(pick.numel(), device=pick.device)
    q = torch.stack([c.q.view(torch.uint8) for c in candidates])[pick, rows].view(torch.float8_e4m3fn)
    scale = torch.stack([c.scale for c in candidates])[pick, rows]
    return FloatQuantizedTensor(q, scale, None, candidates[0].scheme)


def input_scale(abs_max: Tensor | float, dtype: torch.dtype) -> Tensor:
    """Static per-tensor activation scale `[1]` (float32 values of `dtype`) from the observed max|x|."""
    return _scale_of(torch.as_tensor(abs_max, dtype=torch.float32).reshape(1), dtype)
