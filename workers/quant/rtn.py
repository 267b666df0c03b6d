"""Round-to-nearest: min-max groups, no calibration ("zero-shot" quantization) and the baseline to beat."""

from __future__ import annotations

import torch
from torch import Tensor

from workers.errors import InvalidSpecError
from workers.quant.grid import QuantizedTensor, check_group_size, compute_qparams, quantize_values
from workers.spec import QuantScheme


def check_weight(weight: Tensor, scheme: QuantScheme) -> None:
    """Shared input checks of the quantizers: a 2-D float weight whose rows split into whole groups."""
    scheme.validate()
    if weight.ndim != 2 or not weight.is_floating_point():
        raise InvalidSpecError(
            f"expected a 2-D floating-point weight [out, in], got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    check_group_size(f"a weight of shape {tuple(weight.shape)}", weight.shape[1], scheme)


def rtn_quantize(
    weight: Tensor, scheme: QuantScheme, *, scale_dtype: torch.dtype | None = None
) -> QuantizedTensor:
    """Quantize `weight` `[out, in]` (any float dtype) with per-group min-max parameters, in float32.

    Scales are rounded to `scale_dtype` (default: the weight's own dtype, which is what the checkpoint
    stores), so the written checkpoint dequantizes to exactly `result.dequantize()`.
    """
    check_weight(weight, scheme)
    w = weight.detach().to(torch.float32)
    scale, zero_point = compute_qparams(w, scheme, scale_dtype=scale_dtype or weight.dtype)
    return QuantizedTensor(quantize_values(w, scale, zero_point, scheme), scale, zero_point, scheme)
