"""The scheduler loop: every few seconds, create the jobs of each schedule occurrence that is due.

Exactly once, with any number of schedulers: a tick locks the due schedule rows (FOR UPDATE SKIP LOCKED
on PostgreSQL, so schedulers split the work; SQLite serialises writers), and every fire first inserts its
(schedule, fire time) row, whose unique constraint turns a second attempt at the same occurrence into a
no-op, even from a scheduler that read the schedule before another advanced its next_fire_at. That row,
the fire's batch and jobs and the new next_fire_at commit in one transaction: a crash in between leaves
no half-fired occurrence.

Time is a parameter (`tick(now)`), so tests drive minutes of schedule time in milliseconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.fleet.batches import create_batch
from orchestrator.fleet.schedules import plan_fires, schedule_labels
from orchestrator.queue.models import Schedule, ScheduleFire, utcnow
from orchestrator.queue.submission import validate_submission
from orchestrator.settings import Settings
from workers.errors import InputError, InvalidSpecError

log = logging.getLogger("quantfleet.scheduler")
BATCH_LIMIT = 100  # schedules handled per transaction

Planner = Callable[[dict[str, Any], str], "dict[str, Any] | None"]  # (spec, owner) -> preflight plan


def no_plan(spec: dict[str, Any], owner: str) -> dict[str, Any] | None:
    return None


def preflight_planner(settings: Settings) -> Planner:
    """The plan each fired job stores, made at fire time (a nightly conversion re-reads the model, which
    may have changed since the schedule was written). A model that no longer passes the checks gets no
    plan: its job fails on the worker with the same readable reason."""

    def plan(spec: dict[str, Any], owner: str) -> dict[str, Any] | None:
        try:
            return validate_submission(spec, settings, owner=owner)
        except (InputError, InvalidSpecError) as e:
            log.warning("schedule job for %s: no preflight plan: %s", owner, e)
            return None

    return plan


@dataclass(frozen=True)
class Fired:
    schedule_id: str
    fire_time: datetime
    catch_up: bool
    batch_id: str
    job_ids: list[str]


def scheduler_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def fire_once(
    session: Session,
    schedule: Schedule,
    fire_time: datetime,
    *,
    catch_up: bool,
    fired_by: str,
    max_attempts: int,
    planner: Planner = no_plan,
) -> Fired | None:
    """Create the jobs of one occurrence, or nothing (None) if that occurrence already fired."""
    claim = ScheduleFire(
        schedule_id=schedule.id,
        fire_time=fire_time,
        catch_up=catch_up,
        fired_by=fired_by,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():  # a savepoint: losing the race must not undo the rest of the tick
            session.add(claim)
            session.flush()
    except IntegrityError:
        log.info(
            "schedule %s fire %s already created by another scheduler", schedule.id, fire_time.isoformat()
        )
        return None
    labels = schedule_labels(schedule.id, fire_time)
    specs = [{**spec, "labels": {**(spec.get("labels") or {}), **labels}} for spec in schedule.job_specs]
    batch, jobs = create_batch(
        session,
        owner=schedule.owner,
        api_key_id=schedule.api_key_id,
        specs=specs,
        plans=[planner(spec, schedule.owner) for spec in specs],
        template=schedule.template,
        matrix=schedule.matrix,
        max_attempts=max_attempts,
        name=schedule.name,
        schedule_id=schedule.id,
        fire_time=fire_time,
    )
    claim.batch_id = batch.id
    return Fired(schedule.id, fire_time, catch_up, batch.id, [job.id for job in jobs])


def _due(session: Session, now: datetime) -> list[Schedule]:
    query = (
        select(Schedule)
        .where(Schedule.paused.is_(False), Schedule.next_fire_at <= now)
        .order_by(Schedule.next_fire_at, Schedule.id)
        .limit(BATCH_LIMIT)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query))


def tick(
    sessions: sessionmaker[Session],
    now: datetime | None = None,
    *,
    name: str = "scheduler",
    grace: timedelta = timedelta(seconds=90),
    max_attempts: int = 3,
    planner: Planner = no_plan,
) -> list[Fired]:
    """Fire everything due at `now`; returns what this scheduler created (others' fires are not listed)."""
    now = now or utcnow()
    fired: list[Fired] = []
    with transaction(sessions) as session:
        for schedule in _due(session, now):
            assert schedule.next_fire_at is not None  # _due selects only scheduled rows
            plan = plan_fires(
                schedule.cron,
                schedule.tz,
                schedule.next_fire_at,
                now,
                schedule.missed_fire_policy,
                grace=grace,
            )
            if plan.missed and not plan.catch_up:
                log.warning("schedule %s: skipped %d missed fire(s) (policy skip)", schedule.id, plan.missed)
            for fire_time in plan.fires:
                done = fire_once(
                    session,
                    schedule,
                    fire_time,
                    catch_up=fire_time == plan.catch_up,
                    fired_by=name,
                    max_attempts=max_attempts,
                    planner=planner,
                )
                if done is not None:
                    fired.append(done)
                    log.info(
                        "schedule %s fired %s: %d job(s) in batch %s%s",
                        schedule.id,
                        fire_time.isoformat(),
                        len(done.job_ids),
                        done.batch_id,
                        " (catch-up)" if done.catch_up else "",
                    )
            schedule.next_fire_at = plan.next_fire_at
            if plan.fires:
                schedule.last_fire_at = plan.fires[-1]
    return fired


class Scheduler:
    """`tick` on a timer until stopped; database hiccups are logged and retried on the next round."""

    def __init__(
        self, sessions: sessionmaker[Session], settings: Settings, *, name: str | None = None
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.name = name or scheduler_name()

    def step(self, now: datetime | None = None) -> list[Fired]:
        return tick(
            self.sessions,
            now,
            name=self.name,
            grace=timedelta(seconds=self.settings.schedule_grace_seconds),
            max_attempts=self.settings.max_attempts,
            planner=preflight_planner(self.settings),
        )

    def run(self, stop: threading.Event) -> None:
        log.info("scheduler %s started", self.name)
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("scheduler %s: tick failed; retrying", self.name)
            stop.wait(self.settings.scheduler_poll_seconds)


def start_in_thread(scheduler: Scheduler) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,), name="qf-scheduler", daemon=True)
    thread.start()
    return thread, stop
