"""Helpers for dispatcher tests: settings for a test service, submitting jobs, waiting on them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.schemas import JobCreate
from orchestrator.db import make_engine, session_factory, transaction
from orchestrator.queue import crud
from orchestrator.queue.models import Artifact, Job, JobEvent
from orchestrator.queue.specs import request_hash
from orchestrator.settings import Settings
from workers.storage import LocalStore, ObjectStore

REPO = Path(__file__).resolve().parents[2]


def run_scenario(module: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `python -m module <args as JSON>` from the repository root (its own Ray, its own process) and
    return the JSON object it prints last; fails the test with the scenario's stderr if it exits non-zero."""
    run = subprocess.run(
        [sys.executable, "-m", module, json.dumps(args, default=str)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def service_settings(database_url: str, allowed_root: Path, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "object_store": str(tmp_path / "objects"),
        "allowed_roots": [allowed_root],
        "cache_dir": tmp_path / "cache",
        "work_dir": tmp_path / "work",
        "executor": "thread",
        "concurrency": 1,
        "lease_seconds": 10.0,
        "poll_seconds": 0.1,
        "retry_backoff_seconds": 0.2,
        "retry_backoff_max_seconds": 1.0,
        "max_attempts": 3,
    }
    return Settings(**{**values, **overrides})


def gptq_body(
    assets: dict[str, Path], *, model: str = "model", eval_: bool = True, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": str(assets[model]),
        "method": "gptq",
        "bits": 4,
        "group_size": 32,
        "calibration": {"uri": str(assets["calibration"]), "num_samples": 16, "seq_len": 64},
        **extra,
    }
    if eval_:
        body["eval"] = {"uri": str(assets["eval"]), "seq_len": 64, "max_windows": 20}
    return body


def submit(
    sessions: sessionmaker[Session], body: dict[str, Any], settings: Settings, owner: str = "alice"
) -> str:
    spec = JobCreate.model_validate(body).model_dump(mode="json")
    with transaction(sessions) as s:
        return crud.create_job(
            s, owner=owner, spec=spec, request_hash=request_hash(spec), max_attempts=settings.max_attempts
        ).id


@cache
def sessions_for(url: str) -> sessionmaker[Session]:
    """One engine per database for the whole test session (engines hold connection pools)."""
    return session_factory(make_engine(url))


def load_job(sessions: sessionmaker[Session], job_id: str) -> Job:
    with transaction(sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def events(sessions: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with transaction(sessions) as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def artifacts(sessions: sessionmaker[Session], job_id: str) -> list[Artifact]:
    with transaction(sessions) as s:
        return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.path)))


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_state(sessions: sessionmaker[Session], job_id: str, states: set[str], timeout: float) -> Job:
    def reached() -> Job | None:
        job = load_job(sessions, job_id)
        return job if job.state in states else None

    return wait_for(reached, timeout, f"job {job_id} to reach {sorted(states)}")


def wait_for_quantizing(sessions: sessionmaker[Session], job_id: str, timeout: float = 300) -> None:
    """Until the job's attempt reports its first quantize progress."""
    wait_for(lambda: any(e.stage == "quantize" for e in events(sessions, job_id)), timeout, "quantization to start")


def quantizing_pid(sessions: sessionmaker[Session], job_id: str, attempt: int = 1) -> int | None:
    """The worker process id of `attempt` once it is quantizing (from its "attempt" event), else None."""
    history = events(sessions, job_id)
    started = [e for e in history if e.kind == "attempt" and e.attempt == attempt]
    busy = any(e.stage == "quantize" and e.attempt == attempt for e in history)
    return started[0].data["pid"] if started and busy else None


def assert_handed_over_once(
    sessions: sessionmaker[Session], settings: Settings, job: Job, old: str, new: str
) -> list[JobEvent]:
    """A rolling deploy cost nothing: one attempt, dispatcher `old` left it running and `new` adopted it,
    every layer quantized once, and the published manifest matches the bytes."""
    assert job.state == "succeeded", job.error
    assert job.attempts == 1  # no attempt burned, no restart from layer 0
    history = events(sessions, job.id)
    messages = [e.message or "" for e in history if e.kind == "attempt"]
    assert any(f"dispatcher {old} stopped; attempt 1 keeps running" in m for m in messages), messages
    assert any(f"dispatcher {new} adopted the lease of attempt 1" in m for m in messages), messages
    layers = [e.layer for e in history if e.kind == "progress" and e.stage == "quantize"]
    assert layers == sorted(layers) and len(layers) == len(set(layers))  # every layer quantized once
    check_manifest(LocalStore(settings.object_store), f"jobs/{job.id}")
    return history


def check_manifest(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """The manifest lists every other stored file, and every sha256 and size matches the stored bytes."""
    manifest = json.loads(store.get_bytes(f"{prefix}/manifest.json"))
    listed = {f["path"] for f in manifest["files"]}
    stored = {key[len(prefix) + 1 :] for key in store.list(prefix)} - {"manifest.json"}
    assert listed == stored
    for entry in manifest["files"]:
        data = store.get_bytes(f"{prefix}/{entry['path']}")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
        assert len(data) == entry["bytes"], entry["path"]
    return manifest


def slow_body(assets: dict[str, Path], slow_model: Path) -> dict[str, Any]:
    body = gptq_body({**assets, "slow": slow_model}, model="slow", eval_=False)
    body["calibration"]["num_samples"] = 64
    return body


def stop(worker: tuple[threading.Thread, threading.Event]) -> None:
    worker[1].set()
    worker[0].join(timeout=60)


def assert_succeeded_once_after_two_attempts(
    sessions: sessionmaker[Session], settings: Settings, job_id: str
) -> list[JobEvent]:
    """Exactly one success, after exactly one lost attempt; the published manifest matches the bytes."""
    job = load_job(sessions, job_id)
    assert job.state == "succeeded" and job.attempts == 2, job.error
    history = events(sessions, job_id)
    assert [e.state for e in history if e.kind == "state"] == [
        "queued",
        "running",
        "queued",
        "running",
        "succeeded",
    ]
    assert [e.attempt for e in history if e.kind == "attempt"] == [1, 2]
    check_manifest(LocalStore(settings.object_store), f"jobs/{job_id}")
    paths = [a.path for a in artifacts(sessions, job_id)]
    assert len(paths) == len(set(paths)) and "manifest.json" in paths
    return history
