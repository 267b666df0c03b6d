"""The devices of one job: which they are, one long-lived thread per device, the decoder layer copied to each,
and how samples and work are split among them. One device is the case N = 1 of the same code: its work runs
inline on the caller's thread and nothing is copied.

Measured on 2×H200 (benchmarks/gpu.md, runs 8–11): GPTQ 1.29×, AWQ 1.43× on an 8B shape with two devices,
before the costliest group's factorisation was split over the devices (workers/quant/split_inverse.py; not yet
measured on GPUs). Nothing here assumes two devices: N shards, N threads, N replicas (CPU tests: N = 2, 3, 4).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch
from torch import nn

from workers.errors import InvalidSpecError
from workers.loading import resolve_device

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
    variables (e.g. `report_precision`). CUDA kernels release the GIL, so the devices work at once. The
    threads live as long as the job: a thread's first CUDA calls set up its own cuBLAS/cuSOLVER state, and a
    fresh thread pool per call ran the calibration forward at 0.63-0.70 of the speed of these threads on
    2×H200 (benchmarks/gpu_concurrency.py). With one device, `work(0)` runs on the caller's thread.
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


def assign_groups(costs: Sequence[int], num_devices: int) -> list[int]:
    """Device index of each piece of work: largest first onto the least-loaded device, ties to the lower index."""
    loads, owner = [0] * num_devices, [0] * len(costs)
    for g in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        owner[g] = min(range(num_devices), key=lambda d: (loads[d], d))
        loads[owner[g]] += costs[g]
    return owner


def split_group(costs: Sequence[int], num_devices: int) -> int | None:
    """The group whose GPTQ factorisation and sweep are split over all devices (its inverse by columns, its
    sweep by output rows: workers/methods/groups.py): the costliest one, when it alone is more than an even
    share of the layer (Llama-3-8B: down_proj, 82% of the solve cost); else None."""
    if num_devices < 2 or not costs:
        return None
    costliest = max(range(len(costs)), key=lambda g: (costs[g], -g))
    return costliest if costs[costliest] * num_devices > sum(costs) else None
