"""FP8 E4M3 weights (schemes fp8-dynamic / fp8-static / fp8-block): RTN onto the E4M3 grid (workers/quant/fp8.py),
or GPTQ on it (workers/quant/fp8_gptq.py: the min-max scales fixed, the sweep choosing each weight's E4M3 value).

Methods `rtn` and `gptq` with a float scheme. Static activations also get each Linear's `input_scale` = max|x| / 448
over the calibration tokens of its input (one range for a group's shared input); dynamic ones are the runtime's.
GPTQ spreads the groups over the job's devices but does not split a group's rows (per-tensor and block scales
span them).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from workers.methods.base import LayerWork, QuantMethod, register
from workers.methods.groups import Solved, solve_groups
from workers.methods.rtn import Rtn
from workers.quant.fp8 import FloatQuantizedTensor, input_scale
from workers.quant.fp8_gptq import fp8_gptq_solve
from workers.quant.grid import QuantizedTensor
from workers.quant.inverse_hessian import prepare_hessian


def with_input_scales(work: LayerWork, solved: dict[str, QuantizedTensor]) -> dict[str, QuantizedTensor]:
    """Static FP8 activations: each Linear's input scale from its group's observed max|x|."""
    if work.acts is None or work.spec.scheme.activations != "static":
        return solved
    primary = work.devices[0]
    for group, statistics in work.statistics.items():
        for name in group:  # a tensor each: the checkpoint stores no shared storage
            qt = solved[name]
            assert isinstance(qt, FloatQuantizedTensor)
            qt.input_scale = input_scale(statistics.abs_max(primary), work.dtype)
    return solved


@register
class Fp8Rtn(Rtn):
    name = "rtn:float"
    statistics = frozenset({"second_moment", "abs_max"})

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        return with_input_scales(work, super().solve(work))


class Fp8GptqGroups:
    """GPTQ of one group on the E4M3 grid, one factored Hessian for the group's Linears."""

    def __init__(self, work: LayerWork) -> None:
        self.work, self.spec = work, work.spec

    def quantize(self, weights: Sequence[Tensor], hessian: Tensor) -> list[Solved]:
        prepared = prepare_hessian(hessian, dampening=self.spec.dampening, act_order=self.spec.act_order,
                                   device=weights[0].device)
        solved: list[Solved] = []
        for weight in weights:
            qt, _ = fp8_gptq_solve(weight, prepared, self.spec.scheme, block_size=self.work.options.gptq_block_size,
                                   scale_dtype=self.work.dtype)
            solved.append((qt, prepared.hinv is None, prepared.note()))
        return solved


@register
class Fp8Gptq(QuantMethod):
    name = "gptq:float"
    statistics = frozenset({"second_moment", "abs_max"})

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        statistics = work.statistics
        solved = solve_groups(work, Fp8GptqGroups(work), lambda group, device: statistics[group].hessian(device))
        return with_input_scales(work, solved)
