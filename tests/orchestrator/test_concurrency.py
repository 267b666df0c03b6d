"""Two dispatcher processes on one PostgreSQL database drain 50 queued jobs: every job runs exactly once
and succeeds, and both dispatchers take part."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.db import transaction
from orchestrator.queue.models import Artifact, Job, JobEvent
from tests.orchestrator.support import service_settings, sessions_for, submit, wait_for
from workers.storage import LocalStore

REPO = Path(__file__).resolve().parents[2]
JOBS = 50


def start_dispatcher(name: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "quantfleet.cli",
            "dispatcher",
            "--executor",
            "thread",
            "--concurrency",
            "2",
            "--name",
            name,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


@pytest.mark.postgres
def test_two_dispatchers_run_each_of_50_jobs_exactly_once(
    clean_postgres_url: str, allowed_root: Path, tiny_assets: dict, tmp_path: Path
) -> None:
    url = clean_postgres_url
    settings = service_settings(url, allowed_root, tmp_path)
    sessions = sessions_for(url)
    env = {
        **os.environ,
        "QF_DATABASE_URL": url,
        "QF_OBJECT_STORE": settings.object_store,
        "QF_ALLOWED_ROOTS": str(allowed_root),
        "QF_WORK_DIR": str(settings.work_dir),
        "QF_POLL_SECONDS": "0.1",
        "QF_LEASE_SECONDS": "30",
    }
    dispatchers = [start_dispatcher(name, env) for name in ("left", "right")]
    try:
        for proc in dispatchers:  # both ready before any job exists, so both compete from the start
            assert proc.stdout is not None
            assert "ready" in proc.stdout.readline()
        body = {"model": str(tiny_assets["model_1layer"]), "method": "rtn", "bits": 4, "group_size": 32}
        ids = {submit(sessions, body, settings) for _ in range(JOBS)}

        def all_done() -> bool:
            with transaction(sessions) as s:
                states = s.scalars(select(Job.state)).all()
            return all(state in ("succeeded", "failed") for state in states)

        wait_for(all_done, 240, f"{JOBS} jobs to finish", interval=0.5)
    finally:
        for proc in dispatchers:
            proc.terminate()
        for proc in dispatchers:
            proc.wait(timeout=30)

    with transaction(sessions) as s:
        jobs = s.scalars(select(Job)).all()
        history = s.scalars(select(JobEvent)).all()
        manifests = s.scalars(select(Artifact.job_id).where(Artifact.path == "manifest.json")).all()
    assert {j.id for j in jobs} == ids
    assert {(j.state, j.attempts) for j in jobs} == {("succeeded", 1)}
    starts = Counter(e.job_id for e in history if e.kind == "attempt")
    successes = Counter(e.job_id for e in history if e.state == "succeeded")
    assert starts == successes == Counter(ids)  # one run and one success per job
    assert sorted(manifests) == sorted(ids)
    claimed_by = Counter(e.data["lease_owner"] for e in history if e.state == "running")
    assert set(claimed_by) == {"left", "right"} and sum(claimed_by.values()) == JOBS
    store = LocalStore(settings.object_store)
    assert all(store.exists(f"jobs/{job_id}/manifest.json") for job_id in ids)
