"""AWQ (workers/quant/awq.py): per mapping a scale search, folded into the previous op; then per Linear a clip
search and RTN. Both are scored on the input statistics of all calibration tokens (E[xxᵀ], E|x|), which are
divided by the scales as they are folded.

Several devices: the statistics are merged on the primary; every mapping's scale search runs at once, spread
over the devices, each on the weights as they were before any folding, which is what the one-device order
gives too as long as no mapping reads a Linear or an input that an earlier mapping folds into (checked;
otherwise the searches run in order on the primary). The scales are folded in mapping order on the primary,
then every Linear's clip search and RTN run spread over the devices. One device: the same, inline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers.awq_mappings import AwqMapping
from workers.devices import assign_groups
from workers.methods import awq_moe
from workers.methods.base import LayerWork, QuantMethod, register
from workers.methods.groups import to_device
from workers.model_graph import Group, LayerPlan
from workers.moe import expert_blocks
from workers.output_error import output_error
from workers.quant.awq import apply_clip, search_clip, search_scales
from workers.quant.grid import QuantizedTensor
from workers.quant.rtn import rtn_quantize


@dataclass
class AwqStatistics:
    """What AWQ needs of one group's input: Σ = E[x xᵀ] and E|x|, divided by the scales as they are folded."""

    second_moment: Tensor
    mean_abs: Tensor

    def divide(self, scales: Tensor) -> None:
        """The statistics of x / s."""
        s = scales.to(self.second_moment.device, torch.float32)
        self.second_moment.div_(s.unsqueeze(1)).div_(s.unsqueeze(0))
        self.mean_abs.div_(s)


def merged_statistics(work: LayerWork) -> dict[Group, AwqStatistics]:
    """Σ and E|x| of every group's input over the whole calibration set, on the primary."""
    primary = work.devices[0]
    return {g: AwqStatistics(s.second_moment(primary), s.mean_abs(primary)) for g, s in work.statistics.items()}


def usable_mappings(work: LayerWork) -> list[AwqMapping]:
    """The layer's AWQ mappings whose shapes line up (v_proj → o_proj does not under grouped-query attention,
    nor a fused qkv_proj → o_proj unless q, k and v have one size)."""
    usable = []
    for mapping in work.plan.awq_mappings:
        prev = work.layer.get_submodule(mapping.prev)
        if isinstance(prev, nn.Linear) and prev.out_features != mapping.parts * work.linear(mapping.linears[0]).in_features:
            continue
        usable.append(mapping)
    return usable


def search(work: LayerWork, mapping: AwqMapping, stats: AwqStatistics, device: int = 0,
           moe: awq_moe.MoeCapture | None = None) -> Tensor:
    """The scale search of one mapping on device `device`'s copy of its Linears and the statistics given; the
    mappings of MoE layers are scored on the layer's routed output (workers/methods/awq_moe.py)."""
    if moe is not None and (scales := awq_moe.search(work, mapping, stats.mean_abs, moe, device)) is not None:
        return scales
    weights = [work.linear(name, device).weight for name in mapping.linears]
    return search_scales(stats.second_moment, stats.mean_abs, weights, work.spec.scheme, grid=work.options.awq_grid,
                         scale_dtype=work.dtype)[0]


def groups_of(plan: LayerPlan, mapping: AwqMapping) -> list[Group]:
    """The groups a mapping scales: one, or several reading one norm's output (an MoE block's reshaped view)."""
    return list(dict.fromkeys(plan.group_of(name) for name in mapping.linears))


def _searches_independent(mappings: Sequence[AwqMapping], plan: LayerPlan) -> bool:
    """No mapping reads a Linear, or a group input, that an earlier mapping's folding changes."""
    changed: set[str] = set()
    for m in mappings:
        inputs = {"input:" + ",".join(group) for group in groups_of(plan, m)}
        if changed & {*m.linears, *inputs}:
            return False
        changed |= {m.prev, *m.linears, *inputs}
    return True


