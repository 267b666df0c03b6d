"""The one module that talks to Ray: attempts run as Ray tasks, each with the GPUs its job asks for
(`gpus`, default 1) where the cluster has GPUs, else on CPUs.

`ray.init()` starts an embedded local instance (no dashboard: an unauthenticated Ray dashboard/Jobs API
is remote code execution, CVE-2023-48022) unless RAY_ADDRESS names a cluster. Ray's own task retries
are off (max_retries=0): retries are the dispatcher's job, with backoff and a visible attempt count.
A task whose worker process dies surfaces here as an error, which the dispatcher records as a failed,
retryable attempt. A job that no node could ever run (gpus=2 on a cluster without GPUs, gpus=8 where
the largest node has 4) is refused at submission (`Unschedulable`) instead of waiting in Ray's queue
forever.

An attempt holding GPUs runs in a fresh worker process (max_calls=1, as Ray does for tasks declared with
num_gpus): CUDA binds a process to the devices CUDA_VISIBLE_DEVICES named when torch first touched CUDA,
so a reused worker would keep computing on the previous attempt's GPU whatever Ray assigns next. Its start
event records the GPU ids Ray gave it (`gpu_ids`) and the CUDA_VISIBLE_DEVICES the engine sees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.attempt import AttemptTicket
from orchestrator.executor import Finished, Unschedulable


def torch_threads(assigned: Mapping[str, float]) -> int:
    """Intra-op threads for a task holding `assigned` Ray resources: one per CPU it was given."""
    return max(1, int(assigned.get("CPU", 1)))


def _run_attempt_task(ticket: AttemptTicket) -> str:
    import ray
    import torch

    from orchestrator.attempt import run_attempt

    context = ray.get_runtime_context()
    # Ray sets OMP_NUM_THREADS in a worker (1 unless the task asks for CPUs) and reuses workers across
    # tasks: give torch one thread per CPU this task holds, whatever the process was started with.
    torch.set_num_threads(torch_threads(context.get_assigned_resources()))
    return run_attempt(ticket, placement=task_placement(context.get_node_id(), ray.get_gpu_ids()))


def task_placement(node_id: str, gpu_ids: Sequence[int | str]) -> dict[str, Any]:
    """What the attempt's start event records about where it runs: the Ray node, and for a task holding
    GPUs, their ids as Ray assigned them and the CUDA_VISIBLE_DEVICES that torch sees in this process."""
    placement: dict[str, Any] = {"ray_node_id": node_id}
    if gpu_ids:
        placement["gpu_ids"] = list(gpu_ids)
        placement["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return placement


def holds_accelerators(options: Mapping[str, Any]) -> bool:
    """Whether Ray options ask for GPUs (or the custom resources standing for them)."""
    return bool(options.get("num_gpus") or options.get("resources"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


@dataclass(frozen=True)
class ClusterShape:
    """What the Ray cluster offers: resources in total, and the most of each that one node has (a task
    runs on one node, so that is the most one attempt can get)."""

    total: dict[str, float]
    largest_node: dict[str, float]

    @classmethod
    def of(cls, ray: Any) -> ClusterShape:
        largest: dict[str, float] = {}
        for node in ray.nodes():
            if node.get("Alive", True):
                for name, amount in (node.get("Resources") or {}).items():
                    largest[name] = max(largest.get(name, 0.0), float(amount))
        return cls(total={k: float(v) for k, v in ray.cluster_resources().items()}, largest_node=largest)

    @property
    def gpus(self) -> int:
        return int(self.total.get("GPU", 0))

    def expecting(self, gpus_per_node: int | None) -> ClusterShape:
        """This shape, plus GPU nodes of `gpus_per_node` GPUs that an autoscaler starts on demand."""
        if not gpus_per_node:
            return self
        largest = max(self.largest_node.get("GPU", 0.0), float(gpus_per_node))
        total = max(self.total.get("GPU", 0.0), float(gpus_per_node))
        return ClusterShape({**self.total, "GPU": total}, {**self.largest_node, "GPU": largest})


def task_options(
    shape: ClusterShape,
    *,
    devices: int,
    cpus_per_task: int,
    task_resources: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Ray options for an attempt of a job asking for `devices` GPUs; raises Unschedulable when no node
    of the cluster could run it. `task_resources` (custom resources standing for one accelerator) are
    requested `devices` times over, plus `devices` GPUs where the cluster has real ones."""
    if task_resources:
        need = {name: amount * devices for name, amount in task_resources.items()}
        for name, amount in need.items():
            have = shape.largest_node.get(name, 0.0)
            if have < amount:
                raise Unschedulable(
                    f"gpus={devices} requested but no node of the Ray cluster offers {amount:g} {name} "
                    f"(the most one node has is {have:g})"
                )
        options: dict[str, Any] = {"num_cpus": cpus_per_task, "resources": need}
        if shape.gpus:  # real GPUs too: ask for them, so Ray sets CUDA_VISIBLE_DEVICES to the task's own
            options["num_gpus"] = devices
        return options
    if shape.gpus:
        have = int(shape.largest_node.get("GPU", 0))
        if have < devices:
            raise Unschedulable(
                f"gpus={devices} requested but the largest node of the Ray cluster has {have} GPUs"
            )
        return {"num_gpus": devices, "num_cpus": cpus_per_task}
    if devices > 1:
        raise Unschedulable(f"gpus={devices} requested but the cluster has no GPUs")
    return {"num_cpus": cpus_per_task}


