"""orchestrator.queue.outputs: every attempt writes to a folder of its own job, checked again at run time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from orchestrator.dispatcher import Dispatcher, start_in_thread
from orchestrator.executors import ThreadExecutor
from orchestrator.queue.attempt import AttemptTicket, WorkerConfig, output_location
from orchestrator.queue.outputs import check_output_uri, owner_segment
from orchestrator.settings import Settings
from tests.orchestrator.support import (
    events,
    gptq_body,
    service_settings,
    sessions_for,
    submit,
    wait_for_state,
)
from workers.errors import InputError
from workers.storage import LocalStore, S3Store


def _settings(database_url: str, allowed_root: Path, tmp_path: Path, **extra: object) -> Settings:
    return service_settings(
        database_url, allowed_root, tmp_path, allowed_output_roots=[tmp_path / "exports"], **extra
    )


def _ticket(settings: Settings, job_id: str, owner: str, uri: str | None) -> AttemptTicket:
    spec = {"output": {"uri": uri}} if uri else {}
    return AttemptTicket(job_id, 1, spec, WorkerConfig.from_settings(settings), owner)


@pytest.mark.parametrize(
    ("owner", "segment"),
    [("alice", "alice"), ("a/b", "a%2Fb"), ("..", "%2E%2E"), (".", "%2E"), ("x y", "x%20y")],
)
def test_owner_folder_names_cannot_address_another_folder(owner: str, segment: str) -> None:
    assert owner_segment(owner) == segment
    long = owner_segment("é" * 128)
    assert long.startswith("@") and len(long) <= 100  # '@' never appears in an encoded name


def test_each_job_writes_to_its_own_folder(tmp_path: Path, allowed_root: Path, sqlite_url: str) -> None:
    settings = _settings(sqlite_url, allowed_root, tmp_path)
    mine = str((tmp_path / "exports" / "alice" / "nightly").resolve())
    first, prefix1 = output_location(_ticket(settings, "job1", "alice", mine))
    second, prefix2 = output_location(_ticket(settings, "job2", "alice", mine))
    assert isinstance(first, LocalStore) and isinstance(second, LocalStore)
    assert (first.root, prefix1) == (Path(mine) / "job1", "")
    assert (second.root, prefix2) == (Path(mine) / "job2", "")  # same output.uri, separate folders
    default, prefix = output_location(_ticket(settings, "job3", "alice", None))
    assert isinstance(default, LocalStore) and default.root == Path(settings.object_store).resolve()
    assert prefix == "jobs/job3"
    s3_settings = settings.model_copy(update={"allowed_buckets": ["qf-out"]})
    s3, prefix = output_location(_ticket(s3_settings, "job4", "alice", "s3://qf-out/alice/x/"))
    assert isinstance(s3, S3Store) and s3.uri("a") == "s3://qf-out/alice/x/job4/a" and prefix == ""


def test_a_stored_output_uri_into_another_jobs_folder_fails_the_attempt_and_writes_nothing(
    database_url: str, allowed_root: Path, tiny_assets: dict, tmp_path: Path
) -> None:
    """A job queued before submissions were checked (or under other settings) cannot write either."""
    settings = _settings(database_url, allowed_root, tmp_path)
    sessions = sessions_for(database_url)
    victim = Path(settings.object_store).resolve() / "jobs" / ("a" * 32)
    victim.mkdir(parents=True)
    (victim / "manifest.json").write_bytes(b'{"files": []}')
    before = hashlib.sha256((victim / "manifest.json").read_bytes()).hexdigest()
    body = gptq_body(tiny_assets, eval_=False, output={"uri": str(victim)})
    job_id = submit(sessions, body, settings, owner="bob")  # straight into the database, as before
    stop = start_in_thread(Dispatcher(sessions, ThreadExecutor(1), settings))
    try:
        job = wait_for_state(sessions, job_id, {"succeeded", "failed"}, timeout=60)
    finally:
        stop[1].set()
        stop[0].join(timeout=60)
    assert job.state == "failed" and job.attempts == 1  # not retried: the input cannot change
    assert "inside the service's object store" in (job.error or "")
    assert [p.name for p in victim.iterdir()] == ["manifest.json"]
    assert hashlib.sha256((victim / "manifest.json").read_bytes()).hexdigest() == before
    assert [e.state for e in events(sessions, job_id) if e.kind == "state"] == ["queued", "running", "failed"]


def test_check_output_uri_refuses_the_s3_object_store(tmp_path: Path) -> None:
    from workers.uris import InputPolicy

    policy = InputPolicy((), ("shared",))
    check_output_uri("s3://shared/alice/x", "alice", policy, "s3://shared/quantfleet")
    for uri in ("s3://shared/quantfleet/jobs/abc", "s3://shared/quantfleet"):
        with pytest.raises(InputError, match="inside the service's object store"):
            check_output_uri(uri, "quantfleet", policy, "s3://shared/quantfleet")
    with pytest.raises(InputError, match="inside the service's object store"):
        check_output_uri("s3://shared/alice/x", "alice", policy, "s3://shared")
