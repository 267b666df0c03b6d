"""W4A16 mixed precision: an integer grid per group of Linears that share an input (q/k/v, o, gate/up, down),
so a runtime's fused projections get one grid (see MixedPrecisionSpec in workers/spec.py).

By rule, the group takes `high` (default 8 bits at the job's group size) in the first/last `edge_layers`
decoder layers or when any of its Linears' full names matches a pattern, and the job's scheme elsewhere.

By sensitivity (`target_bits_per_weight`, or `target_kl`: `allocate_to_kl`): one pass through the original model (`measure`) gives each group's
input Hessian H = 2 E[x xᵀ] and, from it, the group's error at every candidate grid without another forward,

    error(group, grid) = Σ_rows F_r (ΔW H ΔWᵀ)_rr   (ΔW = solved(W, grid) − W, the group's Linears stacked by rows)

where F_r is the Fisher information of output channel r (workers/fisher.py: the error's second-order cost in
KL(original ‖ quantized), so errors of every layer and kind of Linear count in one unit), and ΔW from the job's
own solver (GPTQ with its dampening, act-order and observer, or RTN), the Hessian factored once for all
candidates and at most `MEASURED_ROWS` rows solved per grid (rows are independent in both solvers, so the sum
over rows is estimated from evenly spaced ones). Every group starts at its cheapest grid;
then, while the budget target · (number of weights) allows, the upgrade with the largest error reduction per
extra bit, over all groups and costlier grids, is bought (along each group's convex hull of (cost, error); the
budget left at the end buys the best upgrades that still fit). The result is never worse by this criterion than
the best uniform grid within the budget (`best_uniform`, a floor: the greedy's last steps are not optimal).
Cost in bits per weight counts the stored scales (16 bits per group of weights) and zero points: w4 g32 is 4.5,
w4 g128 4.125, w8 g32 8.5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workers.activations import ShardedActivations
from workers.errors import InvalidSpecError
from workers.fisher import output_fisher
from workers.loading import LayerwiseModel, WeightSource
from workers.memory import release_host_memory
from workers.methods.base import LayerWork
from workers.options import PipelineOptions
from workers.output_error import deployed, row_errors
from workers.progress import Progress, ProgressCallback, no_progress
from workers.quant.gptq import gptq_solve
from workers.quant.inverse_hessian import prepare_hessian
from workers.quant.rtn import rtn_quantize
from workers.spec import JobSpec, Method, QuantScheme

SCALE_BITS = 16  # scales are stored in the model dtype (fp16 / bf16)
MEASURED_ROWS = 512  # at most this many rows of a group are solved per candidate grid to estimate its error


def bits_per_weight(scheme: QuantScheme, in_features: int) -> float:
    """Stored bits per weight of a Linear with `in_features` inputs on `scheme`: codes, scales, zero points."""
    group = in_features if scheme.group_size == -1 else scheme.group_size
    zero = 0 if scheme.symmetric else scheme.bits
    return scheme.bits + (SCALE_BITS + zero) / group


def high_scheme(spec: JobSpec) -> QuantScheme:
    mixed = spec.mixed_precision
    assert mixed is not None
    return mixed.high or dataclasses.replace(spec.scheme, bits=8)


def candidates(spec: JobSpec) -> tuple[QuantScheme, ...]:
    mixed = spec.mixed_precision
    assert mixed is not None
    if mixed.candidates:
        return mixed.candidates
    sym = spec.scheme.symmetric
    return (*(QuantScheme(4, group, sym) for group in (-1, 128, 64, 32)), QuantScheme(8, -1, sym), QuantScheme(8, 128, sym))


def fits(scheme: QuantScheme, in_features: int) -> bool:
    return scheme.group_size == -1 or in_features % scheme.group_size == 0


@dataclass
class GroupChoice:
    """One group of Linears (full names), its weight count, and its measured error per candidate grid."""

    layer: int
    modules: tuple[str, ...]
    in_features: int
    weights: int
    errors: dict[QuantScheme, float] = field(default_factory=dict)
    chosen: QuantScheme | None = None

    def cost(self, scheme: QuantScheme) -> float:
        return self.weights * bits_per_weight(scheme, self.in_features)


def hull(group: GroupChoice) -> list[QuantScheme]:
    """The group's grids on the lower convex hull of (cost, error), cheapest first: the only ones worth buying
    in order, each step buying less error per bit than the one before."""
    points = sorted(group.errors, key=lambda s: (group.cost(s), group.errors[s]))
    chain: list[QuantScheme] = []
    for scheme in points:
        if chain and group.errors[scheme] >= group.errors[chain[-1]]:
            continue  # costs more, no better
        while len(chain) >= 2:
            a, b = chain[-2], chain[-1]
            slope_ab = (group.errors[a] - group.errors[b]) / (group.cost(b) - group.cost(a))
            slope_bc = (group.errors[b] - group.errors[scheme]) / (group.cost(scheme) - group.cost(b))
            if slope_bc < slope_ab:
                break
            chain.pop()  # b lies above the segment a → scheme
        chain.append(scheme)
    return chain


def _start_cheapest(groups: Sequence[GroupChoice]) -> list[tuple[float, int, QuantScheme, QuantScheme]]:
    """Set every group at the cheapest grid of its hull; return every hull step (error removed per extra bit,
    group index, from, to), the most error per bit first."""
    steps = []
    for i, g in enumerate(groups):
        if not g.errors:
            raise InvalidSpecError(f"no mixed-precision candidate grid fits {g.modules[0]} ({g.in_features} inputs)")
        chain = hull(g)
        g.chosen = chain[0]
        steps += [((g.errors[a] - g.errors[b]) / (g.cost(b) - g.cost(a)), i, a, b) for a, b in itertools.pairwise(chain)]
    return sorted(steps, key=lambda step: -step[0])


def allocate(groups: Sequence[GroupChoice], target_bits_per_weight: float) -> float:
    """Greedy allocation (module docstring), on each group's convex hull: every group starts at its cheapest
    grid; the step (over all groups) that removes the most error per extra bit is bought while it fits, so
    the bits go where they cut the error most (a costly 8-bit step for a sensitive group is taken before
    cheap small steps elsewhere when it is worth more per bit); then any budget left buys the best upgrades
    that still fit. Sets each group's `chosen`; returns the bits per weight reached."""
    total_weights = sum(g.weights for g in groups)
    budget = target_bits_per_weight * total_weights * (1 + 1e-9)
    steps = _start_cheapest(groups)
    spent = sum(g.cost(g.chosen) for g in groups if g.chosen is not None)
    if spent > budget:
        raise InvalidSpecError(
            f"target_bits_per_weight={target_bits_per_weight} is below the cheapest candidates' "
            f"{spent / total_weights:.3f} bits per weight; raise it or add cheaper candidates"
        )
    blocked: set[int] = set()  # a group whose next hull step did not fit takes no later step of its hull
    for _, i, a, b in steps:
        g = groups[i]
        if i in blocked or g.chosen != a:
            continue
        extra = g.cost(b) - g.cost(a)
        if spent + extra > budget:
            blocked.add(i)
            continue
        spent += extra
        g.chosen = b
    while True:  # budget left over: the best upgrade anywhere that still fits
        best: tuple[float, GroupChoice, QuantScheme] | None = None
        for g in groups:
            assert g.chosen is not None
            now_cost, now_error = g.cost(g.chosen), g.errors[g.chosen]
            for scheme, error in g.errors.items():
                extra = g.cost(scheme) - now_cost
                if extra <= 0 or error >= now_error or spent + extra > budget:
                    continue
                if best is None or (now_error - error) / extra > best[0]:
                    best = ((now_error - error) / extra, g, scheme)
        if best is None:
            break
        _, g, scheme = best
        assert g.chosen is not None
        spent += g.cost(scheme) - g.cost(g.chosen)
        g.chosen = scheme
    uniform = best_uniform(groups, budget)
    if uniform is not None and total_error(groups, [uniform] * len(groups)) < total_error(groups):
        for g in groups:
            g.chosen = uniform
        spent = sum(g.cost(uniform) for g in groups)
    return spent / total_weights