class RayExecutor:
    def __init__(
        self,
        *,
        address: str | None = None,
        cpus_per_task: int = 1,
        capacity: int | None = None,
        object_store_bytes: int | None = None,
        task_resources: dict[str, float] | None = None,
        gpus_per_node: int | None = None,
    ) -> None:
        """`task_resources` (e.g. {"gpu_a100": 1}): custom Ray resources each attempt needs per GPU it
        asks for, instead of GPUs; how a cluster steers attempts to a kind of node, and what tests use to
        stand in for GPUs. `gpus_per_node`: the GPU nodes' size where they autoscale from zero."""
        import ray

        if not ray.is_initialized():
            ray.init(
                # "local": always a new embedded instance, never a cluster that happens to run on this host
                address=address or "local",
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=None if address else object_store_bytes,  # only for an embedded instance
            )
        self._ray = ray
        self._gpus_per_node = gpus_per_node
        self._shape = ClusterShape.of(ray).expecting(gpus_per_node)
        # More CPUs than any node has would leave every attempt pending forever: ask for what a node has.
        cpus_per_task = min(cpus_per_task, max(1, int(self._shape.largest_node.get("CPU", cpus_per_task))))
        self._cpus_per_task = cpus_per_task
        self._task_resources = dict(task_resources or {})
        resources, gpus = self._shape.total, self._shape.gpus
        default_capacity = gpus or max(1, int(resources.get("CPU", 1)) // cpus_per_task)
        if task_resources:
            missing = sorted(set(task_resources) - set(resources))
            if missing:
                raise ValueError(
                    f"no node of the Ray cluster offers resource(s) {', '.join(missing)}; start nodes with "
                    "--resources or change QF_RAY_TASK_RESOURCES"
                )
            default_capacity = max(1, min(int(resources[k] // v) for k, v in task_resources.items() if v > 0))
        self._task = ray.remote(max_retries=0)(_run_attempt_task)
        self._gpu_task = ray.remote(max_retries=0, max_calls=1)(_run_attempt_task)  # a fresh process each
        self._capacity = capacity or default_capacity
        self._running: dict[str, tuple[AttemptTicket, Any]] = {}
        self.uses_gpus = bool(gpus) or bool(task_resources)
        # GPU-seconds bookkeeping, per GPU a job asks for: custom resources count by their amount.
        self.gpus_per_task = float(sum(task_resources.values())) if task_resources else (1.0 if gpus else 0.0)

    @property
    def capacity(self) -> int:
        return self._capacity

    def options_for(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The Ray options of an attempt of the job `spec`; Unschedulable if no node could run it (the
        cluster is read again first, in case nodes joined since this executor started)."""
        devices = int(spec.get("gpus", 1))
        try:
            return self._options(devices)
        except Unschedulable:
            self._shape = ClusterShape.of(self._ray).expecting(self._gpus_per_node)
            return self._options(devices)

    def _options(self, devices: int) -> dict[str, Any]:
        return task_options(
            self._shape,
            devices=devices,
            cpus_per_task=self._cpus_per_task,
            task_resources=self._task_resources,
        )

    def submit(self, ticket: AttemptTicket) -> None:
        options = self.options_for(ticket.spec)
        task = self._gpu_task if holds_accelerators(options) else self._task
        self._running[ticket.job_id] = (ticket, task.options(**options).remote(ticket))

    def poll(self) -> list[Finished]:
        if not self._running:
            return []
        by_ref = {ref: (job_id, ticket) for job_id, (ticket, ref) in self._running.items()}
        ready, _ = self._ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        done = []
        for ref in ready:
            job_id, ticket = by_ref[ref]
            del self._running[job_id]
            try:
                self._ray.get(ref)
                done.append(Finished(ticket, None))
            except Exception as e:  # the worker process died, or the task could not even start
                done.append(Finished(ticket, _first_line(e)))
        return done

    def cancel(self, job_id: str) -> None:
        entry = self._running.get(job_id)
        if entry is not None:
            self._ray.cancel(entry[1], force=True)

    def shutdown(self) -> None:
        for job_id in list(self._running):
            self.cancel(job_id)
