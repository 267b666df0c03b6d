"""Workers hold no database secret: a Ray attempt reports its progress and outcome through the dispatcher
(its reports wait in the attempt actor's mailbox and the dispatcher drains them into the database), so
the database URL is in neither the attempt's argument nor its process, and the process never connects to
the database; the job still completes with its progress rows written, fenced by the attempt number."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from orchestrator.db import transaction
from orchestrator.dispatcher import Dispatcher, start_in_thread
from orchestrator.queue.attempt import AttemptTicket
from tests.orchestrator.support import (
    check_manifest,
    events,
    load_job,
    quantizing_pid,
    service_settings,
    sessions_for,
    slow_body,
    stop,
    submit,
    wait_for,
    wait_for_quantizing,
    wait_for_state,
)
from workers.storage import LocalStore


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _connections_to_port(pid: int, port: int) -> list[str]:
    """The TCP connections of process `pid` whose remote end is `port` (from /proc/<pid>/net/tcp*)."""
    mine = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote, inode = fields[2], fields[9]
                if inode in mine and int(remote.rsplit(":", 1)[1], 16) == port:
                    found.append(line.strip())
    return found


def _open_files(pid: int) -> list[str]:
    paths = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return paths


@pytest.mark.ray
def test_a_ray_attempt_reports_through_the_dispatcher_and_never_touches_the_database(
    ray_cluster: None,
    database_url: str,
    allowed_root: Path,
    tiny_assets: dict,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    from orchestrator.executors.ray_executor import RayExecutor

    settings = service_settings(database_url, allowed_root, tmp_path, executor="ray", lease_seconds=30.0)
    sessions = sessions_for(database_url)
    job_id = submit(sessions, slow_body(tiny_assets, slow_model), settings)
    dispatcher = Dispatcher(sessions, RayExecutor(capacity=1), settings, name="no-db")
    url = make_url(database_url)
    secret = str(url.database) if url.drivername.startswith("sqlite") else database_url

    # The attempt's only argument, as the dispatcher builds it, carries no database URL.
    ticket = AttemptTicket(job_id, 1, {"model": "m"}, dispatcher.worker_config, "alice")
    assert secret.encode() not in pickle.dumps(ticket)
    assert not any("database" in name for name in vars(dispatcher.worker_config))

    worker = start_in_thread(dispatcher)

    try:
        pid = wait_for(lambda: quantizing_pid(sessions, job_id), 300, "the attempt to quantize on a Ray worker")
        assert pid != os.getpid()  # the attempt runs in a Ray worker process of its own
        # While it quantizes, that process has no database URL in its environment or command line, no
        # database file open and no connection to the database server.
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert secret.encode() not in f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert secret.encode() not in f.read()
        if url.drivername.startswith("sqlite"):
            assert not [p for p in _open_files(pid) if p.startswith(secret)]
        else:
            assert _connections_to_port(pid, url.port or 5432) == []
        job = wait_for_state(sessions, job_id, {"succeeded", "failed"}, timeout=180)
    finally:
        stop(worker)
    assert job.state == "succeeded" and job.attempts == 1, job.error
    history = events(sessions, job_id)
    assert [(e.state, e.attempt) for e in history if e.kind == "state"] == [
        ("queued", 0),
        ("running", 1),
        ("succeeded", 1),
    ]
    started = next(e for e in history if e.kind == "attempt")
    assert started.data["pid"] == pid and "ray_node_id" in started.data
    layers = [e.layer for e in history if e.kind == "progress" and e.stage == "quantize"]
    assert layers == list(range(len(layers))) and len(layers) == 8  # every layer's progress row landed
    assert all(e.attempt == 1 for e in history if e.kind == "progress")
    assert load_job(sessions, job_id).progress["stage"] == "done"
    check_manifest(LocalStore(settings.object_store), f"jobs/{job_id}")


@pytest.mark.ray
def test_a_cancel_reaches_a_ray_attempt_through_the_dispatcher_and_its_actor_is_gone_after(
    ray_cluster: None,
    clean_sqlite_url: str,
    allowed_root: Path,
    tiny_assets: dict,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    """The verdict travels back with each drain: a cancel requested mid-quantization stops the attempt at
    a layer boundary, its Cancelled report is recorded, and the attempt's detached actor is killed."""
    import ray

    from orchestrator.executors.ray_executor import NAMESPACE, RayExecutor, actor_name
    from orchestrator.queue import crud
    from orchestrator.queue.models import Job

    settings = service_settings(clean_sqlite_url, allowed_root, tmp_path, executor="ray", lease_seconds=30.0)
    sessions = sessions_for(clean_sqlite_url)
    job_id = submit(sessions, slow_body(tiny_assets, slow_model), settings)
    worker = start_in_thread(Dispatcher(sessions, RayExecutor(capacity=1), settings, name="cancel"))
    try:
        wait_for_quantizing(sessions, job_id)
        assert ray.get_actor(actor_name(job_id, 1), namespace=NAMESPACE) is not None
        with transaction(sessions) as s:
            assert crud.request_cancel(s, s.get(Job, job_id)).state == "cancelling"
        job = wait_for_state(sessions, job_id, {"cancelled", "succeeded", "failed"}, timeout=120)

        def actor_gone() -> bool:
            try:
                ray.get_actor(actor_name(job_id, 1), namespace=NAMESPACE)
            except ValueError:
                return True
            return False

        wait_for(actor_gone, 30, "the attempt's actor to be killed")
    finally:
        stop(worker)
    assert job.state == "cancelled" and job.attempts == 1, job.error
    history = events(sessions, job_id)
    assert [e.state for e in history if e.kind == "state"] == ["queued", "running", "cancelling", "cancelled"]
    assert max(e.layer for e in history if e.stage == "quantize") < 7  # stopped before the last layer


@pytest.mark.ray
def test_an_actor_no_dispatcher_drains_any_more_ends_itself(
    ray_cluster: None,
    clean_sqlite_url: str,
    allowed_root: Path,
    tiny_assets: dict,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    """A dispatcher that dies without a word (kill -9) leaves its detached actor behind; once no one has
    drained it for two leases (the job was rescued and runs elsewhere), the actor stops its attempt and
    ends its process instead of holding its GPU for ever."""
    import time

    import ray

    from orchestrator.executors.ray_executor import NAMESPACE, RayExecutor, actor_name

    settings = service_settings(clean_sqlite_url, allowed_root, tmp_path, executor="ray", lease_seconds=3.0)
    sessions = sessions_for(clean_sqlite_url)
    job_id = submit(sessions, slow_body(tiny_assets, slow_model), settings)
    dispatcher = Dispatcher(sessions, RayExecutor(capacity=1), settings, name="dies")
    assert dispatcher.worker_config.orphan_seconds == 6.0

    def quantizing() -> bool:
        dispatcher.step()
        return any(e.stage == "quantize" for e in events(sessions, job_id))

    wait_for(quantizing, 120, "the attempt to quantize", interval=0.1)
    pid = next(e for e in events(sessions, job_id) if e.kind == "attempt").data["pid"]
    stopped_at = time.monotonic()  # the dispatcher "dies": nothing drains the actor from now on

    def actor_gone() -> bool:
        try:
            ray.get_actor(actor_name(job_id, 1), namespace=NAMESPACE)
        except ValueError:
            return True
        return False

    wait_for(actor_gone, 60, "the orphaned actor to end itself", interval=0.5)
    assert 6.0 <= time.monotonic() - stopped_at < 40
    assert not os.path.exists(f"/proc/{pid}") or _process_state(pid) == "Z"  # its process is gone


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
