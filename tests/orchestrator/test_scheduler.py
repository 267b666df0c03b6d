"""The scheduler against real databases: one job set per fire time even with three scheduler processes
ticking concurrently on PostgreSQL, one catch-up after downtime with run_once, none with skip, and the
unique (schedule, fire time) row stopping a scheduler that acts on a stale read."""

from __future__ import annotations

import multiprocessing
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from api.schemas import JobCreate
from orchestrator.db import transaction
from orchestrator.fleet.scheduler import fire_once, tick
from orchestrator.fleet.schedules import next_fire_after
from orchestrator.queue.models import Batch, Job, JobLabel, Schedule, ScheduleFire
from tests.orchestrator.support import sessions_for

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
GRACE = timedelta(seconds=30)


def make_schedule(
    url: str, *, policy: str = "skip", paused: bool = False, cells: int = 2, owner: str = "alice"
) -> str:
    """An every-minute schedule of `cells` jobs whose next fire is T0."""
    specs = [
        JobCreate.model_validate(
            {
                "model": "/srv/models/tiny",
                "method": "rtn",
                "bits": bits,
                "group_size": 32,
                "labels": {"team": "nlp"},
            }
        ).model_dump(mode="json")
        for bits in (4, 8)[:cells]
    ]
    schedule = Schedule(
        id=uuid.uuid4().hex,
        owner=owner,
        name="nightly",
        cron="* * * * *",
        tz="UTC",
        template={},
        matrix={"bits": [4, 8][:cells]},
        job_specs=specs,
        missed_fire_policy=policy,
        paused=paused,
        next_fire_at=None if paused else T0,
        created_at=T0 - timedelta(hours=1),
        updated_at=T0 - timedelta(hours=1),
    )
    with transaction(sessions_for(url)) as s:
        s.add(schedule)
    return schedule.id


def fires(url: str, schedule_id: str) -> list[tuple[datetime, bool, int]]:
    """(fire time, catch-up, number of jobs) per fire row, oldest first."""
    with transaction(sessions_for(url)) as s:
        rows = s.execute(
            select(ScheduleFire.fire_time, ScheduleFire.catch_up, func.count(Job.id))
            .join(Batch, Batch.id == ScheduleFire.batch_id)
            .join(Job, Job.batch_id == Batch.id)
            .where(ScheduleFire.schedule_id == schedule_id)
            .group_by(ScheduleFire.id, ScheduleFire.fire_time, ScheduleFire.catch_up)
            .order_by(ScheduleFire.fire_time)
        ).all()
    return [(t, c, n) for t, c, n in rows]


def labels_of_jobs(url: str, schedule_id: str) -> dict[str, set[str]]:
    """fire-time label → bits of the jobs carrying it, for jobs labelled with this schedule."""
    with transaction(sessions_for(url)) as s:
        jobs = s.scalars(
            select(Job).where(
                Job.labels.any((JobLabel.key == "schedule.id") & (JobLabel.value == schedule_id))
            )
        ).all()
        out: dict[str, set[str]] = {}
        for job in jobs:
            labels = {label.key: label.value for label in job.labels}
            assert labels["team"] == "nlp" and job.owner == "alice" and job.state == "queued"
            out.setdefault(labels["schedule.fire-time"], set()).add(str(job.spec["bits"]))
        return out


def test_each_minute_fires_once_with_labelled_jobs(database_url: str) -> None:
    sid = make_schedule(database_url)
    sessions = sessions_for(database_url)
    for second in range(0, 4 * 60, 20):  # a tick every 20 s for 4 minutes
        tick(sessions, T0 + timedelta(seconds=second), name="s1", grace=GRACE)
    minutes = [T0 + timedelta(minutes=m) for m in range(4)]
    assert fires(database_url, sid) == [(m, False, 2) for m in minutes]
    assert labels_of_jobs(database_url, sid) == {
        m.strftime("%Y-%m-%dT%H:%M:%SZ"): {"4", "8"} for m in minutes
    }
    with transaction(sessions) as s:
        schedule = s.get(Schedule, sid)
        assert schedule is not None
        assert schedule.next_fire_at == T0 + timedelta(minutes=4) and schedule.last_fire_at == minutes[-1]


