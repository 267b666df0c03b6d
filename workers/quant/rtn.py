"""Round-to-nearest: each weight to the nearest level of its group's grid, no error feedback; the baseline to
beat. The grid is min-max (`observer="minmax"`) or the range search of `range_search.py` (`"mse"`), weighted
by the input's E[x²] when calibration statistics are given."""

from __future__ import annotations

import torch
from torch import Tensor

from workers.errors import InvalidSpecError
from workers.quant.fp8 import fp8_quantize
from workers.quant.grid import QuantizedTensor, check_group_size, compute_qparams, quantize_values
from workers.quant.range_search import search_qparams
from workers.spec import Observer, QuantScheme


def check_weight(weight: Tensor, scheme: QuantScheme) -> None:
    """Shared input checks of the quantizers: a 2-D float weight whose rows split into whole groups."""
    scheme.validate()
    if weight.ndim != 2 or not weight.is_floating_point():
        raise InvalidSpecError(
            f"expected a 2-D floating-point weight [out, in], got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    check_group_size(f"a weight of shape {tuple(weight.shape)}", weight.shape[1], scheme)


def group_qparams(
    w: Tensor, scheme: QuantScheme, observer: Observer, importance: Tensor | None, scale_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor | None]:
    """Each group's scale and zero point, by the job's observer (min-max or the weighted range search)."""
    if observer == "mse":
        return search_qparams(w, scheme, importance, scale_dtype=scale_dtype)
    return compute_qparams(w, scheme, scale_dtype=scale_dtype)


def rtn_quantize(
    weight: Tensor,
    scheme: QuantScheme,
    *,
    scale_dtype: torch.dtype | None = None,
    observer: Observer = "minmax",
    importance: Tensor | None = None,
) -> QuantizedTensor:
    """Quantize `weight` `[out, in]` (any float dtype) with per-group parameters from `observer`, in float32.

    Scales are rounded to `scale_dtype` (default: the weight's own dtype, which is what the checkpoint
    stores), so the written checkpoint dequantizes to exactly `result.dequantize()`. `importance` `[in]`
    weights the "mse" observer's error per input column (E[x²]; None: uniform). FP8 schemes (type "float")
    return a `workers.quant.fp8.FloatQuantizedTensor` (min-max scales; "mse": per-channel scales chosen per row).
    """
    if scheme.is_float:  # FP8: max|w|/448 per channel, tensor or block (workers/quant/fp8.py)
        return fp8_quantize(weight, scheme, scale_dtype=scale_dtype, observer=observer, importance=importance)
    check_weight(weight, scheme)
    w = weight.detach().to(torch.float32)
    scale, zero_point = group_qparams(w, scheme, observer, importance, scale_dtype or weight.dtype)
    return QuantizedTensor(quantize_values(w, scale, zero_point, scheme), scale, zero_point, scheme)
