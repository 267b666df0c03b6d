"""GPTQ (workers/quant/gptq.py): each Linear group solved with one factored inverse Hessian of its shared input.

Dampening, a blocked column sweep, act-order with static groups, and an RTN fallback for the module when
Cholesky fails (recorded, never a crash). Several devices: groups spread by cost, and the costliest group's
triangular inverse and rows split over all of them (workers/methods/groups.py); the factor has one device's bits
(the same column chunks, workers/quant/inverse_hessian.py), so the integers are one device's up to codes on a
rounding boundary of the merged Hessians' summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from workers.methods.base import LayerWork, QuantMethod, register
from workers.methods.groups import Solved, solve_groups
from workers.quant.gptq import GPTQResult, gptq_quantize_shared, gptq_solve
from workers.quant.grid import QuantizedTensor
from workers.quant.inverse_hessian import FlippedCholesky, PreparedHessian, flipped_cholesky, prepare_hessian


class GptqGroups:
    """GPTQ of one group (`quantize`), or of its Hessian and row blocks separately (`prepare`, `sweep`)."""

    def __init__(self, work: LayerWork) -> None:
        self.work, self.spec = work, work.spec

    def quantize(self, weights: Sequence[Tensor], hessian: Tensor) -> list[Solved]:
        results = gptq_quantize_shared(
            weights, hessian, self.spec.scheme, dampening=self.spec.dampening, block_size=self.work.options.gptq_block_size,
            act_order=self.spec.act_order, scale_dtype=self.work.dtype, observer=self.spec.observer,
        )
        return [(r.quantized, r.fell_back_to_rtn, r.note) for r in results]

    def prepare(self, hessian: Tensor) -> PreparedHessian:
        return prepare_hessian(hessian, dampening=self.spec.dampening, act_order=self.spec.act_order)

    def factor(self, hessian: Tensor) -> FlippedCholesky:
        return flipped_cholesky(hessian, dampening=self.spec.dampening, act_order=self.spec.act_order)

    def sweep(self, rows: Tensor, prepared: PreparedHessian) -> GPTQResult:
        return gptq_solve(rows, prepared, self.spec.scheme, block_size=self.work.options.gptq_block_size,
                          scale_dtype=self.work.dtype, observer=self.spec.observer)


@register
class Gptq(QuantMethod):
    name = "gptq"
    statistics = frozenset({"second_moment"})

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        statistics, solver = work.statistics, GptqGroups(work)
        return solve_groups(work, solver, lambda group, device: statistics[group].hessian(device), rows=solver)
