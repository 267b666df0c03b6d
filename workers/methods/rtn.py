"""RTN: each weight to the nearest level of its group's grid (workers/quant/rtn.py), no error feedback.

Without calibration the stored weights are quantized as they are, with no forward pass and no error report.
With calibration the range search (observer "mse") weighs each input column by E[x²] (diag H / 2), and every
module's output error is recorded; the groups are spread over the devices like GPTQ's (workers/methods/groups.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from workers.methods.base import LayerWork, QuantMethod, register
from workers.methods.groups import Solved, solve_groups
from workers.model_graph import linear_names
from workers.quant.grid import QuantizedTensor
from workers.quant.rtn import rtn_quantize


class RtnGroups:
    """The Linears of one group to the nearest grid level, ranges weighted by the input's E[x²]."""

    def __init__(self, work: LayerWork) -> None:
        self.work = work

    def quantize(self, weights: Sequence[Tensor], hessian: Tensor) -> list[Solved]:
        spec, importance = self.work.spec, hessian.diagonal()
        return [
            (rtn_quantize(w, spec.scheme, scale_dtype=self.work.dtype, observer=spec.observer, importance=importance), False, None)
            for w in weights
        ]


@register
class Rtn(QuantMethod):
    name = "rtn"
    statistics = frozenset({"second_moment"})

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        if work.acts is None:
            spec = work.spec
            return {
                name: rtn_quantize(work.linear(name).weight, spec.scheme, scale_dtype=work.dtype, observer=spec.observer)
                for name in linear_names(work.layer)
            }
        statistics = work.statistics
        return solve_groups(work, RtnGroups(work), lambda group, device: statistics[group].hessian(device))