def allocate_to_kl(groups: Sequence[GroupChoice], target_kl: float) -> float:
    """The fewest bits whose estimated KL per token (`estimated_kl`) is at most `target_kl`: every group starts at
    its cheapest grid and the hull steps are bought in order of error removed per extra bit (module docstring)
    until the estimate meets the target; if even every group's least-error grid misses it, those are kept (eval.json's
    `target_kl_met` is then false). Sets each group's `chosen`; returns the bits per weight."""
    steps = _start_cheapest(groups)
    error = total_error(groups)
    for _, i, a, b in steps:  # along a hull the ratios fall: each group's steps in its order
        if error / 4 <= target_kl:  # estimated_kl, kept up to date step by step
            break
        error += groups[i].errors[b] - groups[i].errors[a]
        groups[i].chosen = b
    return sum(g.cost(g.chosen) for g in groups if g.chosen is not None) / sum(g.weights for g in groups)


def estimated_kl(groups: Sequence[GroupChoice]) -> float:
    """KL(original ‖ quantized) per token of the chosen grids, to second order and summed over groups: a quarter
    of the Fisher-weighted errors (workers/fisher.py: KL ≈ ½ Σ F E[Δy²], E[Δy²] = ½ (ΔW H ΔWᵀ))."""
    return total_error(groups) / 4


