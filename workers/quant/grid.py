"""The integer weight grid every method and format shares.

A weight matrix `[out, in]` is cut into groups of `group_size` consecutive input columns (group_size -1:
one group spanning the whole row, i.e. one scale per output channel). Each (row, group) gets a float scale
and, for asymmetric grids, an integer zero point. Integers live in the *signed* domain
`[-2^(b-1), 2^(b-1) - 1]`, exactly like compressed-tensors, and

    value = (q - zero_point) * scale            (zero_point = 0 when symmetric)

Grid convention (the scale choice is ours; the dequantization rule above is the format's):

* symmetric:  scale = 2·max|w| / (2^b - 1), q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1): all 2^b
  levels are used, as in GPTQ's reference code and compressed-tensors' `calculate_qparams`. -max|w| lands
  on -(2^b - 1)/2 and rounds to -2^(b-1); +max|w| clips by half a step to 2^(b-1) - 1. (A grid of
  max|w| / (2^(b-1) - 1) never uses -2^(b-1): 15 levels instead of 16 at 4 bits, 7 instead of 8 at 3.)
* asymmetric: the range is widened to include 0 (so 0 is exactly representable, as compressed-tensors and
  GPTQ require), scale = (max - min) / (2^b - 1), zero_point = clamp(round(-2^(b-1) - min / scale)),
  q = clamp(round(w / scale + zero_point)). This is `calculate_qparams` of compressed-tensors 0.20.

Scales are rounded to `scale_dtype` (the dtype the checkpoint stores them in, usually the model dtype)
*before* the integers are computed, so a written checkpoint dequantizes to exactly
`QuantizedTensor.dequantize()`. They are rounded toward zero, never up: a scale rounded up would put
-max|w| just inside -(2^b - 1)/2 steps, so the group's largest negative weight would round to -2^(b-1) + 1
instead of -2^(b-1), losing half a step on the weight that matters most (SmolLM2 w4 g64 RTN: +44.3% vs
+40.1% Δppl for compressed-tensors' rounding, which computes the codes from the unrounded scale). A scale is never 0: an all-zero group gets the smallest normal number of
that dtype, which still maps every weight of the group to q = 0 (or to the zero point).
Rounding is round-half-to-even (`torch.round`), as in compressed-tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.errors import InputError, InvalidSpecError
from workers.spec import QuantScheme


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a `bits`-bit grid, e.g. (-8, 7) for 4 bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def num_groups(in_features: int, scheme: QuantScheme) -> int:
    return 1 if scheme.group_size == -1 else in_features // scheme.group_size


def check_group_size(module: str, in_features: int, scheme: QuantScheme) -> None:
    """Groups must tile the input dimension exactly; formats and kernels have no partial groups."""
    if scheme.group_size != -1 and in_features % scheme.group_size != 0:
        raise InvalidSpecError(
            f"group_size {scheme.group_size} does not divide in_features {in_features} of {module}; "
            "choose a group size that divides every quantized layer's input size (or -1 for per-channel)"
        )


def _expand_groups(params: Tensor, in_features: int) -> Tensor:
    """[out, n_groups] → [out, in]: each group's parameter repeated over its columns."""
    return params.repeat_interleave(in_features // params.shape[1], dim=1)


@dataclass
class QuantizedTensor:
    """A quantized `[out, in]` weight: signed integers plus per-(row, group) scale and zero point."""

    q: Tensor  # int8 [out, in], signed domain
    scale: Tensor  # float32 [out, n_groups]
    zero_point: Tensor | None  # int8 [out, n_groups], signed domain; None when symmetric
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense weight `[out, in]`: (q - zero_point) * scale[:, j // group], computed in float32."""
        in_features = self.q.shape[1]
        values = self.q.to(torch.float32)
        if self.zero_point is not None:
            values = values - _expand_groups(self.zero_point.to(torch.float32), in_features)
        return (values * _expand_groups(self.scale.to(torch.float32), in_features)).to(dtype)


class ScaleCheck:
    """The checks of `_round_scale`, recorded on the device and raised once by `raise_first()`.

    A search loop quantizes hundreds of candidates; checking each one eagerly costs a device→host sync per
    call. This keeps a 0-dim code on the scales' device instead (0: fine, 1: non-finite, 2: too large), of
    the first call that failed, so the error raised later is the one the eager check would have raised.
    """

    def __init__(self) -> None:
        self._first: Tensor | None = None
        self._dtype = torch.float32

    def record(self, scale: Tensor, dtype: torch.dtype) -> None:
        if self._first is not None and dtype != self._dtype:
            raise ValueError(f"one ScaleCheck covers one scale dtype, got {dtype} after {self._dtype}")
        self._dtype = dtype
        too_large = (scale > torch.finfo(dtype).max).any().to(torch.int8) * 2
        code = torch.where(torch.isfinite(scale).all(), too_large, 1)
        self._first = code if self._first is None else torch.where(self._first != 0, self._first, code)

    def raise_first(self) -> None:
        """Raise the error of the first failed call, if any; one host sync."""
        code = 0 if self._first is None else int(self._first)
        if code == 1:
            raise InputError("the weight has non-finite values (inf or NaN); quantization needs finite weights")
        if code == 2:
            raise InputError(
                f"a quantization scale exceeds the largest {self._dtype} value {torch.finfo(self._dtype).max:g}; "
                "the weight is too large"
            )


def _round_scale(scale: Tensor, scale_dtype: torch.dtype | None, check: ScaleCheck | None = None) -> Tensor:
    """Round scales to the storage dtype and keep them strictly positive (see module docstring).

    Invalid scales raise InputError here, or, with `check` given, are recorded there without a host sync.
    """
    dtype = scale_dtype if scale_dtype is not None and scale_dtype.is_floating_point else torch.float32
    info = torch.finfo(dtype)
    if check is None:
        eager = ScaleCheck()
        eager.record(scale, dtype)
        eager.raise_first()
    else:
        check.record(scale, dtype)
    stored = scale.to(dtype)
    rounded = stored.to(torch.float32)
    if dtype in (torch.float16, torch.bfloat16):  # round toward zero: the next lower value where nearest went up
        lower = (stored.view(torch.int16) - 1).view(dtype).to(torch.float32)
        rounded = torch.where(rounded > scale, lower, rounded)
    return torch.where(rounded == 0, torch.full_like(rounded, info.smallest_normal), rounded)


def compute_qparams(
    w: Tensor,
    scheme: QuantScheme,
    *,
    max_val: Tensor | None = None,
    min_val: Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    check: ScaleCheck | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scale (float32 `[out, n_groups]`) and zero point (int8 or None) for the groups of `w` `[out, k]`.

    `w` may be a whole weight (k = in_features, n_groups = k / group_size, or 1 for group_size -1) or a
    single group (k = group_size → n_groups 1). `max_val` / `min_val` `[out, n_groups]` replace the observed
    per-group extremes; AWQ's clip search uses them to quantize with a shrunk range. `check`: see
    `_round_scale`.
    """
    w = w.to(torch.float32)
    out, k = w.shape
    if scheme.group_size != -1 and (k % scheme.group_size != 0 or k == 0):
        raise InvalidSpecError(f"group_size {scheme.group_size} does not divide the {k} columns given")
    groups = num_groups(k, scheme)
    grouped = w.reshape(out, groups, k // groups)
    hi = grouped.amax(dim=2) if max_val is None else max_val.to(torch.float32).reshape(out, groups)
    lo = grouped.amin(dim=2) if min_val is None else min_val.to(torch.float32).reshape(out, groups)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    qmin, qmax = qrange(scheme.bits)
    if scheme.symmetric:
        scale = _round_scale(torch.maximum(-lo, hi) / ((qmax - qmin) / 2), scale_dtype, check)
        return scale, None
    scale = _round_scale((hi - lo) / (qmax - qmin), scale_dtype, check)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int8)
    return scale, zero_point


def quantize_values(w: Tensor, scale: Tensor, zero_point: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Signed int8 codes of `w` `[out, k]` on the grid given by per-group `scale` / `zero_point`."""
    k = w.shape[1]
    scaled = w.to(torch.float32) / _expand_groups(scale.to(torch.float32), k)
    if zero_point is not None:
        scaled = scaled + _expand_groups(zero_point.to(torch.float32), k)
    qmin, qmax = qrange(scheme.bits)
    return torch.clamp(torch.round(scaled), qmin, qmax).to(torch.int8)


def fake_quantize(
    w: Tensor,
    scheme: QuantScheme,
    *,
    max_val: Tensor | None = None,
    min_val: Tensor | None = None,
    check: ScaleCheck | None = None,
    scale_dtype: torch.dtype | None = None,
) -> Tensor:
    """Quantize then dequantize `w` with min-max groups (float32); the search loops of AWQ use this.

    With `check`, invalid scales are recorded there instead of raising (no host sync; see `ScaleCheck`).
    `scale_dtype`: round the scales as the checkpoint stores them (default float32).
    """
    scale, zero_point = compute_qparams(w, scheme, max_val=max_val, min_val=min_val, check=check, scale_dtype=scale_dtype)
    return QuantizedTensor(
        quantize_values(w, scale, zero_point, scheme), scale, zero_point, scheme
    ).dequantize()
