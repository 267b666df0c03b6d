"""Several devices for one job: the calibration samples split across them (data parallel).

Per decoder layer, with `devices[0]` the primary (the model's device, which writes the checkpoint):

    replicate the layer on every device → each device captures its shard's Linear-group inputs and sums
    S_d = Σ xᵀx (one long-lived thread per device, `DeviceThreads`) → every group is merged once, on the
    device that solves it, all merges queued before any solve: H = 2/n · Σ_d S_d → the groups are spread
    over the devices by cost (out·in² + in³) and solved there concurrently; the costliest group, when it
    dominates (down_proj), is factored on one device and its sweep split by output rows over all of them →
    QuantizedTensors gathered on the primary → the primary's state (dequantized weights, AWQ-folded norms)
    copied to every replica → each device forwards its shard through its quantized replica.

AWQ merges the same per-device statistics (Σ xᵀx and Σ|x| of every group), then runs its scale searches
(one per mapping) and its clip searches (one per Linear) spread over the devices; the scales are folded in
mapping order on the primary. Measured on 2×H200 (benchmarks/gpu.md, runs 8–11): GPTQ 1.29×, AWQ 1.43× on an 8B shape.

Numerics against one device: partial sums are always unscaled ("half-operands" accumulation, which is what
one CUDA device runs for bf16/fp16 activations), so the only difference is the order of the float32
additions of the Hessian; a GPTQ solve given the same Hessian gives the same integers on any device of one
kind (tests: tests/workers/test_data_parallel.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from workers.awq_mappings import AwqMapping
from workers.errors import InvalidSpecError
from workers.loading import LayerCall, resolve_device
from workers.model_graph import Group, LayerPlan
from workers.pipeline import (
    Activations,
    AwqStatistics,
    GroupOutcome,
    LayerQuantizer,
    PipelineOptions,
    _deployed,
    _linear,
    capture_inputs,
    output_error,
)
from workers.progress import Progress, ProgressCallback
from workers.quant.gptq import GPTQResult, HessianAccumulator, PreparedHessian, gptq_solve, prepare_hessian
from workers.quant.grid import QuantizedTensor

T = TypeVar("T")


def resolve_devices(spec_device: str, count: int) -> list[torch.device]:
    """The job's devices: `count` consecutive CUDA GPUs from `spec_device` ("auto"/"cuda" = cuda:0)."""
    if count < 1:
        raise InvalidSpecError(f"devices={count}: a job needs at least one device")
    if count == 1:
        return [resolve_device(spec_device)]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    first = torch.device("cuda" if spec_device == "auto" else spec_device)
    if first.type != "cuda":
        raise InvalidSpecError(f"devices={count} needs CUDA GPUs, but device is {spec_device!r}; set device to "
                               "'auto' or 'cuda', or devices to 1")
    start = first.index or 0
    if start + count > visible:
        raise InvalidSpecError(
            f"devices={count} from {first} needs GPUs {start}..{start + count - 1}, but this worker has {visible} "
            f"visible CUDA GPU(s); set devices to at most {max(visible - start, 1)} or run on a worker with more GPUs"
        )
    return [torch.device("cuda", start + i) for i in range(count)]