def total_error(groups: Sequence[GroupChoice], schemes: Sequence[QuantScheme | None] | None = None) -> float:
    """The criterion: the summed measured error of `schemes` (default: each group's chosen grid)."""
    chosen = schemes if schemes is not None else [g.chosen for g in groups]
    return sum(g.errors[s] for g, s in zip(groups, chosen, strict=True) if s is not None)


def best_uniform(groups: Sequence[GroupChoice], budget_bits: float) -> QuantScheme | None:
    """The candidate grid that, given to every group, has the least total error within `budget_bits`; None if no
    grid fits every group within it. The greedy result is never kept when worse than this floor."""
    shared = set.intersection(*(set(g.errors) for g in groups)) if groups else set()
    feasible = [s for s in sorted(shared, key=describe) if sum(g.cost(s) for g in groups) <= budget_bits]
    return min(feasible, key=lambda s: total_error(groups, [s] * len(groups)), default=None)


def measure(
    model: LayerwiseModel,
    weights: WeightSource,
    spec: JobSpec,
    calibration: Tensor,
    *,
    options: PipelineOptions | None = None,
    on_progress: ProgressCallback = no_progress,
) -> list[GroupChoice]:
    """Each group's error at each candidate grid, on the original model's inputs (one pass over the layers),
    weighted by its output channels' Fisher (workers/fisher.py)."""
    options = options or PipelineOptions()
    fisher = output_fisher(model, weights, calibration, seed=spec.calibration.seed, on_progress=on_progress)
    groups: list[GroupChoice] = []
    with torch.no_grad(), contextlib.ExitStack() as cleanup:
        calls = model.layer_calls(calibration.shape[1], weights)
        acts = ShardedActivations(model.embed(calibration, weights, batch_tokens=options.batch_tokens), calls,
                                  [model.device], options)
        cleanup.callback(acts.close)
        for index in range(model.num_layers):
            on_progress(Progress("calibrate", index, model.num_layers, message="mixed precision: measuring sensitivity"))
            layer = model.decoder_layer(index, weights)
            acts.at_layer(index)
            work = LayerWork(index, [layer], acts, model, spec, options)
            prefix = model.graph.layer_prefix(index)
            for group, statistics in work.statistics.items():
                names, linears = tuple(prefix + n for n in group), [work.linear(n) for n in group]
                rows = torch.cat([fisher.get(name, torch.zeros(m.out_features))  # never ran on the Fisher's tokens
                                  for name, m in zip(names, linears, strict=True)]).to(model.device)
                groups.append(measure_group(work, names, linears, statistics.hessian(model.device), rows))
            acts.forward([layer], update=True)
            del layer, work
            release_host_memory()
    return groups


