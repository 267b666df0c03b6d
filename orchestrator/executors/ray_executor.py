"""The one module that talks to Ray: each attempt runs in a Ray actor of its own, holding the GPUs its job
asks for (`gpus`, default 1) where the cluster has GPUs, else CPUs.

`ray.init()` starts an embedded local instance (no dashboard: an unauthenticated Ray dashboard/Jobs API
is remote code execution, CVE-2023-48022) unless RAY_ADDRESS names a cluster. Ray's own retries are off
(max_restarts=0): retries are the dispatcher's job, with backoff and a visible attempt count. An attempt
whose worker process dies surfaces here as an error, which the dispatcher records as a failed, retryable
attempt. A job that no node could ever run (gpus=2 on a cluster without GPUs, gpus=8 where the largest
node has 4) is refused at submission (`Unschedulable`) instead of waiting in Ray's queue forever.

The actor holds no database credentials: the attempt's reports wait in a `Mailbox` inside the actor, and
the dispatcher drains them (one call per attempt and dispatcher round, which also hands the attempt its
verdict: cancel requested, fenced off) into its recorder. The actor is detached and named after the job
and attempt, so it outlives the dispatcher that started it: a dispatcher that stops leaves it running
(`detach`) and another one finds it by name and drains it from then on (`adopt`), under the same attempt.
(With an embedded Ray, started by this executor, attempts end with the process: `detach` says so.)

An attempt runs in a fresh worker process (an actor has one to itself, killed when the attempt ends):
CUDA binds a process to the devices CUDA_VISIBLE_DEVICES named when torch first touched CUDA, so a reused
worker would keep computing on the previous attempt's GPU whatever Ray assigns next. Its start event
records the GPU ids Ray gave it (`gpu_ids`) and the CUDA_VISIBLE_DEVICES the engine sees.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.executors.base import Finished, Unschedulable
from orchestrator.queue.attempt import AttemptTicket
from orchestrator.queue.reports import Mailbox, Report, ReportSink, Verdict

log = logging.getLogger("quantfleet.ray")

NAMESPACE = "quantfleet"


def actor_name(job_id: str, attempt: int) -> str:
    return f"qf-attempt-{job_id}-{attempt}"


def torch_threads(assigned: Mapping[str, float]) -> int:
    """Intra-op threads for a task holding `assigned` Ray resources: one per CPU it was given."""
    return max(1, int(assigned.get("CPU", 1)))


class AttemptActor:
    """One attempt, run on a thread of the actor's process; its reports wait in the mailbox."""

    def __init__(self, ticket: AttemptTicket) -> None:
        import ray
        import torch

        context = ray.get_runtime_context()
        # Ray sets OMP_NUM_THREADS in a worker (1 unless it asks for CPUs): give torch one thread per CPU
        # this actor holds, whatever the process was started with.
        torch.set_num_threads(torch_threads(context.get_assigned_resources()))
        placement = task_placement(context.get_node_id(), ray.get_gpu_ids())
        self._mailbox = Mailbox()
        self._thread = threading.Thread(
            target=self._run, args=(ticket, placement), name="qf-attempt", daemon=True
        )
        self._thread.start()
        watch = threading.Thread(
            target=self._watch, args=(ticket.config.orphan_seconds,), name="qf-orphan-watch", daemon=True
        )
        watch.start()

    def _watch(self, orphan_seconds: float) -> None:
        """An actor no dispatcher drains for `orphan_seconds` (its dispatcher died and its lease was
        rescued: the job runs again elsewhere) stops its attempt and ends its process, so it does not hold
        its GPU for ever: a detached actor outlives the driver that started it."""
        while True:
            time.sleep(min(5.0, orphan_seconds / 4))
            if self._mailbox.unheard_for() < orphan_seconds:
                continue
            log.warning("attempt actor unheard of for %.0f s: stopping it", orphan_seconds)
            self._mailbox.orphaned()
            self._thread.join(timeout=orphan_seconds)
            os._exit(0)  # Ray then reports the actor dead to anyone who still asks

    def _run(self, ticket: AttemptTicket, placement: dict[str, Any]) -> None:
        from orchestrator.queue.attempt import run_attempt

        try:
            run_attempt(ticket, self._mailbox, placement=placement)
        except BaseException as e:  # outside the engine's own handling: report it as the worker's death
            self._mailbox.close("".join(traceback.format_exception_only(e)).strip())
        else:
            self._mailbox.close()

    def drain(self, verdict: Verdict | str = "unknown") -> tuple[list[Report], bool, str | None]:
        return self._mailbox.drain(verdict)