# (mapping, its input statistics on device d, d) → the mapping's scales, or None to leave it unscaled
ScaleSearch = Callable[[AwqMapping, AwqStatistics, int], "Tensor | None"]


def smooth(work: LayerWork, search_on: ScaleSearch | None = None) -> tuple[dict[Group, AwqStatistics], dict[str, Tensor]]:
    """Search and fold every mapping's scales into the primary layer. Returns the statistics of the scaled
    inputs and, per Linear whose output rows were divided by a mapping's scales (in this solve pass of the
    layer or an earlier one), that row scale. `search_on` replaces the search on the job's grid (`search`: the
    scheme's, MoE mappings on the block's routed output), e.g. by one on a GGUF grid. Once per layer (or MoE solve
    pass): a job of several grids smooths with the first grid's search and every grid rounds that smoothed layer."""
    if work.smoothed is not None:
        return work.smoothed
    devices, plan, stats = work.devices, work.plan, merged_statistics(work)
    mappings = usable_mappings(work)
    if search_on is None:
        moe = awq_moe.capture(work, mappings) if expert_blocks(work.layer) and mappings else None

        def search_on(m: AwqMapping, local: AwqStatistics, d: int) -> Tensor | None:
            return search(work, m, local, d, moe)

    found: list[Tensor | None] = []
    if _searches_independent(mappings, plan):
        owner = assign_groups([sum(work.linear(n).weight.numel() for n in m.linears) for m in mappings], len(devices))
        for m, d in zip(mappings, owner, strict=True):
            work.progress(m.prev, work.where(d, "awq scale search"))

        def scales_on(d: int) -> list[Tensor | None]:
            mine = []
            for m, o in zip(mappings, owner, strict=True):
                if o == d:
                    group = stats[plan.group_of(m.linears[0])]
                    local = AwqStatistics(group.second_moment.to(devices[d]), group.mean_abs.to(devices[d]))
                    scales = search_on(m, local, d)
                    mine.append(None if scales is None else scales.to(devices[0]))
            return mine

        per_device = work.threads.run(scales_on)
        found = [per_device[d].pop(0) for d in owner]  # back in mapping order
    row_scale = work.row_scale
    for i, m in enumerate(mappings):
        first, *others = groups_of(plan, m)
        if not found:
            work.progress(m.prev, "awq scale search")
        scales = found[i] if found else search_on(m, stats[first], 0)
        if scales is None:
            continue
        fold(work.layer, m, scales, stats[first], row_scale)
        for group in others:
            stats[group].divide(scales)
    work.smoothed = stats, row_scale
    return work.smoothed


def fold(layer: nn.Module, mapping: AwqMapping, scales: Tensor, stats: AwqStatistics, row_scale: dict[str, Tensor]) -> None:
    """Fold 1/s into the previous op, s into the mapping's Linears and the dense modules reading the same input
    (MoE routers: exact, never quantized), and 1/s into their input statistics."""
    prev = layer.get_submodule(mapping.prev)
    _fold_scales(prev, scales)
    for name in (*mapping.linears, *mapping.dense):
        weight = layer.get_submodule(name).weight
        assert isinstance(weight, Tensor)
        weight.mul_(scales.to(weight.device, weight.dtype))
    stats.divide(scales)
    if isinstance(prev, nn.Linear):  # only the last `scales.numel()` output rows were divided (fused: one slice)
        rows = row_scale.get(mapping.prev, torch.ones(prev.out_features, device=scales.device, dtype=scales.dtype))
        rows[prev.out_features - scales.numel() :] *= scales
        row_scale[mapping.prev] = rows