def shard_bounds(num_samples: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [a, b) sample ranges, one per device, sizes differing by at most one (larger first)."""
    if parts < 1:
        raise ValueError("data-parallel calibration needs at least one device")
    if parts > num_samples:
        raise InvalidSpecError(f"{parts} devices but only {num_samples} calibration samples: every device needs "
                               f"a sample; use at most {num_samples} devices or more calibration samples")
    size, extra = divmod(num_samples, parts)
    starts = [i * size + min(i, extra) for i in range(parts + 1)]
    return list(zip(starts[:-1], starts[1:], strict=True))


class DeviceThreads:
    """One long-lived worker thread per device for a whole job; `run(work)` calls `work(i)` on device i's thread.

    Each thread keeps its device current and grad mode off; `work` runs in a copy of the caller's context
    variables (e.g. the pipeline's `report_precision`). CUDA kernels release the GIL, so the devices work at
    once. The threads live as long as the job: a thread's first CUDA calls set up its own cuBLAS/cuSOLVER
    state, and a fresh thread pool per call ran the calibration forward at 0.63-0.70 of the speed of these
    threads on 2×H200 (benchmarks/gpu_concurrency.py). With one device, `work(0)` runs on the caller's thread.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.devices = list(devices)
        many = len(self.devices) > 1
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"qf-device-{i}") for i in range(len(self.devices))] if many else []

    def _call(self, i: int, work: Callable[[int], T]) -> T:
        device = self.devices[i]
        with torch.no_grad(), torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return work(i)

    def run(self, work: Callable[[int], T]) -> list[T]:
        """[work(0), work(1), …] in device order; waits for every device, then re-raises the first error."""
        if not self._pools:
            return [self._call(0, work)]
        futures = [pool.submit(contextvars.copy_context().run, self._call, i, work) for i, pool in enumerate(self._pools)]
        wait(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True)
        self._pools = []

    def __enter__(self) -> DeviceThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _on_each(devices: Sequence[torch.device], work: Callable[[int], T]) -> list[T]:
    """`work(i)` for every device index on threads of its own (see DeviceThreads), started for this call."""
    with DeviceThreads(devices) as threads:
        return threads.run(work)


class ShardedActivations:
    """The calibration hidden states `[samples, seq, hidden]` split by samples, one `Activations` per device,
    with every decoder layer's arguments on every device (`positions`: those of the layer set by `at_layer`)."""

    def __init__(self, hidden: Tensor, calls: Sequence[LayerCall], devices: Sequence[torch.device], options: PipelineOptions):
        self.devices = list(devices)
        self.bounds = shard_bounds(hidden.shape[0], len(self.devices))
        self.seq_len = hidden.shape[1]
        # clone: a view would keep the whole tensor alive on the primary
        self.shards = [Activations(hidden[a:b].clone(), d, options) for (a, b), d in zip(self.bounds, self.devices, strict=True)]
        self.calls = [[call.to(d) for call in calls] for d in self.devices]
        self.positions = [per_device[0] for per_device in self.calls]
        self.threads = DeviceThreads(self.devices)  # every multi-device step of the job runs on these

    def close(self) -> None:
        self.threads.close()

    def at_layer(self, index: int) -> None:
        """Run the next steps with decoder layer `index`'s arguments."""
        self.positions = [per_device[index] for per_device in self.calls]

    def plan(self, quantizer: LayerQuantizer, layer: nn.Module) -> LayerPlan:
        """The layer's plan, found on the primary's shard (see `LayerQuantizer.plan`)."""
        return quantizer.plan(layer, self.shards[0], self.positions[0])

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1][1] * self.seq_len

    def forward(self, replicas: Sequence[nn.Module], *, update: bool) -> None:
        """Each device runs its shard through its replica (see `Activations.forward`)."""
        self.threads.run(lambda i: self.shards[i].forward(replicas[i], self.positions[i], update=update))

    def gather(self, device: torch.device) -> Tensor:
        return torch.cat([shard.hidden.to(device) for shard in self.shards])


def replicate(layer: nn.Module, devices: Sequence[torch.device]) -> list[nn.Module]:
    """[layer, a copy of it on each of devices[1:]]: tensors copied straight to the device, configs shared."""
    replicas = [layer]
    for device in devices[1:]:
        memo: dict[int, Any] = {id(m.config): m.config for m in layer.modules() if hasattr(m, "config")}
        for p in layer.parameters():
            memo[id(p)] = nn.Parameter(p.detach().to(device, copy=True), requires_grad=False)
        for b in layer.buffers():
            memo[id(b)] = b.to(device, copy=True)
        replicas.append(copy.deepcopy(layer, memo))
    return replicas


def sync_replicas(replicas: Sequence[nn.Module]) -> None:
    """Copy the primary's whole state (dequantized weights, AWQ-folded norms) into every other replica."""
    state = replicas[0].state_dict()
    for replica in replicas[1:]:
        replica.load_state_dict(state)


