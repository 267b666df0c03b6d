"""The one module that talks to Ray: attempts run as Ray tasks, one GPU each where the cluster has GPUs.

`ray.init()` starts an embedded local instance (no dashboard: an unauthenticated Ray dashboard/Jobs API
is remote code execution, CVE-2023-48022) unless RAY_ADDRESS names a cluster. Ray's own task retries
are off (max_retries=0): retries are the dispatcher's job, with backoff and a visible attempt count.
A task whose worker process dies surfaces here as an error, which the dispatcher records as a failed,
retryable attempt.
"""

from __future__ import annotations

from typing import Any

from orchestrator.attempt import AttemptTicket
from orchestrator.executor import Finished


def _run_attempt_task(ticket: AttemptTicket) -> str:
    import ray

    from orchestrator.attempt import run_attempt

    return run_attempt(ticket, placement={"ray_node_id": ray.get_runtime_context().get_node_id()})


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


class RayExecutor:
    def __init__(
        self,
        *,
        address: str | None = None,
        cpus_per_task: int = 1,
        capacity: int | None = None,
        object_store_bytes: int | None = None,
        task_resources: dict[str, float] | None = None,
    ) -> None:
        """`task_resources` (e.g. {"gpu_a100": 1}): custom Ray resources each attempt needs, instead of one
        GPU; how a cluster steers attempts to a kind of node, and what tests use to stand in for GPUs."""
        import ray

        if not ray.is_initialized():
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=None if address else object_store_bytes,  # only for an embedded instance
            )
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        options: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_task}
        default_capacity = gpus or max(1, int(resources.get("CPU", 1)) // cpus_per_task)
        if task_resources:
            missing = sorted(set(task_resources) - set(resources))
            if missing:
                raise ValueError(
                    f"no node of the Ray cluster offers resource(s) {', '.join(missing)}; start nodes with "
                    "--resources or change QF_RAY_TASK_RESOURCES"
                )
            options = {"num_cpus": cpus_per_task, "resources": dict(task_resources)}
            default_capacity = max(1, min(int(resources[k] // v) for k, v in task_resources.items() if v > 0))
        self._ray = ray
        self._task = ray.remote(max_retries=0)(_run_attempt_task).options(**options)
        self._capacity = capacity or default_capacity
        self._running: dict[str, tuple[AttemptTicket, Any]] = {}
        self.uses_gpus = bool(gpus) or bool(task_resources)
        # GPU-seconds bookkeeping: custom resources stand for accelerators, counted by their amount.
        self.gpus_per_task = float(sum(task_resources.values())) if task_resources else (1.0 if gpus else 0.0)

    @property
    def capacity(self) -> int:
        return self._capacity

    def submit(self, ticket: AttemptTicket) -> None:
        self._running[ticket.job_id] = (ticket, self._task.remote(ticket))

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
