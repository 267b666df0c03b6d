"""awq-gptq: AWQ's scales searched and folded first (workers/methods/awq.py, no clip search), then GPTQ of
every group on the scaled weights with the Hessians of the scaled inputs, H = 2Σ' (workers/methods/gptq.py)."""

from __future__ import annotations

from workers.devices import sync_replicas
from workers.methods.awq import smooth
from workers.methods.base import LayerWork, QuantMethod, register
from workers.methods.gptq import GptqGroups
from workers.methods.groups import solve_groups
from workers.quant.grid import QuantizedTensor


@register
class AwqGptq(QuantMethod):
    name = "awq-gptq"
    statistics = frozenset({"second_moment", "mean_abs"})

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        stats, _ = smooth(work)
        sync_replicas(work.replicas)  # the folded scales, on every device that solves a group
        solver = GptqGroups(work)
        return solve_groups(work, solver, lambda group, device: (2 * stats[group].second_moment).to(device), rows=solver)
