"""One attempt of one job, as it runs on a worker (a Ray task or a thread): resolve inputs, run the job,
write progress events, watch for cancellation, and record how the attempt ended.

Everything the attempt writes is fenced by its attempt number (see orchestrator.leases), so an attempt
whose lease was rescued stops at its next progress report and can no longer change the job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import absolute_url, make_engine, session_factory, transaction
from orchestrator.leases import (
    RetryPolicy,
    cancel_attempt,
    current_state,
    fail_attempt,
    record_progress,
    start_attempt,
    succeed_attempt,
    worker_heartbeat,
)
from orchestrator.outputs import output_target
from orchestrator.settings import Settings
from orchestrator.specs import engine_spec
from orchestrator.states import JobState
from workers.errors import InputError, InvalidSpecError, JobCancelled
from workers.progress import Progress
from workers.storage import ObjectStore, open_store
from workers.uris import InputPolicy, materialize

log = logging.getLogger("quantfleet.attempt")

CANCEL_POLL_SECONDS = 1.0  # should_cancel reads the database at most this often
PROGRESS_WRITE_SECONDS = 1.0  # progress within one layer is written at most this often


@dataclass(frozen=True)
class WorkerConfig:
    """Plain, picklable settings an attempt needs wherever it runs."""

    database_url: str
    object_store: str
    s3_endpoint_url: str | None
    allowed_roots: tuple[str, ...]
    allowed_buckets: tuple[str, ...]
    allowed_output_roots: tuple[str, ...]
    cache_dir: str
    work_dir: str
    retry_backoff_seconds: float
    retry_backoff_max_seconds: float
    heartbeat_seconds: float = 20.0  # how often the worker writes its own heartbeat (a third of a lease)

    @classmethod
    def from_settings(cls, s: Settings) -> WorkerConfig:
        out = s.output_policy()
        return cls(
            database_url=absolute_url(s.database_url),
            object_store=s.object_store,
            s3_endpoint_url=s.s3_endpoint_url,
            allowed_roots=tuple(str(Path(p).resolve()) for p in s.allowed_roots),
            allowed_buckets=tuple(s.allowed_buckets),
            allowed_output_roots=tuple(str(p) for p in out.allowed_roots),
            cache_dir=str(Path(s.cache_dir).resolve()),
            work_dir=str(Path(s.work_dir).resolve()),
            retry_backoff_seconds=s.retry_backoff_seconds,
            retry_backoff_max_seconds=s.retry_backoff_max_seconds,
            heartbeat_seconds=s.heartbeat_interval,
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

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.retry_backoff_seconds, self.retry_backoff_max_seconds)


@dataclass(frozen=True)
class AttemptTicket:
    job_id: str
    attempt: int
    spec: dict[str, Any]
    config: WorkerConfig
    owner: str  # whose job: output.uri must lie in this owner's folder (orchestrator.outputs)


@cache
def _sessions(database_url: str) -> sessionmaker[Session]:
    """One engine per database per worker process: Ray reuses worker processes across tasks."""
    return session_factory(make_engine(database_url))


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
    """The engine's on_progress and should_cancel, backed by the job row."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, attempt: int) -> None:
        self.sessions, self.job_id, self.attempt = sessions, job_id, attempt
        self.cancel_requested = False
        self.lost = False  # the attempt was fenced off: another attempt owns the job now
        self._last_mark: tuple[Any, ...] | None = None
        self._last_write = 0.0
        self._last_check = 0.0

    def _observe(self, state: JobState | None) -> None:
        self._last_check = time.monotonic()
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
        with transaction(self.sessions) as s:
            self._observe(record_progress(s, self.job_id, self.attempt, data, event=is_new))
        self._last_mark, self._last_write = mark, time.monotonic()

    def should_cancel(self) -> bool:
        if (
            not (self.lost or self.cancel_requested)
            and time.monotonic() - self._last_check > CANCEL_POLL_SECONDS
        ):
            with transaction(self.sessions) as s:
                self._observe(current_state(s, self.job_id, self.attempt))
        return self.lost or self.cancel_requested


class WorkerHeartbeat:
    """While the attempt runs, its worker writes the job's heartbeat_at every `interval` seconds, from a
    thread of its own (a layer may take minutes). A dispatcher that adopted the attempt's lease after the
    one that started it stopped (a rolling deploy) renews the lease only while this heartbeat is fresh, so
    an attempt whose worker died is still rescued."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, attempt: int, interval: float) -> None:
        self.sessions, self.job_id, self.attempt, self.interval = sessions, job_id, attempt, interval
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
                with transaction(self.sessions) as s:
                    if not worker_heartbeat(s, self.job_id, self.attempt):
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


def run_attempt(ticket: AttemptTicket, placement: dict[str, Any] | None = None) -> str:
    """Run one attempt to its end; returns the state it left the job in ("fenced" if it lost the job).
    `placement` (e.g. the Ray node id) is recorded with host and pid in the attempt's start event."""
    from workers.job import run_job

    sessions = _sessions(ticket.config.database_url)
    job_id, attempt, cfg = ticket.job_id, ticket.attempt, ticket.config
    with transaction(sessions) as s:
        where = {"host": socket.gethostname(), "pid": os.getpid(), **(placement or {})}
        if start_attempt(s, job_id, attempt, where) is None:
            return "fenced"
    with WorkerHeartbeat(sessions, job_id, attempt, cfg.heartbeat_seconds):
        return _run(ticket, sessions, run_job)


def _run(ticket: AttemptTicket, sessions: sessionmaker[Session], run_job: Any) -> str:
    job_id, attempt, cfg = ticket.job_id, ticket.attempt, ticket.config
    reporter = AttemptReporter(sessions, job_id, attempt)
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
        with transaction(sessions) as s:
            return JobState.CANCELLED.value if cancel_attempt(s, job_id, attempt) else "fenced"
    except (InvalidSpecError, InputError) as e:  # retrying cannot fix the input
        return _fail(sessions, ticket, str(e), retryable=False)
    except Exception as e:
        detail = "".join(traceback.format_exception_only(e)).strip()
        return _fail(sessions, ticket, detail, retryable=True)
    artifacts = [
        {"path": f.path, "uri": f.uri, "kind": f.kind, "sha256": f.sha256, "bytes": f.bytes}
        for f in result.files
    ]
    output_uri = result.manifest_uri.rsplit("/", 1)[0]
    with transaction(sessions) as s:
        done = succeed_attempt(
            s, job_id, attempt, result=result.report.to_dict(), output_uri=output_uri, artifacts=artifacts
        )
    return JobState.SUCCEEDED.value if done else "fenced"


def _fail(sessions: sessionmaker[Session], ticket: AttemptTicket, error: str, *, retryable: bool) -> str:
    with transaction(sessions) as s:
        state = fail_attempt(
            s,
            ticket.job_id,
            ticket.attempt,
            error=error,
            retryable=retryable,
            policy=ticket.config.retry_policy,
        )
    return state.value if state else "fenced"