def measure_group(
    work: LayerWork, names: tuple[str, ...], linears: Sequence[nn.Linear], hessian: Tensor, row_weights: Tensor
) -> GroupChoice:
    """One group's error Σ_rows F_r (ΔW H ΔWᵀ)_rr at every candidate grid that fits (F: `row_weights`, the rows'
    Fisher), each ΔW from the job's own solver (GPTQ with its dampening, act-order and observer, or RTN), the
    Hessian factored once for all candidates. Both solvers treat rows independently, so the error is a sum over
    rows: it is estimated from at most `MEASURED_ROWS` evenly spaced rows of the group's Linears stacked, scaled
    by rows / measured (exact when the group has no more rows)."""
    spec, model = work.spec, work.model
    full = torch.cat([m.weight for m in linears])
    stride = -(-full.shape[0] // MEASURED_ROWS)  # at most MEASURED_ROWS rows
    weight, scale = full[::stride], full.shape[0] / full[::stride].shape[0]
    row_weights = row_weights[::stride].to(weight.device, torch.float32)
    choice = GroupChoice(work.index, names, full.shape[1], int(full.numel()))
    prepared = prepare_hessian(hessian, dampening=spec.dampening, act_order=spec.act_order, device=weight.device)
    for grid in (g for g in candidates(spec) if fits(g, choice.in_features)):
        if spec.method is Method.GPTQ:
            qt = gptq_solve(weight, prepared, grid, block_size=work.options.gptq_block_size, scale_dtype=work.dtype,
                            observer=spec.observer).quantized
        else:
            qt = rtn_quantize(weight, grid, scale_dtype=work.dtype, observer=spec.observer, importance=prepared.importance)
        rows = row_errors(weight, deployed(qt, model, weight.device), hessian)
        choice.errors[grid] = scale * float((row_weights * rows).sum())
    return choice


def with_allocation(spec: JobSpec, measured: Sequence[GroupChoice]) -> tuple[JobSpec, float]:
    """`spec` with the greedy allocation of `measured` recorded in it, and the bits per weight it reaches."""
    mixed = spec.mixed_precision
    assert mixed is not None and mixed.by_sensitivity
    if mixed.target_kl is not None:
        reached = allocate_to_kl(measured, mixed.target_kl)
    else:
        assert mixed.target_bits_per_weight is not None
        reached = allocate(measured, mixed.target_bits_per_weight)
    allocation = tuple((name, g.chosen) for g in measured for name in g.modules if g.chosen is not None)
    return dataclasses.replace(spec, mixed_precision=dataclasses.replace(mixed, allocation=allocation)), reached


def group_scheme(spec: JobSpec, layer: int, num_layers: int, modules: Sequence[str], in_features: int) -> QuantScheme:
    """The grid of one group of Linears (full names, `in_features` inputs) of decoder layer `layer`: the measured
    allocation's, or by rule (`high` where its group size divides the inputs, else the job's scheme)."""
    mixed = spec.mixed_precision
    assert mixed is not None
    if mixed.allocation:
        schemes = {mixed.scheme_of(m) for m in modules}
        if len(schemes) != 1 or None in schemes:
            raise ValueError(f"the allocation gives {modules} no single grid: {schemes}")
        scheme = schemes.pop()
        assert scheme is not None
        return scheme
    edge = layer < mixed.edge_layers or layer >= num_layers - mixed.edge_layers
    matched = any(re.search(p, m) for p in mixed.patterns for m in modules)
    high = high_scheme(spec)
    return high if (edge or matched) and fits(high, in_features) else spec.scheme


def describe(scheme: QuantScheme) -> str:
    return f"w{scheme.bits} g{scheme.group_size} {'sym' if scheme.symmetric else 'asym'}"


def report(
    spec: JobSpec, written: dict[str, QuantScheme], in_features: dict[str, int], weights: dict[str, int],
    measured: Sequence[GroupChoice] = (),
) -> dict[str, Any]:
    """eval.json's `mixed_precision`: mode, target and reached bits per weight, the Linears per grid, and (by
    sensitivity) each group's grid and measured errors. `written`: full Linear name → grid, as in config.json."""
    mixed = spec.mixed_precision
    assert mixed is not None
    total = sum(weights[m] for m in written)
    reached = sum(weights[m] * bits_per_weight(s, in_features[m]) for m, s in written.items()) / max(total, 1)
    per_grid: dict[str, list[str]] = {}
    for name, scheme in written.items():
        per_grid.setdefault(describe(scheme), []).append(name)
    return {
        "mode": "sensitivity" if mixed.by_sensitivity else "rule",
        "target_bits_per_weight": mixed.target_bits_per_weight,
        "target_kl": mixed.target_kl,
        "estimated_kl": estimated_kl(measured) if measured else None,
        "target_kl_met": estimated_kl(measured) <= mixed.target_kl if measured and mixed.target_kl else None,
        "bits_per_weight": round(reached, 4),
        "linears_per_grid": {grid: len(names) for grid, names in per_grid.items()},
        "grids": {grid: sorted(names) for grid, names in per_grid.items()},
        "measured": [
            {"layer": g.layer, "modules": list(g.modules), "chosen": describe(g.chosen) if g.chosen else None,
             "errors": {describe(s): e for s, e in g.errors.items()}}
            for g in measured
        ],
    }
