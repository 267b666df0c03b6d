"""Mixed precision (workers/mixed_precision.py): GPTQ or RTN of every Linear group on its own integer grid,
from the measured allocation (`spec.mixed_precision.allocation`) or the rule (edge layers, name patterns)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from workers.methods.base import LayerWork, QuantMethod, register
from workers.methods.groups import Solved, solve_groups
from workers.mixed_precision import group_scheme
from workers.model_graph import linear_names
from workers.quant.gptq import gptq_quantize_shared
from workers.quant.grid import QuantizedTensor
from workers.quant.rtn import rtn_quantize
from workers.spec import Method, QuantScheme


class MixedGroups:
    """One group's Linears on the grid allocated to them (found by the identity of the weights handed in)."""

    def __init__(self, work: LayerWork, grids: dict[int, QuantScheme]) -> None:
        self.work, self.grids = work, grids

    def quantize(self, weights: Sequence[Tensor], hessian: Tensor) -> list[Solved]:
        spec, scheme = self.work.spec, self.grids[id(weights[0])]
        if spec.method is Method.GPTQ:
            results = gptq_quantize_shared(
                weights, hessian, scheme, dampening=spec.dampening, block_size=self.work.options.gptq_block_size,
                act_order=spec.act_order, scale_dtype=self.work.dtype, observer=spec.observer,
            )
            return [(r.quantized, r.fell_back_to_rtn, r.note) for r in results]
        importance = hessian.diagonal()
        return [(rtn_quantize(w, scheme, scale_dtype=self.work.dtype, observer=spec.observer, importance=importance), False, None)
                for w in weights]


@register
class MixedPrecision(QuantMethod):
    name = "mixed-precision"
    statistics = frozenset({"second_moment"})

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        spec, prefix = work.spec, work.model.graph.layer_prefix(work.index)
        num_layers = work.model.num_layers
        if work.acts is None:  # RTN without calibration (rule only): one Linear a group
            solved = {}
            for name in linear_names(work.layer):
                weight = work.linear(name).weight
                scheme = group_scheme(spec, work.index, num_layers, [prefix + name], weight.shape[1])
                solved[name] = rtn_quantize(weight, scheme, scale_dtype=work.dtype, observer=spec.observer)
            return solved
        grids: dict[int, QuantScheme] = {}
        for group in work.plan.groups:
            in_features = work.linear(group[0]).in_features
            scheme = group_scheme(spec, work.index, num_layers, [prefix + name for name in group], in_features)
            for device in range(len(work.devices)):
                grids.update({id(work.linear(name, device).weight): scheme for name in group})
        statistics = work.statistics
        return solve_groups(work, MixedGroups(work, grids), lambda group, device: statistics[group].hessian(device))
