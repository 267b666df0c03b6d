"""Solve a layer's Linear groups (the Linears that share one input) spread over the job's devices.

Groups go to devices by cost (out·in² + in³, largest first onto the least loaded); every group's Hessian is
merged on its device before any solve starts (a copy queued behind another device's solve would wait for
it). With a row-splitting solver (GPTQ) the costliest group, when it is more than an even share of the layer
(Llama-3-8B: down_proj, 82%), is factored and swept by all devices (workers/quant/split_inverse.py):

    round one    its owner computes the one Cholesky factor of its (reversed, damped) Hessian first, n³/3,
                 while the other devices solve the other groups (spread by cost, the Cholesky counted as n³/4
                 of the in³ that stands for a whole factorisation); then every device, as soon as its own
                 groups are done, solves chunks of columns of the triangular inverse L⁻¹ until none is left
                 (`SharedInverse`: the idle device takes the next chunk, so no device waits for another);
    round two    every device assembles U = P·L⁻¹·P and sweeps its contiguous share of the output rows.

Rows are independent in GPTQ (a row's codes depend only on that row and H⁻¹), so the row split changes no
integer; the factor is built from the same column chunks one device solves (workers/quant/inverse_hessian.py),
so U has the one-device bits whichever device solves which chunk. Codes differ from one device's only where the
Hessians do: merged partial sums add in another order, so a code on a rounding boundary may flip.
Results and module errors are gathered on the primary, recorded in group order. One device is the same code
with every group on device 0, inline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor, nn

from workers.devices import assign_groups, shard_bounds, split_group
from workers.methods.base import LayerWork
from workers.model_graph import Group, LayerPlan
from workers.output_error import output_error
from workers.quant.gptq import GPTQResult
from workers.quant.grid import QuantizedTensor
from workers.quant.inverse_hessian import FlippedCholesky, PreparedHessian
from workers.quant.split_inverse import SharedInverse

Solved = tuple[QuantizedTensor, bool, str | None]  # result, fell back to RTN, note
GroupOutcome = tuple[str, QuantizedTensor, float, float, bool, str | None]  # name, result, mse, relative, fallback, note


class GroupSolver(Protocol):
    def quantize(self, weights: Sequence[Tensor], hessian: Tensor) -> list[Solved]:
        """The Linears of one group given the Hessian of their shared input, on the weights' device."""


class RowSplitSolver(GroupSolver, Protocol):
    def prepare(self, hessian: Tensor) -> PreparedHessian: ...
    def factor(self, hessian: Tensor) -> FlippedCholesky: ...
    def sweep(self, rows: Tensor, prepared: PreparedHessian) -> GPTQResult: ...


def group_costs(layer: nn.Module, plan: LayerPlan) -> list[int]:
    """Solve cost of each Linear group ≈ out·in² (the sweeps) + in³ (the one shared inverse)."""
    costs = []
    for group in plan.groups:
        n = _linear(layer, group[0]).in_features
        costs.append(sum(_linear(layer, name).out_features for name in group) * n * n + n**3)
    return costs


def solve_group(work: LayerWork, solver: GroupSolver, device: int, group: Group, hessian: Tensor) -> list[GroupOutcome]:
    """One group on device `device`'s replica, with each module's output error."""
    weights = [work.linear(name, device).weight for name in group]
    second_moment = hessian / 2  # E[x xᵀ] of the group's input, shared by its modules
    outcomes: list[GroupOutcome] = []
    for name, weight, (qt, fallback, note) in zip(group, weights, solver.quantize(weights, hessian), strict=True):
        mse, rel = output_error(weight, work.deployed(qt, weight.device), second_moment)
        outcomes.append((name, qt, mse, rel, fallback, note))
    return outcomes