@pytest.mark.parametrize(("policy", "expected"), [("run_once", [(1, True)]), ("skip", [])])
def test_downtime_over_two_fires(database_url: str, policy: str, expected: list[tuple[int, bool]]) -> None:
    sid = make_schedule(database_url, policy=policy)
    sessions = sessions_for(database_url)
    tick(sessions, T0 + timedelta(seconds=5), grace=GRACE)  # fires 10:00
    # Every scheduler is down from 10:00:05 to 10:02:45: 10:01 and 10:02 pass unseen (beyond the grace).
    tick(sessions, T0 + timedelta(minutes=2, seconds=45), grace=GRACE)
    tick(sessions, T0 + timedelta(minutes=2, seconds=50), grace=GRACE)  # nothing more is owed
    tick(sessions, T0 + timedelta(minutes=3, seconds=5), grace=GRACE)  # 10:03 on time again
    got = fires(database_url, sid)
    catch_ups = [(t, c) for t, c, _ in got if t not in (T0, T0 + timedelta(minutes=3))]
    assert catch_ups == [(T0 + timedelta(minutes=m + 1), c) for m, c in expected]
    assert got[0] == (T0, False, 2) and got[-1] == (T0 + timedelta(minutes=3), False, 2)
    assert len(got) == 2 + len(expected)


def test_paused_schedules_do_not_fire(database_url: str) -> None:
    sid = make_schedule(database_url, paused=True)
    assert tick(sessions_for(database_url), T0 + timedelta(minutes=5)) == []
    assert fires(database_url, sid) == []


def test_a_stale_scheduler_cannot_fire_an_occurrence_again(database_url: str) -> None:
    sid = make_schedule(database_url)
    sessions = sessions_for(database_url)
    with transaction(sessions) as s:
        schedule = s.get(Schedule, sid)
        assert schedule is not None
        first = fire_once(s, schedule, T0, catch_up=False, fired_by="a", max_attempts=3)
    with transaction(sessions) as s:  # e.g. a scheduler that read next_fire_at before the first one wrote it
        schedule = s.get(Schedule, sid)
        assert schedule is not None
        again = fire_once(s, schedule, T0, catch_up=False, fired_by="b", max_attempts=3)
        later = fire_once(
            s, schedule, T0 + timedelta(minutes=1), catch_up=False, fired_by="b", max_attempts=3
        )
    assert first is not None and len(first.job_ids) == 2
    assert again is None and later is not None  # the lost race did not undo the rest of the transaction
    assert fires(database_url, sid) == [(T0, False, 2), (T0 + timedelta(minutes=1), False, 2)]


# --- several scheduler processes -------------------------------------------------------------------------


def _scheduler_process(url: str, name: str, offset_s: float, barrier: Any, results: Any) -> None:
    """One scheduler: ticks simulated minutes 0..3 (+ its own clock skew), in lock-step with the others."""
    from orchestrator.db import make_engine, session_factory

    sessions = session_factory(make_engine(url))
    created = 0
    for second in range(0, 4 * 60, 15):
        barrier.wait(timeout=60)  # all three tick the same simulated moment at once
        fired = tick(sessions, T0 + timedelta(seconds=second + offset_s), name=name, grace=GRACE)
        created += sum(len(f.job_ids) for f in fired)
    results.put((name, created))


@pytest.mark.postgres
def test_three_scheduler_processes_fire_each_minute_once(clean_postgres_url: str) -> None:
    url = clean_postgres_url
    sid = make_schedule(url)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_scheduler_process, args=(url, f"sched-{i}", offset, barrier, results))
        for i, offset in enumerate((0.0, 0.4, 1.3))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    created = dict(results.get(timeout=5) for _ in procs)
    minutes = [T0 + timedelta(minutes=m) for m in range(4)]
    assert fires(url, sid) == [(m, False, 2) for m in minutes]  # one job set per fire time
    assert sum(created.values()) == 8  # and no process created jobs the table does not show
    assert labels_of_jobs(url, sid) == {m.strftime("%Y-%m-%dT%H:%M:%SZ"): {"4", "8"} for m in minutes}
    with transaction(sessions_for(url)) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 8
        schedule = s.get(Schedule, sid)
        assert schedule is not None and schedule.next_fire_at == next_fire_after(
            "* * * * *", "UTC", minutes[-1]
        )
