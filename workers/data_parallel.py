"""Several devices for one job: the calibration samples split across them (data parallel).

Per decoder layer, with `devices[0]` the primary (the model's device, which writes the checkpoint):

    replicate the layer on every device → each device captures its shard's Linear-group inputs and sums
    S_d = Σ xᵀx (one thread per device) → each group is merged once, on the device that solves it:
    H = 2/n · Σ_d S_d → the groups are spread over the devices by cost (out·in² + in³) and solved there
    concurrently → QuantizedTensors gathered on the primary → the primary's state (dequantized weights,
    AWQ-folded norms) copied to every replica → each device forwards its shard through its quantized replica.

AWQ keeps, shard by shard, exactly the evenly spaced tokens of the whole calibration stream that the
one-device pipeline keeps, concatenates them on the primary and solves there.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from workers.architectures import ArchitectureInfo
from workers.errors import InvalidSpecError
from workers.loading import resolve_device
from workers.pipeline import (
    Activations,
    GroupOutcome,
    LayerQuantizer,
    PipelineOptions,
    _linear,
    awq_stride,
    capture_inputs,
    strided_tokens,
)
from workers.progress import Progress, ProgressCallback
from workers.quant.gptq import HessianAccumulator
from workers.quant.grid import QuantizedTensor
from workers.spec import Method

Group = tuple[str, ...]
Positions = tuple[Tensor, Tensor]
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


def _on_each(devices: Sequence[torch.device], work: Callable[[int], T]) -> list[T]:
    """`work(i)` for every device index, one thread per device (CUDA kernels release the GIL), in order.

    Grad mode and the current CUDA device are per thread, so each thread sets them; context variables
    (e.g. the pipeline's `report_precision`) are the caller's, one copy per thread."""
    contexts = [contextvars.copy_context() for _ in devices]

    def run(i: int) -> T:
        cuda = torch.cuda.device(devices[i]) if devices[i].type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), cuda:
            return work(i)

    if len(devices) == 1:
        return [run(0)]
    with ThreadPoolExecutor(len(devices), thread_name_prefix="data-parallel") as pool:
        return list(pool.map(lambda i: contexts[i].run(run, i), range(len(devices))))


class ShardedActivations:
    """The calibration hidden states `[samples, seq, hidden]` split by samples, one `Activations` per device."""

    def __init__(self, hidden: Tensor, pos: Positions, devices: Sequence[torch.device], options: PipelineOptions):
        self.devices = list(devices)
        self.bounds = shard_bounds(hidden.shape[0], len(self.devices))
        self.seq_len = hidden.shape[1]
        # clone: a view would keep the whole tensor alive on the primary
        self.shards = [Activations(hidden[a:b].clone(), d, options) for (a, b), d in zip(self.bounds, self.devices, strict=True)]
        self.positions = [(pos[0].to(d), pos[1].to(d)) for d in self.devices]

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1][1] * self.seq_len

    def forward(self, replicas: Sequence[nn.Module], *, update: bool) -> None:
        """Each device runs its shard through its replica (see `Activations.forward`)."""
        _on_each(self.devices, lambda i: self.shards[i].forward(replicas[i], self.positions[i], update=update))

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
    replicas: Sequence[nn.Module], acts: ShardedActivations, arch: ArchitectureInfo
) -> list[dict[Group, HessianAccumulator]]:
    """Per device, the unscaled Σ xᵀx of its shard for every Linear group (one capture forward each)."""

    def accumulate(i: int) -> dict[Group, HessianAccumulator]:
        accs = {
            group: HessianAccumulator(_linear(replicas[i], group[0]).in_features, acts.devices[i], precision="half-operands")
            for group in arch.linear_groups
        }
        capture_inputs(replicas[i], acts.shards[i], acts.positions[i], arch, lambda group, x: accs[group].add(x))
        return accs

    return _on_each(acts.devices, accumulate)


def merge_sums(sums: Sequence[Tensor], num_samples: int, device: torch.device) -> Tensor:
    """H = 2/n · Σ_d S_d: the unscaled partial sums added in device order on `device`, scaled once."""
    total = sums[0].to(device, copy=True)
    for part in sums[1:]:
        total.add_(part.to(device))
    return total.mul_(2.0 / max(num_samples, 1))  # the same scaling as HessianAccumulator.hessian


def merge_hessians(parts: Sequence[HessianAccumulator], device: torch.device) -> Tensor:
    """The Hessian of all shards from per-device accumulators in "half-operands" (unscaled) mode."""
    return merge_sums([acc.unscaled_sum() for acc in parts], sum(acc.num_samples for acc in parts), device)


def group_costs(layer: nn.Module, arch: ArchitectureInfo) -> list[int]:
    """Solve cost of each Linear group ≈ out·in² (the sweeps) + in³ (the one shared inverse)."""
    costs = []
    for group in arch.linear_groups:
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


def _to(qt: QuantizedTensor, device: torch.device) -> QuantizedTensor:
    zero = qt.zero_point.to(device) if qt.zero_point is not None else None
    return replace(qt, q=qt.q.to(device), scale=qt.scale.to(device), zero_point=zero)


def solve_layer(
    quantizer: LayerQuantizer, index: int, replicas: Sequence[nn.Module], acts: ShardedActivations,
    on_progress: ProgressCallback,
) -> dict[str, QuantizedTensor]:
    """`LayerQuantizer.solve` over sharded calibration; the results and module errors live on the primary."""
    arch, spec, model = quantizer.arch, quantizer.spec, quantizer.model
    if spec.method is Method.AWQ:
        inputs = awq_inputs(replicas, acts, arch, quantizer.options.awq_search_tokens)
        return quantizer.solve_awq_inputs(index, replicas[0], inputs, on_progress)
    partials = partial_hessians(replicas, acts, arch)
    owner = assign_groups(group_costs(replicas[0], arch), len(acts.devices))
    for group, d in zip(arch.linear_groups, owner, strict=True):
        on_progress(Progress("quantize", index, model.num_layers, ", ".join(group), f"on {acts.devices[d]}"))

    def solve_group(d: int, group: Group) -> list[GroupOutcome]:
        hessian = merge_hessians([partial[group] for partial in partials], acts.devices[d])
        return [
            (name, _to(qt, acts.devices[0]), mse, rel, fallback, note)
            for name, qt, mse, rel, fallback, note in quantizer.solve_group(replicas[d], group, hessian)
        ]

    def solve_on(d: int) -> dict[Group, list[GroupOutcome]]:
        return {group: solve_group(d, group) for group, o in zip(arch.linear_groups, owner, strict=True) if o == d}

    by_group = {group: out for per_device in _on_each(acts.devices, solve_on) for group, out in per_device.items()}
    result: dict[str, QuantizedTensor] = {}
    for group in arch.linear_groups:  # recorded in the one-device order
        for name, qt, mse, rel, fallback, note in by_group[group]:
            quantizer._record(index, name, mse, rel, fallback, note)
            result[name] = qt
    return result


def awq_inputs(
    replicas: Sequence[nn.Module], acts: ShardedActivations, arch: ArchitectureInfo, search_tokens: int
) -> dict[Group, Tensor]:
    """Every stride-th token of the whole calibration stream per group, float32 on the primary: the same
    tokens, in the same order, as the one-device pipeline keeps."""
    stride = awq_stride(acts.num_tokens, search_tokens)

    def capture(i: int) -> dict[Group, list[Tensor]]:
        samples, collect = strided_tokens(arch.linear_groups, stride, acts.bounds[i][0] * acts.seq_len)
        capture_inputs(replicas[i], acts.shards[i], acts.positions[i], arch, collect)
        return samples

    per_device = _on_each(acts.devices, capture)
    primary = acts.devices[0]
    return {g: torch.cat([x.to(primary) for samples in per_device for x in samples[g]]) for g in arch.linear_groups}
