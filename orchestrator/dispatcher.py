"""The dispatcher loop: claim queued jobs, start their attempts on an executor, keep their leases alive,
turn dead workers into retryable failures, and rescue jobs whose lease expired elsewhere.

Any number of dispatchers may share one database: claims are atomic (orchestrator.queue.leases.claim_jobs),
and every write of an attempt is fenced by its attempt number, so no job runs twice concurrently with
both runs able to record a result.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.executors import Executor, Unschedulable
from orchestrator.metrics import ServiceMetrics
from orchestrator.queue.attempt import AttemptTicket, WorkerConfig
from orchestrator.queue.leases import (
    RetryPolicy,
    adopt_leases,
    claim_jobs,
    fail_attempt,
    hand_off,
    renew_adopted,
    renew_leases,
    rescue_expired,
)
from orchestrator.queue.models import Job, utcnow
from orchestrator.queue.recorder import AttemptRecorder
from orchestrator.queue.states import TERMINAL, JobState
from orchestrator.settings import Settings

log = logging.getLogger("quantfleet.dispatcher")


def dispatcher_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Dispatcher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        executor: Executor,
        settings: Settings,
        *,
        name: str | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.executor = executor
        self.settings = settings
        self.name = name or dispatcher_name()
        self.worker_config = WorkerConfig.from_settings(settings)
        self.retry_policy = RetryPolicy(settings.retry_backoff_seconds, settings.retry_backoff_max_seconds)
        # Workers never open the database: their reports come through the executor to this recorder.
        self.recorder = AttemptRecorder(sessions, self.retry_policy)
        executor.attach(self.recorder)
        self.in_flight: dict[str, int] = {}  # job id -> attempt number
        self.adopted: dict[str, int] = {}  # attempts another dispatcher started and handed off on stopping
        self.drained: set[str] = set()  # adopted attempts whose reports this dispatcher's executor delivers
        self._last_heartbeat = 0.0
        self._last_rescue = 0.0

    def step(self) -> int:
        """One round of the loop; returns how many jobs were claimed."""
        self._reap()
        now = time.monotonic()
        if now - self._last_heartbeat >= self.settings.heartbeat_interval:
            self._heartbeat()
            self._last_heartbeat = now
        if now - self._last_rescue >= self.settings.heartbeat_interval:
            self._rescue()
            self._last_rescue = now
        return self._claim()

    def _reap(self) -> None:
        for finished in self.executor.poll():
            job_id, attempt = finished.job_id, finished.attempt
            self.in_flight.pop(job_id, None)
            if job_id in self.drained:
                self.adopted.pop(job_id, None)
                self.drained.discard(job_id)
            if finished.error is not None:
                log.warning("job %s attempt %d: worker died: %s", job_id, attempt, finished.error)
                with transaction(self.sessions) as s:
                    fail_attempt(
                        s,
                        job_id,
                        attempt,
                        error=f"worker died: {finished.error}",
                        retryable=True,
                        policy=self.retry_policy,
                    )
            if self.metrics is not None:
                self._observe(job_id, attempt)

    def _observe(self, job_id: str, attempt: int) -> None:
        """Duration, outcome and GPU-seconds of an attempt that just ended (its end is in the job row)."""
        assert self.metrics is not None
        with transaction(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or job.attempts != attempt or job.started_at is None:
                return  # gone, or already claimed again: this attempt's numbers are not knowable
            outcome = "retried" if job.state == JobState.QUEUED.value else job.state
            if outcome not in ("retried", *(state.value for state in TERMINAL)):
                return
            ended = job.finished_at or utcnow()
            method = str((job.spec or {}).get("method", "unknown"))
            duration = max(0.0, (ended - job.started_at).total_seconds())
            asked = int((job.spec or {}).get("gpus", 1))
        gpus = float(getattr(self.executor, "gpus_per_task", 0.0)) * asked  # per GPU asked for × GPUs
        self.metrics.attempt_finished(method=method, outcome=outcome, duration_s=duration, gpus=gpus)
        if job.gate_passed is not None:
            self.metrics.gate_checked(job.gate_passed)

    def _heartbeat(self) -> None:
        if not self.in_flight and not self.adopted:
            return
        lease = self.settings.lease_seconds
        with transaction(self.sessions) as s:
            held = renew_leases(s, owner=self.name, attempts=dict(self.in_flight), lease_seconds=lease)
            still_adopted = renew_adopted(
                s, owner=self.name, attempts=dict(self.adopted), lease_seconds=lease
            )
        for job_id in set(self.in_flight) - held:  # finished, or rescued by another dispatcher: let go
            log.info("job %s: lease no longer held by %s", job_id, self.name)
        for job_id in set(self.adopted) - still_adopted:  # ended, or its worker stopped beating
            log.info("job %s: adopted attempt ended or its worker went quiet", job_id)
            del self.adopted[job_id]
            if job_id in self.drained:  # its lease is gone: stop draining it (a rescue retries the job)
                self.executor.cancel(job_id)
                self.drained.discard(job_id)

    def _rescue(self) -> None:
        with transaction(self.sessions) as s:
            for job_id, state in rescue_expired(s, policy=self.retry_policy):
                log.warning("job %s: lease expired, now %s", job_id, state)
                if self.metrics is not None:
                    self.metrics.lease_expired()
            adopted = adopt_leases(s, owner=self.name, lease_seconds=self.settings.lease_seconds)
        for job_id, attempt in adopted.items():
            log.info("job %s: adopted the lease of running attempt %d", job_id, attempt)
            if self.executor.adopt(job_id, attempt):  # e.g. a Ray actor: its reports come through here now
                self.drained.add(job_id)
        self.adopted.update(adopted)

    def _claim(self) -> int:
        free = self.executor.capacity - len(self.in_flight) - len(self.drained)
        if free <= 0:
            return 0
        with transaction(self.sessions) as s:
            claims = claim_jobs(s, owner=self.name, limit=free, lease_seconds=self.settings.lease_seconds)
        for claim in claims:
            ticket = AttemptTicket(claim.job_id, claim.attempt, claim.spec, self.worker_config, claim.owner)
            try:
                self.executor.submit(ticket)
                self.in_flight[claim.job_id] = claim.attempt
            except Unschedulable as e:  # no retry can change the cluster's shape
                log.warning("job %s: cannot run here: %s", claim.job_id, e)
                with transaction(self.sessions) as s:
                    fail_attempt(
                        s,
                        claim.job_id,
                        claim.attempt,
                        error=str(e),
                        retryable=False,
                        policy=self.retry_policy,
                    )
            except Exception as e:
                log.exception("job %s: could not start attempt %d", claim.job_id, claim.attempt)
                with transaction(self.sessions) as s:
                    fail_attempt(
                        s,
                        claim.job_id,
                        claim.attempt,
                        error=f"could not start the attempt: {e}",
                        retryable=True,
                        policy=self.retry_policy,
                    )
        return len(claims)

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set; database hiccups are logged and retried on the next round."""
        log.info("dispatcher %s started (capacity %d)", self.name, self.executor.capacity)
        while not stop.is_set():
            try:
                claimed = self.step()
            except Exception:
                log.exception("dispatcher %s: round failed; retrying", self.name)
                claimed = 0
            stop.wait(0.05 if claimed else self.settings.poll_seconds)
        self.release()

    def release(self) -> None:
        """On shutdown. Where the executor lets attempts outlive this dispatcher (`detach()`: threads of
        this process, which Python joins before exiting, or detached Ray actors on a Ray cluster), they
        keep running under their attempt number and their leases are handed off: another dispatcher adopts
        them and renews them while the worker's heartbeat is fresh (a thread's reports are still recorded by
        this process; a Ray actor's are drained by the adopter). Otherwise (an embedded Ray ends with this
        process) the attempts go back to the queue at once instead of waiting for their leases to expire;
        their workers are fenced off and stop at their next progress report."""
        keeps_running = self.executor.detach()
        self.drained.clear()
        if keeps_running or self.adopted:
            handing = {**self.adopted, **(self.in_flight if keeps_running else {})}
            with transaction(self.sessions) as s:
                handed = hand_off(s, owner=self.name, attempts=handing)
            log.info("dispatcher %s: handed off %d running attempts", self.name, len(handed))
            self.adopted.clear()
            if keeps_running:
                self.in_flight.clear()
        for job_id, attempt in list(self.in_flight.items()):
            self.executor.cancel(job_id)
            with transaction(self.sessions) as s:
                fail_attempt(
                    s,
                    job_id,
                    attempt,
                    error=f"dispatcher {self.name} shut down",
                    retryable=True,
                    policy=RetryPolicy(0, 0),
                )
        self.in_flight.clear()
        self.executor.shutdown()


def start_in_thread(dispatcher: Dispatcher) -> tuple[threading.Thread, threading.Event]:
    """Run `dispatcher` on a daemon thread; set the returned event (then join) to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), name="qf-dispatcher", daemon=True)
    thread.start()
    return thread, stop