def partial_hessians(
    replicas: Sequence[nn.Module], acts: ShardedActivations, plan: LayerPlan
) -> list[dict[Group, HessianAccumulator]]:
    """Per device, the unscaled Σ xᵀx of its shard for every Linear group (one capture forward each)."""

    def accumulate(i: int) -> dict[Group, HessianAccumulator]:
        accs = {
            group: HessianAccumulator(_linear(replicas[i], group[0]).in_features, acts.devices[i], precision="half-operands")
            for group in plan.groups
        }
        capture_inputs(replicas[i], acts.shards[i], acts.positions[i], plan, lambda group, x: accs[group].add(x))
        return accs

    return acts.threads.run(accumulate)


def sum_in_order(parts: Sequence[Tensor], device: torch.device) -> Tensor:
    """Σ_d parts[d], added in device order on `device` (a new tensor)."""
    total = parts[0].to(device, copy=True)
    for part in parts[1:]:
        total.add_(part.to(device))
    return total


def merge_sums(sums: Sequence[Tensor], num_samples: int, device: torch.device) -> Tensor:
    """H = 2/n · Σ_d S_d: the unscaled partial sums added in device order on `device`, scaled once."""
    return sum_in_order(sums, device).mul_(2.0 / max(num_samples, 1))  # the scaling of HessianAccumulator.hessian


def merge_hessians(parts: Sequence[HessianAccumulator], device: torch.device) -> Tensor:
    """The Hessian of all shards from per-device accumulators in "half-operands" (unscaled) mode."""
    return merge_sums([acc.unscaled_sum() for acc in parts], sum(acc.num_samples for acc in parts), device)


def group_costs(layer: nn.Module, plan: LayerPlan) -> list[int]:
    """Solve cost of each Linear group ≈ out·in² (the sweeps) + in³ (the one shared inverse)."""
    costs = []
    for group in plan.groups:
        n = _linear(layer, group[0]).in_features
        costs.append(sum(_linear(layer, name).out_features for name in group) * n * n + n**3)
    return costs


def assign_groups(costs: Sequence[int], num_devices: int) -> list[int]:
    """Device index of each group: largest first onto the least-loaded device, ties to the lower index."""
    loads, owner = [0] * num_devices, [0] * len(costs)
    for g in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        owner[g] = min(range(num_devices), key=lambda d: (loads[d], d))
        loads[owner[g]] += costs[g]
    return owner


def split_group(costs: Sequence[int], num_devices: int) -> int | None:
    """The group whose GPTQ sweep is split by output rows over all devices: the costliest one, when it alone
    is more than an even share of the layer (Llama-3-8B: down_proj, 82% of the solve cost); else None."""
    if num_devices < 2 or not costs:
        return None
    costliest = max(range(len(costs)), key=lambda g: (costs[g], -g))
    return costliest if costs[costliest] * num_devices > sum(costs) else None


def _to(qt: QuantizedTensor, device: torch.device) -> QuantizedTensor:
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


