"""SmoothQuant (workers/quant/smoothquant.py) then GPTQ or RTN of every group, for W8A8 int8 (scheme
w8a8-int8-smoothquant; `JobSpec.smoothquant` is the migration strength α, the job's method the solver).

One capture forward per device gives each Linear group's input statistics (Σ xᵀx, Σ|x|) and its per-channel
max|x|. For every smoothing pair of the family (the pairs AWQ uses, workers/awq_mappings.py: norm → q/k/v,
v → o, norm → gate/up, up → down; v → o skipped under grouped-query attention, as for AWQ) the scales
s_j = max|X_j|^α / max|W_·j|^(1−α) are folded in mapping order into the primary layer: 1/s into the previous
op, s into the group's weights, and 1/s into the group's statistics (Σ → Σ / s sᵀ, max|x| → max|x| / s), so
the solver then works on the smoothed weights with the Hessian of the smoothed inputs, H = 2Σ', with no
second forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from workers.activations import capture_inputs
from workers.devices import sync_replicas
from workers.methods.awq import AwqStatistics, fold, usable_mappings
from workers.methods.base import LayerWork, QuantMethod, register
from workers.methods.gptq import GptqGroups
from workers.methods.groups import solve_groups
from workers.methods.rtn import RtnGroups
from workers.model_graph import Group
from workers.quant.gptq import HessianAccumulator
from workers.quant.grid import QuantizedTensor
from workers.quant.smoothquant import ChannelAbsMax, smoothing_scales
from workers.spec import Method
from workers.statistics import InputStatistics, precision_for


def smoothing_statistics(work: LayerWork) -> tuple[dict[Group, AwqStatistics], dict[Group, Tensor]]:
    """Per group, on the primary: Σ = E[x xᵀ] and E|x| (AwqStatistics) and max|x| per channel `[in]`."""
    assert work.acts is not None, "SmoothQuant needs calibration inputs"
    acts, plan, precision = work.acts, work.plan, precision_for(len(work.devices))

    def accumulate(i: int) -> tuple[dict[Group, HessianAccumulator], dict[Group, ChannelAbsMax]]:
        device = acts.devices[i]
        widths = {g: work.linear(g[0], i).in_features for g in plan.groups}
        accs = {g: HessianAccumulator(widths[g], device, precision=precision) for g in plan.groups}
        maxima = {g: ChannelAbsMax(widths[g], device) for g in plan.groups}

        def collect(group: Group, x: Tensor) -> None:
            accs[group].add(x)
            maxima[group].add(x)

        capture_inputs(work.replicas[i], acts.shards[i], acts.positions[i], plan, collect)
        return accs, maxima

    parts = acts.threads.run(accumulate)
    primary = work.devices[0]
    stats, maxima = {}, {}
    for g in plan.groups:
        merged = InputStatistics([accs[g] for accs, _ in parts])
        stats[g] = AwqStatistics(merged.second_moment(primary), merged.mean_abs(primary))
        maxima[g] = torch.stack([m[g].value.to(primary) for _, m in parts]).amax(dim=0)
    return stats, maxima


def smooth(work: LayerWork, alpha: float) -> dict[Group, AwqStatistics]:
    """Fold every usable pair's SmoothQuant scales into the primary layer; the statistics of the smoothed inputs."""
    stats, maxima = smoothing_statistics(work)
    row_scale: dict[str, Tensor] = {}
    for mapping in usable_mappings(work):
        work.progress(mapping.prev, "smoothquant")
        group = work.plan.group_of(mapping.linears[0])
        weights = [work.linear(name).weight for name in mapping.linears]
        scales = smoothing_scales(maxima[group], weights, alpha, work.dtype)
        fold(work.layer, mapping, scales, stats[group], row_scale)
        maxima[group] = maxima[group] / scales.to(maxima[group].device)
    return stats


@register
class SmoothQuant(QuantMethod):
    name = "smoothquant"

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        alpha = work.spec.smoothquant
        assert alpha is not None, "method smoothquant needs JobSpec.smoothquant (the migration strength)"
        if work.acts is None:
            raise ValueError("SmoothQuant needs calibration tokens")
        stats = smooth(work, alpha)
        sync_replicas(work.replicas)  # the folded scales, on every device that solves a group

        def hessian(group: Group, device: torch.device) -> Tensor:
            return (2 * stats[group].second_moment).to(device)

        if work.spec.method is Method.GPTQ:
            solver = GptqGroups(work)
            return solve_groups(work, solver, hessian, rows=solver)
        return solve_groups(work, RtnGroups(work), hessian)
