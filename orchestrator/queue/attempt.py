"""One attempt of one job, as it runs on a worker (a Ray actor or a thread): resolve inputs, run the job,
report progress, watch for cancellation, and report how the attempt ended.

The worker holds no database credentials: everything goes through a `Channel` (orchestrator.queue.reports) to
the dispatcher, which writes it fenced by the attempt number (orchestrator.queue.recorder), so an attempt whose
lease was rescued stops at its next progress report and can no longer change the job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.queue.outputs import output_target
from orchestrator.queue.reports import (
    Cancelled,
    Channel,
    Failed,
    Heartbeat,
    Progressed,
    Report,
    Started,
    Succeeded,
)
from orchestrator.queue.specs import engine_spec
from orchestrator.queue.states import JobState
from orchestrator.settings import Settings
from workers.errors import InputError, InvalidSpecError, JobCancelled
from workers.progress import Progress
from workers.storage import ObjectStore, open_store
from workers.uris import InputPolicy, materialize

log = logging.getLogger("quantfleet.attempt")

PROGRESS_WRITE_SECONDS = 1.0  # progress within one layer is reported at most this often


@dataclass(frozen=True)
class WorkerConfig:
    """Plain, picklable settings an attempt needs wherever it runs: no database URL, no secret."""

    object_store: str
    s3_endpoint_url: str | None
    allowed_roots: tuple[str, ...]
    allowed_buckets: tuple[str, ...]
    allowed_output_roots: tuple[str, ...]
    cache_dir: str
    work_dir: str
    heartbeat_seconds: float = 20.0  # how often the worker reports its heartbeat (a third of a lease)
    # A worker no dispatcher has heard from for this long (two leases) is an orphan: its lease was rescued
    # and the job runs elsewhere, so it stops and ends its process (a Ray actor would hold its GPU forever).
    orphan_seconds: float = 120.0

    @classmethod
    def from_settings(cls, s: Settings) -> WorkerConfig:
        out = s.output_policy()
        return cls(
            object_store=s.object_store,
            s3_endpoint_url=s.s3_endpoint_url,
            allowed_roots=tuple(str(Path(p).resolve()) for p in s.allowed_roots),
            allowed_buckets=tuple(s.allowed_buckets),
            allowed_output_roots=tuple(str(p) for p in out.allowed_roots),
            cache_dir=str(Path(s.cache_dir).resolve()),
            work_dir=str(Path(s.work_dir).resolve()),
            heartbeat_seconds=s.heartbeat_interval,
            orphan_seconds=2 * s.lease_seconds,
        )

    @property
    def input_policy(self) -> InputPolicy:
        return InputPolicy(
            tuple(Path(p) for p in self.allowed_roots), self.allowed_buckets, self.s3_endpoint_url
        )

    @property
    def output_policy(self) -> InputPolicy:
        return InputPolicy(
            tuple(Path(p) for p in self.allowed_output_roots), self.allowed_buckets, self.s3_endpoint_url
        )


@dataclass(frozen=True)
class AttemptTicket:
    job_id: str
    attempt: int
    spec: dict[str, Any]
    config: WorkerConfig
    owner: str  # whose job: output.uri must lie in this owner's folder (orchestrator.queue.outputs)


def output_location(ticket: AttemptTicket) -> tuple[ObjectStore, str]:
    """(store, key prefix): {output.uri}/{id}/ if the job gave an output.uri (checked again: it must lie in
    the owner's folder), else jobs/{id}/ in the service store. Either way the job's own folder."""
    cfg = ticket.config
    target, prefix = output_target(
        (ticket.spec.get("output") or {}).get("uri"),
        owner=ticket.owner,
        job_id=ticket.job_id,
        policy=cfg.output_policy,
        object_store=cfg.object_store,
    )
    return open_store(target, endpoint_url=cfg.s3_endpoint_url), prefix


class AttemptReporter:
    """The engine's on_progress and should_cancel, over the attempt's channel."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.cancel_requested = False
        self.lost = False  # the attempt was fenced off: another attempt owns the job now
        self._last_mark: tuple[Any, ...] | None = None
        self._last_write = 0.0

    def _observe(self, state: JobState | None) -> None:
        if state is None:
            self.lost = True
        elif state is JobState.CANCELLING:
            self.cancel_requested = True

    def __call__(self, progress: Progress) -> None:
        mark = (progress.stage, progress.layer)
        is_new = mark != self._last_mark
        if not is_new and time.monotonic() - self._last_write < PROGRESS_WRITE_SECONDS:
            return
        data = {k: v for k, v in vars(progress).items() if v is not None}
        self._observe(self.channel.send(Progressed(data, event=is_new)))
        self._last_mark, self._last_write = mark, time.monotonic()

    def should_cancel(self) -> bool:
        if not (self.lost or self.cancel_requested):
            self._observe(self.channel.verdict())
        return self.lost or self.cancel_requested


class WorkerHeartbeat:
    """While the attempt runs, its worker reports a heartbeat every `interval` seconds, from a thread of
    its own (a layer may take minutes); the dispatcher writes it as the job's heartbeat_at. A dispatcher
    that adopted the attempt's lease after the one that started it stopped (a rolling deploy) renews the
    lease only while this heartbeat is fresh, so an attempt whose worker died is still rescued."""

    def __init__(self, channel: Channel, job_id: str, attempt: int, interval: float) -> None:
        self.channel, self.job_id, self.attempt, self.interval = channel, job_id, attempt, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"qf-heartbeat-{job_id[:8]}", daemon=True)

    def __enter__(self) -> WorkerHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.channel.send(Heartbeat()) is None:
                    return  # fenced off or finished
            except Exception as e:  # the database may be back by the next beat
                log.warning("job %s attempt %d: heartbeat failed: %s", self.job_id, self.attempt, e)