def solve_layer(
    quantizer: LayerQuantizer, index: int, replicas: Sequence[nn.Module], acts: ShardedActivations,
    on_progress: ProgressCallback,
) -> dict[str, QuantizedTensor]:
    """`LayerQuantizer.solve` over sharded calibration; the results and module errors live on the primary.

    GPTQ in two rounds: (1) each device solves the groups it was given, except that the costliest group
    (`split_group`) only has its inverse Hessian factored, on its device; (2) every device sweeps its share
    of that group's output rows against the same factor. Rows are independent in GPTQ (a row's codes depend
    only on that row and H⁻¹), so the split changes no integer (tests/workers/test_data_parallel.py)."""
    spec, model, devices = quantizer.spec, quantizer.model, acts.devices
    plan = acts.plan(quantizer, replicas[0])
    if spec.method.smooths:
        return solve_awq(quantizer, index, replicas, acts, plan, on_progress)
    groups = plan.groups
    partials = partial_hessians(replicas, acts, plan)
    costs = group_costs(replicas[0], plan)
    split = split_group(costs, len(devices)) if spec.method.sweeps else None
    if split is not None and min(_linear(replicas[0], n).out_features for n in groups[split]) < len(devices):
        split = None  # fewer rows than devices (tiny models)
    if split is not None:  # round 1 only factors its Hessian: n³ of its out·n² + n³
        n = _linear(replicas[0], groups[split][0]).in_features
        costs[split] = n**3
    owner = assign_groups(costs, len(devices))
    # Every cross-device copy is queued before any solve: a copy waits for the work already queued on its
    # source device, so a merge inside the solve threads would wait for another device's solve.
    hessians = [merge_hessians([part[g] for part in partials], devices[d]) for g, d in zip(groups, owner, strict=True)]
    for g, (group, d) in enumerate(zip(groups, owner, strict=True)):
        where = f"inverse on {devices[d]}, rows over {len(devices)} devices" if g == split else f"on {devices[d]}"
        on_progress(Progress("quantize", index, model.num_layers, ", ".join(group), where))

    prepared: list[PreparedHessian] = []

    def round_one(d: int) -> dict[int, list[GroupOutcome]]:
        solved = {}
        for g, group in enumerate(groups):
            if owner[g] != d:
                continue
            if g == split:
                prepared.append(prepare_hessian(hessians[g], dampening=spec.dampening, act_order=spec.act_order))
                continue
            solved[g] = [
                (name, _to(qt, devices[0]), mse, rel, fallback, note)
                for name, qt, mse, rel, fallback, note in quantizer.solve_group(replicas[d], group, hessians[g])
            ]
        return solved

    by_group = {g: out for per_device in acts.threads.run(round_one) for g, out in per_device.items()}
    if split is not None:
        by_group[split] = _split_sweep(quantizer, replicas, acts.threads, groups[split], prepared[0], hessians[split])
    result: dict[str, QuantizedTensor] = {}
    for g in range(len(groups)):  # recorded in the one-device order
        for name, qt, mse, rel, fallback, note in by_group[g]:
            quantizer._record(index, name, mse, rel, fallback, note)
            result[name] = qt
    return result


def _split_sweep(
    quantizer: LayerQuantizer, replicas: Sequence[nn.Module], threads: DeviceThreads, group: Group,
    prepared: PreparedHessian, hessian: Tensor,
) -> list[GroupOutcome]:
    """Round two: each device sweeps its contiguous share of every module's output rows; errors on the primary."""
    spec, options, dtype, devices = quantizer.spec, quantizer.options, quantizer.model.model_dtype, threads.devices
    copies = [_prepared_on(prepared, d) for d in devices]  # queued here, after round one's factoring

    def sweep(d: int) -> list[GPTQResult]:
        results = []
        for name in group:
            weight = _linear(replicas[d], name).weight
            a, b = shard_bounds(weight.shape[0], len(devices))[d]
            results.append(gptq_solve(weight[a:b], copies[d], spec.scheme, block_size=options.gptq_block_size,
                                      scale_dtype=dtype, observer=spec.observer))
        return results

    per_device = threads.run(sweep)
    second_moment = hessian.to(devices[0]) / 2
    outcomes: list[GroupOutcome] = []
    for i, name in enumerate(group):
        parts = [results[i] for results in per_device]
        qt = _cat_rows([_to(r.quantized, devices[0]) for r in parts])
        weight = _linear(replicas[0], name).weight
        mse, rel = output_error(weight, _deployed(qt, quantizer.model, weight.device), second_moment)
        outcomes.append((name, qt, mse, rel, parts[0].fell_back_to_rtn, parts[0].note))
    return outcomes