def solve_groups(
    work: LayerWork, solver: GroupSolver, hessian_of: Callable[[Group, torch.device], Tensor],
    rows: RowSplitSolver | None = None,
) -> dict[str, QuantizedTensor]:
    """Every group of `work.plan` by `solver`, given `hessian_of(group, device)`; `rows`: may split a group's rows."""
    groups, devices, layer = work.plan.groups, work.devices, work.layer
    costs = group_costs(layer, work.plan)
    split = split_group(costs, len(devices)) if rows is not None else None
    if split is not None and min(_linear(layer, n).out_features for n in groups[split]) < len(devices):
        split = None  # fewer rows than devices (tiny models)
    if split is not None:  # round 1 only computes its Cholesky factor: n³/3 of the 4/3·n³ that n³ stands for
        costs[split] = _linear(layer, groups[split][0]).in_features ** 3 // 4
    owner = assign_groups(costs, len(devices))
    hessians = [hessian_of(g, devices[d]) for g, d in zip(groups, owner, strict=True)]
    for g, (group, d) in enumerate(zip(groups, owner, strict=True)):
        note = f"Cholesky on {devices[d]}, inverse and rows over {len(devices)} devices" if g == split else work.where(d)
        work.progress(", ".join(group), note)

    inverse = SharedInverse()

    def round_one(d: int) -> dict[int, list[GroupOutcome]]:
        if split is not None and rows is not None and owner[split] == d:
            factor = None
            try:  # first, so that the other devices can join the inverse as soon as they are free
                factor = rows.factor(hessians[split])
            finally:
                inverse.publish(factor)
        solved = {}
        for g, group in enumerate(groups):
            if owner[g] != d or g == split:
                continue
            solved[g] = [
                (name, to_device(qt, devices[0]), mse, rel, fallback, note)
                for name, qt, mse, rel, fallback, note in solve_group(work, solver, d, group, hessians[g])
            ]
        if split is not None:
            inverse.work(devices[d])
        return solved

    by_group = {g: out for per_device in work.threads.run(round_one) for g, out in per_device.items()}
    if split is not None and rows is not None:
        prepared = _prepared_everywhere(work, rows, inverse, hessians[split])
        by_group[split] = _split_sweep(work, rows, groups[split], prepared, hessians[split])
    result: dict[str, QuantizedTensor] = {}
    for g in range(len(groups)):  # recorded in group order, whatever device solved them
        for name, qt, mse, rel, fallback, note in by_group[g]:
            work.record(name, mse, rel, fallback, note)
            result[name] = qt
    return result


def _prepared_everywhere(
    work: LayerWork, rows: RowSplitSolver, inverse: SharedInverse, hessian: Tensor
) -> list[PreparedHessian]:
    """Round two's start: U assembled on every device from the chunks of L⁻¹. A U that is not finite is redone
    by the one-device factorisation; a factor that failed at every dampening gives RTN on every device."""
    devices, factor = work.devices, inverse.factor
    assert factor is not None, "the factoring device published its factor (or raised)"
    if factor.lower is None:
        return [_prepared_on(factor.prepared(None), d) for d in devices]
    prepared = work.threads.run(lambda d: factor.prepared(inverse.upper(devices[d])))
    if prepared[0].hinv is None or not bool(torch.isfinite(prepared[0].hinv).all()):  # the same U everywhere
        one = rows.prepare(hessian.to(devices[0]))  # the serial factorisation, as one device does it
        prepared = [_prepared_on(one, d) for d in devices]
    return prepared


def _split_sweep(
    work: LayerWork, rows: RowSplitSolver, group: Group, prepared: Sequence[PreparedHessian], hessian: Tensor
) -> list[GroupOutcome]:
    """Round two: each device sweeps its contiguous share of every module's output rows; errors on the primary."""
    devices = work.devices

    def sweep(d: int) -> list[GPTQResult]:
        results = []
        for name in group:
            weight = work.linear(name, d).weight
            a, b = shard_bounds(weight.shape[0], len(devices))[d]
            results.append(rows.sweep(weight[a:b], prepared[d]))
        return results

    per_device = work.threads.run(sweep)
    second_moment = hessian.to(devices[0]) / 2
    outcomes: list[GroupOutcome] = []
    for i, name in enumerate(group):
        parts = [results[i] for results in per_device]
        qt = _cat_rows([to_device(r.quantized, devices[0]) for r in parts])
        weight = work.linear(name).weight
        mse, rel = output_error(weight, work.deployed(qt, weight.device), second_moment)
        outcomes.append((name, qt, mse, rel, parts[0].fell_back_to_rtn, parts[0].note))
    return outcomes


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    module = layer.get_submodule(name)
    assert isinstance(module, nn.Linear), f"{name} is not a Linear"
    return module


def to_device(qt: QuantizedTensor, device: torch.device) -> QuantizedTensor:
    zero = qt.zero_point.to(device) if qt.zero_point is not None else None
    return replace(qt, q=qt.q.to(device), scale=qt.scale.to(device), zero_point=zero)


def _cat_rows(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    zeros = [p.zero_point for p in parts]
    zero = torch.cat([z for z in zeros if z is not None]) if zeros[0] is not None else None
    return replace(parts[0], q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]), zero_point=zero)


def _prepared_on(prepared: PreparedHessian, device: torch.device) -> PreparedHessian:
    hinv = prepared.hinv.to(device) if prepared.hinv is not None else None
    perm = prepared.perm.to(device) if prepared.perm is not None else None
    return replace(prepared, hinv=hinv, perm=perm, dead=prepared.dead.to(device), importance=prepared.importance.to(device))