def task_placement(node_id: str, gpu_ids: Sequence[int | str]) -> dict[str, Any]:
    """What the attempt's start event records about where it runs: the Ray node, and for a task holding
    GPUs, their ids as Ray assigned them and the CUDA_VISIBLE_DEVICES that torch sees in this process."""
    placement: dict[str, Any] = {"ray_node_id": node_id}
    if gpu_ids:
        placement["gpu_ids"] = list(gpu_ids)
        placement["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return placement


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


@dataclass
class _Tracked:
    """An attempt this executor drains: its actor, the drain call in flight, and reports received but not
    yet recorded (the database may be down for a moment)."""

    job_id: str
    attempt: int
    actor: Any
    pending: Any = None
    backlog: list[Report] = field(default_factory=list)
    verdict: Verdict | str = "unknown"
    ended: bool = False
    error: str | None = None


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

        # An embedded instance started here ends with this process, and the attempts with it.
        self._embedded = not ray.is_initialized() and not address
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
        # Two calls at once: the drains run beside __init__'s attempt thread, never queued behind anything.
        remote: Any = ray.remote  # (its stubs do not know actor options)
        self._actor = remote(max_restarts=0, max_task_retries=0, max_concurrency=2)(AttemptActor)
        self._capacity = capacity or default_capacity
        self._running: dict[str, _Tracked] = {}
        self._sink: ReportSink | None = None
        self.uses_gpus = bool(gpus) or bool(task_resources)
        # GPU-seconds bookkeeping, per GPU a job asks for: custom resources count by their amount.
        self.gpus_per_task = float(sum(task_resources.values())) if task_resources else (1.0 if gpus else 0.0)

    @property
    def capacity(self) -> int:
        return self._capacity

    def attach(self, sink: ReportSink) -> None:
        self._sink = sink

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
        if self._sink is None:
            raise RuntimeError("attach() a report sink before submitting attempts")
        options = self.options_for(ticket.spec)
        actor = self._actor.options(
            name=actor_name(ticket.job_id, ticket.attempt),
            namespace=NAMESPACE,
            lifetime="detached",  # outlives this dispatcher: another one may adopt it
            **options,
        ).remote(ticket)
        self._running[ticket.job_id] = _Tracked(ticket.job_id, ticket.attempt, actor)

    def adopt(self, job_id: str, attempt: int) -> bool:
        try:
            actor = self._ray.get_actor(actor_name(job_id, attempt), namespace=NAMESPACE)
        except ValueError:  # no such actor on this cluster: the attempt is gone (its lease will expire)
            return False
        self._running[job_id] = _Tracked(job_id, attempt, actor)
        return True

    def poll(self) -> list[Finished]:
        """Receive what the attempts reported since the last round and record it; returns the attempts
        that ended (their last reports recorded first) or whose actor died."""
        if not self._running:
            return []
        for tracked in self._running.values():
            if tracked.pending is None and not tracked.ended:
                tracked.pending = tracked.actor.drain.remote(tracked.verdict)
        waiting = {t.pending: t for t in self._running.values() if t.pending is not None}
        ready, _ = self._ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        done = []
        for ref in ready:
            tracked = waiting[ref]
            tracked.pending = None
            try:
                reports, tracked.ended, tracked.error = self._ray.get(ref)
            except Exception as e:  # the actor's process died, or the actor could not even start
                del self._running[tracked.job_id]
                self._kill(tracked.actor)
                done.append(Finished(tracked.job_id, tracked.attempt, _first_line(e)))
                continue
            tracked.backlog.extend(reports)
        for tracked in list(self._running.values()):
            if not self._record(tracked):
                continue
            if tracked.ended:
                del self._running[tracked.job_id]
                self._kill(tracked.actor)
                done.append(Finished(tracked.job_id, tracked.attempt, tracked.error))
        return done

    def _record(self, tracked: _Tracked) -> bool:
        """Hand the backlog to the recorder in order; False if the database failed (kept for next round)."""
        assert self._sink is not None
        while tracked.backlog:
            try:
                tracked.verdict = self._sink(tracked.job_id, tracked.attempt, tracked.backlog[0])
            except Exception as e:
                log.warning(
                    "job %s attempt %d: could not record a report: %s", tracked.job_id, tracked.attempt, e
                )
                return False
            tracked.backlog.pop(0)
        return True

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception as e:  # already gone
            log.debug("could not kill an attempt actor: %s", e)

    def cancel(self, job_id: str) -> None:
        tracked = self._running.pop(job_id, None)
        if tracked is not None:
            self._kill(tracked.actor)

    def detach(self) -> bool:
        """Leave the actors running (they are detached) for another dispatcher to adopt; with an embedded
        Ray started by this executor they end with this process, so they are not left behind."""
        if self._embedded:
            return False
        self._running.clear()
        return True

    def shutdown(self) -> None:
        for job_id in list(self._running):
            self.cancel(job_id)