def solve_awq(
    quantizer: LayerQuantizer, index: int, replicas: Sequence[nn.Module], acts: ShardedActivations, plan: LayerPlan,
    on_progress: ProgressCallback,
) -> dict[str, QuantizedTensor]:
    """AWQ with its searches spread over the devices; the same choices as `LayerQuantizer.solve_awq_statistics`.

    Round one runs every mapping's scale search at once, each on the weights as they were before any
    folding. That is what the one-device order gives too, as long as no mapping reads a Linear or an input
    that an earlier mapping folds into (checked; otherwise the searches run in order on the primary).
    The scales are then folded in the mapping order on the primary, and round two runs every Linear's clip
    search and RTN, each on one device."""
    model, devices, layer = quantizer.model, acts.devices, replicas[0]
    stats = merged_statistics(replicas, acts, plan)
    mappings = quantizer.awq_mappings(layer, plan)
    row_scale: dict[str, Tensor] = {}
    if _searches_independent(mappings, plan):
        costs = [sum(_linear(layer, n).weight.numel() for n in m.linears) for m in mappings]
        owner = assign_groups(costs, len(devices))
        for m, d in zip(mappings, owner, strict=True):
            on_progress(Progress("quantize", index, model.num_layers, m.prev, f"awq scale search on {devices[d]}"))

        def search(d: int) -> list[Tensor]:
            found = []
            for m, o in zip(mappings, owner, strict=True):
                if o == d:
                    group = stats[plan.group_of(m.linears[0])]
                    local = AwqStatistics(group.second_moment.to(devices[d]), group.mean_abs.to(devices[d]))
                    found.append(quantizer.awq_scales(replicas[d], m, local).to(devices[0]))
            return found

        found = acts.threads.run(search)
        scales = [found[d].pop(0) for d in owner]  # back in mapping order
    else:
        scales = []
    for i, m in enumerate(mappings):
        group = stats[plan.group_of(m.linears[0])]
        quantizer.fold_awq_scales(layer, m, scales[i] if scales else quantizer.awq_scales(layer, m, group), group, row_scale)

    if quantizer.spec.method.sweeps:  # GPTQ on the scaled weights, with the scaled inputs' Hessians, on the primary
        return quantizer.solve_groups_after_smoothing(index, layer, stats, plan, on_progress)
    names = list(plan.linears)
    owner = assign_groups([_linear(layer, n).weight.numel() for n in names], len(devices))
    for name, d in zip(names, owner, strict=True):
        on_progress(Progress("quantize", index, model.num_layers, name, f"awq clip search on {devices[d]}"))

    def clip(d: int) -> dict[str, tuple[QuantizedTensor, float, float]]:
        device, mine, moments = devices[d], {}, {}
        for name, o in zip(names, owner, strict=True):
            if o != d:
                continue
            group = plan.group_of(name)
            if group not in moments:
                moments[group] = stats[group].second_moment.to(device)
            weight = _linear(layer, name).weight.to(device)
            qt, mse, rel = quantizer.awq_clip_quantize(name, weight, moments[group], row_scale.get(name))
            mine[name] = (_to(qt, devices[0]), mse, rel)
        return mine

    clipped = {name: out for per_device in acts.threads.run(clip) for name, out in per_device.items()}
    result: dict[str, QuantizedTensor] = {}
    for name in names:  # recorded in the one-device order
        qt, mse, rel = clipped[name]
        quantizer._record(index, name, mse, rel)
        result[name] = qt
    return result


def _searches_independent(mappings: Sequence[AwqMapping], plan: LayerPlan) -> bool:
    """No mapping reads a Linear, or a group input, that an earlier mapping's folding changes."""
    changed: set[str] = set()
    for m in mappings:
        if changed & {*m.linears, "input:" + ",".join(plan.group_of(m.linears[0]))}:
            return False
        changed |= {m.prev, *m.linears, "input:" + ",".join(plan.group_of(m.linears[0]))}
    return True


def merged_statistics(
    replicas: Sequence[nn.Module], acts: ShardedActivations, plan: LayerPlan
) -> dict[Group, AwqStatistics]:
    """Σ = E[x xᵀ] and E|x| of every group's input over the whole calibration set, on the primary: the
    per-device partial sums added in device order."""
    partials = partial_hessians(replicas, acts, plan)
    primary = acts.devices[0]
    merged = {}
    for group in plan.groups:
        parts = [part[group] for part in partials]
        n = sum(acc.num_samples for acc in parts)
        abs_sum = sum_in_order([acc.abs_sum() for acc in parts], primary)
        merged[group] = AwqStatistics(merge_hessians(parts, primary) / 2, abs_sum / max(n, 1))
    return merged