def base_model_name(spec: dict[str, Any]) -> str:
    """The model card's base_model: as given, else the last segment of the model URI."""
    return spec.get("base_model") or spec["model"].rstrip("/").rsplit("/", 1)[-1]


def _resolver(cfg: WorkerConfig) -> Any:
    def resolve(uri: str, kind: str, what: str) -> str:
        return str(materialize(uri, cfg.input_policy, Path(cfg.cache_dir), kind=kind, what=what))

    return resolve


def run_attempt(ticket: AttemptTicket, channel: Channel, placement: dict[str, Any] | None = None) -> str:
    """Run one attempt to its end, reporting over `channel`; returns the state it left the job in
    ("fenced" if it lost the job; over a Mailbox, the state the attempt reported, as the dispatcher records
    it later). `placement` (e.g. the Ray node id) is reported with host and pid in its start event."""
    from workers.job import run_job

    where = {"host": socket.gethostname(), "pid": os.getpid(), **(placement or {})}
    if channel.send(Started(where)) is None:
        return "fenced"
    with WorkerHeartbeat(channel, ticket.job_id, ticket.attempt, ticket.config.heartbeat_seconds):
        return _run(ticket, channel, run_job)


def _run(ticket: AttemptTicket, channel: Channel, run_job: Any) -> str:
    cfg = ticket.config
    reporter = AttemptReporter(channel)
    try:
        spec = engine_spec(ticket.spec, _resolver(cfg))
        store, prefix = output_location(ticket)
        work_dir = Path(cfg.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        result = run_job(
            spec,
            store,
            prefix,
            reporter,
            reporter.should_cancel,
            work_dir,
            base_model=base_model_name(ticket.spec),
            calibration_cache=open_store(cfg.object_store, endpoint_url=cfg.s3_endpoint_url),
        )
    except JobCancelled:
        if reporter.lost:
            return "fenced"
        return _outcome(channel, Cancelled(), JobState.CANCELLED)
    except (InvalidSpecError, InputError) as e:  # retrying cannot fix the input
        return _outcome(channel, Failed(str(e), retryable=False), JobState.FAILED)
    except Exception as e:
        detail = "".join(traceback.format_exception_only(e)).strip()
        return _outcome(channel, Failed(detail, retryable=True), JobState.FAILED)
    artifacts = [
        {"path": f.path, "uri": f.uri, "kind": f.kind, "sha256": f.sha256, "bytes": f.bytes}
        for f in result.files
    ]
    output_uri = result.manifest_uri.rsplit("/", 1)[0]
    done = Succeeded(result=result.report.to_dict(), output_uri=output_uri, artifacts=artifacts)
    return _outcome(channel, done, JobState.SUCCEEDED)


def _outcome(channel: Channel, report: Report, reported: JobState) -> str:
    """Send the attempt's last report; the state the job is left in, or "fenced"."""
    verdict = channel.send(report)
    if verdict is None:
        return "fenced"
    if verdict in (JobState.RUNNING, JobState.CANCELLING):  # a Mailbox: recorded when drained
        return reported.value
    return verdict.value