def clip_quantize(work: LayerWork, weight: Tensor, sigma: Tensor, rows: Tensor | None) -> tuple[QuantizedTensor, float, float]:
    """Clip search and RTN of one Linear, on `sigma`'s device (also for q/k, which llm-awq skips: clipping them
    measured better here, benchmarks/quality.md); its output error in the original output coordinates: `rows`
    undoes a division of its output rows by a later mapping's scales."""
    scheme = work.spec.scheme
    clip = search_clip(sigma, weight, scheme, grid=work.options.awq_grid, scale_dtype=work.dtype)
    qt = rtn_quantize(apply_clip(weight, clip), scheme, scale_dtype=work.dtype)
    row = (rows if rows is not None else torch.ones(weight.shape[0], device=sigma.device)).to(sigma.device).unsqueeze(1)
    reference = weight.to(sigma.device, torch.float32) * row
    quantized = work.deployed(qt, sigma.device).to(torch.float32) * row
    mse, rel = output_error(reference, quantized, sigma)
    return qt, mse, rel


@register
class Awq(QuantMethod):
    name = "awq"
    statistics = frozenset({"second_moment", "mean_abs"})

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        stats, row_scale = smooth(work)
        devices, plan, names = work.devices, work.plan, list(work.plan.linears)
        owner = assign_groups([work.linear(n).weight.numel() for n in names], len(devices))
        for name, d in zip(names, owner, strict=True):
            work.progress(name, work.where(d, "awq clip search") if len(devices) > 1 else None)

        def clip(d: int) -> dict[str, tuple[QuantizedTensor, float, float]]:
            device, mine, moments = devices[d], {}, {}
            for name, o in zip(names, owner, strict=True):
                if o == d:
                    group = plan.group_of(name)
                    if group not in moments:
                        moments[group] = stats[group].second_moment.to(device)
                    qt, mse, rel = clip_quantize(work, work.linear(name).weight.to(device), moments[group], row_scale.get(name))
                    mine[name] = (to_device(qt, devices[0]), mse, rel)
            return mine

        clipped = {name: out for per_device in work.threads.run(clip) for name, out in per_device.items()}
        solved: dict[str, QuantizedTensor] = {}
        for name in names:  # recorded in the layer's order
            qt, mse, rel = clipped[name]
            work.record(name, mse, rel)
            solved[name] = qt
        return solved


_WEIGHT_OFFSETS: dict[type, float] = {}


def _weight_offset(norm: nn.Module) -> float:
    """0 for norms computing x̂·w (+ b), 1 for those computing x̂·(1 + w) (Gemma): read off the module by
    running a copy with its weight and bias zeroed; once per class (one host sync)."""
    kind = type(norm)
    if kind not in _WEIGHT_OFFSETS:
        probe = copy.deepcopy(norm)
        weight = probe.weight
        assert isinstance(weight, Tensor)
        for tensor in (weight, getattr(probe, "bias", None)):
            if isinstance(tensor, Tensor):
                tensor.data.zero_()
        x = torch.linspace(-1.0, 2.0, weight.shape[-1], device=weight.device, dtype=weight.dtype).unsqueeze(0)
        _WEIGHT_OFFSETS[kind] = 0.0 if bool(probe(x).abs().max() == 0) else 1.0
    return _WEIGHT_OFFSETS[kind]


def _fold_scales(prev: nn.Module, scales: Tensor) -> None:
    """Divide the output of `prev` by `scales`: a norm's weight/bias, or a Linear's output rows (the last
    `scales.numel()` of them: the slice of a fused projection that feeds the scaled Linears)."""
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"cannot fold AWQ scales into {type(prev).__name__}: it has no weight")
    s = scales.to(weight.device, weight.dtype)
    bias = getattr(prev, "bias", None)
    if isinstance(prev, nn.Linear):
        tail = slice(weight.shape[0] - s.numel(), weight.shape[0])
        weight[tail].div_(s.unsqueeze(1))
        if isinstance(bias, Tensor):
            bias[tail].div_(s)
        return
    offset = _weight_offset(prev)
    weight.add_(offset).div_(s).sub_(offset)
    if isinstance(bias, Tensor):
        bias.div_(s)
