"""Cron schedules: when a schedule fires, what to do about fires missed while no scheduler ran, and how a
job template with a matrix (models × methods × bits × group sizes) becomes a list of job request bodies.

Pure functions, no database: the scheduler loop (orchestrator/fleet/scheduler.py) decides *which* fires are due
with `plan_fires` and then claims each one through a unique (schedule, fire time) row, so several
scheduler processes create each occurrence's jobs exactly once.

Times: cron expressions are read in the schedule's IANA time zone (so "0 2 * * *" in Europe/Berlin is
02:00 Berlin time all year); every datetime handed in or out is aware, and every one handed out is UTC.
Daylight-saving rules follow Vixie cron: a fixed-hour fire whose wall-clock time is skipped (spring
forward) runs right after the jump, and one whose wall-clock time repeats (fall back) runs once; fires
whose hour field is a wildcard ("*/30 * * * *") follow real elapsed time and run in both repeated hours.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from workers.errors import InvalidSpecError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MATRIX_AXES = ("model", "method", "bits", "group_size")
MAX_MATRIX_JOBS = 64
MAX_LABELS = 32  # api.schemas.JobCreate's limit
DEFAULT_GRACE = timedelta(seconds=90)
MAX_FIRES_PER_CALL = 10_000
MISSED_COUNT_CAP = 100
EPSILON = timedelta(microseconds=1)


class ScheduleError(InvalidSpecError):
    """A schedule or job template that cannot be used; the message says what to change."""


class MissedFirePolicy(StrEnum):
    SKIP = "skip"  # fires missed during downtime are dropped; only future fires run
    RUN_ONCE = "run_once"  # any number of missed fires → exactly one catch-up run


# --- cron and time zones -------------------------------------------------------------------------------


def parse_cron(cron: str) -> str:
    """The expression as five cron fields (macros like @daily expanded); ScheduleError if it is not one."""
    if not isinstance(cron, str) or not cron.strip():
        raise ScheduleError(
            "cron must be a non-empty expression like '0 2 * * *' (minute hour day month weekday)"
        )
    expr = " ".join(cron.split())
    expr = MACROS.get(expr.lower(), expr)
    fields = expr.split(" ")
    if len(fields) != 5:
        raise ScheduleError(
            f"cron {cron!r} has {len(fields)} fields; use exactly five (minute hour day-of-month month "
            "day-of-week), e.g. '0 2 * * *' for 02:00 every day, or a macro such as @daily"
        )
    if not croniter.is_valid(expr):
        raise ScheduleError(
            f"cron {cron!r} is not a valid expression: check each field's range (minute 0-59, hour 0-23, "
            "day 1-31, month 1-12, weekday 0-6) and syntax (*, */n, a-b, a,b)"
        )
    try:
        croniter(expr, datetime.now(UTC)).get_next(datetime)
    except (CroniterBadDateError, ValueError, OverflowError) as e:
        raise ScheduleError(
            f"cron {cron!r} never fires: no date matches its day-of-month and month fields together "
            "(e.g. 31 February); check those two fields"
        ) from e
    return expr


def parse_tz(tz: str) -> ZoneInfo:
    """The IANA time zone `tz` (e.g. 'Europe/Berlin', 'UTC'); ScheduleError if it is unknown."""
    if not isinstance(tz, str) or not tz.strip():
        raise ScheduleError("tz must be an IANA time zone name such as 'UTC' or 'Europe/Berlin'")
    try:
        return ZoneInfo(tz.strip())
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ScheduleError(
            f"unknown time zone {tz!r}; use an IANA name such as 'UTC' or 'America/New_York'"
        ) from e


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ScheduleError(f"{name} must be a time-zone-aware datetime (naive times are ambiguous)")
    return value


def _fixed_hour(expr: str) -> bool:
    return not expr.split(" ")[1].startswith("*")


def iter_fire_times(cron: str, tz: str, after: datetime) -> Iterator[datetime]:
    """Fire times strictly after `after`, in UTC, forever (a generator: take what you need)."""
    expr, zone = parse_cron(cron), parse_tz(tz)
    after = _aware(after, "after")
    it = croniter(expr, after.astimezone(zone))
    fixed_hour = _fixed_hour(expr)
    previous_wall: datetime | None = None
    while True:
        local: datetime = it.get_next(datetime)
        wall = local.replace(tzinfo=None)
        if fixed_hour and previous_wall is not None and wall <= previous_wall:
            continue  # fall back repeats this wall-clock time: a fixed-hour fire runs once
        previous_wall = wall
        yield local.astimezone(UTC)


def next_fire_times(
    cron: str, tz: str, after: datetime, until: datetime, *, limit: int = MAX_FIRES_PER_CALL
) -> list[datetime]:
    """Fire times f with after < f <= until, in UTC, oldest first; at most `limit` of them."""
    until = _aware(until, "until")
    fires: list[datetime] = []
    for fire in iter_fire_times(cron, tz, after):
        if fire > until or len(fires) >= limit:
            break
        fires.append(fire)
    return fires


def next_fire_after(cron: str, tz: str, after: datetime) -> datetime:
    """The first fire time strictly after `after`, in UTC: a schedule's next_fire_at."""
    return next(iter_fire_times(cron, tz, after))


@dataclass(frozen=True)
class FirePlan:
    """What a scheduler tick should do for one schedule."""

    fires: list[datetime]  # fire times to create jobs for now (UTC), oldest first
    missed: int  # past fires beyond the grace period (counted up to MISSED_COUNT_CAP)
    catch_up: datetime | None  # the one fire among `fires` that stands for the missed ones (run_once)
    next_fire_at: datetime  # the first fire strictly after `now`


def plan_fires(
    cron: str,
    tz: str,
    next_fire_at: datetime,
    now: datetime,
    policy: MissedFirePolicy | str,
    *,
    grace: timedelta = DEFAULT_GRACE,
) -> FirePlan:
    """Which fires are due at `now`, given the schedule's stored next_fire_at.

    A due fire (next_fire_at <= fire <= now) at most `grace` old is on time and always runs: a scheduler
    that ticks every few seconds sees every fire on time. Older due fires were missed (no scheduler ran):
    `skip` drops them; `run_once` runs exactly one catch-up, labelled with the latest missed fire time, however
    many were missed. The work is bounded, so a year of downtime on a once-a-minute schedule costs no
    more than a short one.
    """
    policy = _policy(policy)
    next_fire_at, now = _aware(next_fire_at, "next_fire_at"), _aware(now, "now")
    if grace < timedelta(0):
        raise ScheduleError("grace must not be negative")
    late_limit = now - grace  # fires strictly before this were missed
    on_time = next_fire_times(cron, tz, max(next_fire_at, late_limit) - EPSILON, now)
    missed: list[datetime] = []
    if next_fire_at < late_limit:
        missed = next_fire_times(
            cron, tz, next_fire_at - EPSILON, late_limit - EPSILON, limit=MISSED_COUNT_CAP
        )
    catch_up = None
    if missed and policy is MissedFirePolicy.RUN_ONCE:
        catch_up = _last_fire_before(cron, tz, late_limit, not_before=next_fire_at)
    fires = ([catch_up] if catch_up else []) + on_time
    return FirePlan(
        fires=fires, missed=len(missed), catch_up=catch_up, next_fire_at=next_fire_after(cron, tz, now)
    )


def _last_fire_before(cron: str, tz: str, moment: datetime, *, not_before: datetime) -> datetime:
    """The latest fire f with not_before <= f < moment, found backwards from `moment` (no long scan).

    croniter's get_prev knows nothing of the fall-back rule in `iter_fire_times`, so its answer is
    re-derived by scanning forwards over the few hours before it.
    """
    expr, zone = parse_cron(cron), parse_tz(tz)
    rough: datetime = croniter(expr, (moment - EPSILON).astimezone(zone)).get_prev(datetime).astimezone(UTC)
    window = max(not_before, rough - timedelta(hours=3)) - EPSILON
    return next_fire_times(cron, tz, window, moment - EPSILON)[-1]


def _policy(policy: MissedFirePolicy | str) -> MissedFirePolicy:
    try:
        return MissedFirePolicy(policy)
    except ValueError as e:
        choices = ", ".join(p.value for p in MissedFirePolicy)
        raise ScheduleError(f"missed-fire policy {policy!r} is unknown; choose one of: {choices}") from e


def schedule_labels(schedule_id: str, fire_time: datetime) -> dict[str, str]:
    """Labels every job created by a schedule fire carries, so its jobs can be listed per fire."""
    return {
        "schedule.id": schedule_id,
        "schedule.fire-time": fire_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --- matrices ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixJob:
    """One cell of an expanded matrix: the job request body and the axis values that made it."""

    body: dict[str, Any]
    cell: dict[str, Any]


def validate_matrix(
    matrix: Mapping[str, Any] | None, *, max_jobs: int = MAX_MATRIX_JOBS
) -> dict[str, list[Any]]:
    """The matrix with each axis as a list; ScheduleError for unknown or empty axes, repeats, or too many jobs."""
    if matrix is None:
        return {}
    if not isinstance(matrix, Mapping):
        raise ScheduleError(
            "matrix must be an object mapping axes (model, method, bits, group_size) to lists"
        )
    axes: dict[str, list[Any]] = {}
    for axis, values in matrix.items():
        if axis not in MATRIX_AXES:
            raise ScheduleError(
                f"matrix axis {axis!r} is not supported; use any of: {', '.join(MATRIX_AXES)}"
            )
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise ScheduleError(f"matrix axis {axis!r} must be a list of values, e.g. {axis}: [...]")
        if not values:
            raise ScheduleError(f"matrix axis {axis!r} is empty; give at least one value or drop the axis")
        seen: list[Any] = []
        for value in values:
            if value in seen:
                raise ScheduleError(f"matrix axis {axis!r} lists {value!r} twice; list each value once")
            seen.append(value)
        axes[axis] = list(values)
    if not axes:
        raise ScheduleError("matrix has no axes; give at least one of: " + ", ".join(MATRIX_AXES))
    total = 1
    for values in axes.values():
        total *= len(values)
    if total > max_jobs:
        sizes = " × ".join(f"{len(v)} {a}" for a, v in axes.items())
        raise ScheduleError(
            f"matrix expands to {total} jobs ({sizes}); the limit is {max_jobs}: split it into smaller matrices"
        )
    return axes


def expand_matrix(
    template: Mapping[str, Any],
    matrix: Mapping[str, Any] | None,
    *,
    extra_labels: Mapping[str, str] | None = None,
    max_jobs: int = MAX_MATRIX_JOBS,
) -> list[MatrixJob]:
    """Job request bodies for every combination of the matrix axes over `template` (one body if no matrix).

    Each body carries the template's labels, `extra_labels` (schedule or batch ids) and one
    `matrix.<axis>` label per axis, so the jobs of a matrix can be listed and compared by cell. An axis may
    not also be set in the template: which value would win is exactly the kind of surprise to refuse.
    """
    if not isinstance(template, Mapping):
        raise ScheduleError(
            "job template must be an object with the fields of a job request (model, method, ...)"
        )
    axes = validate_matrix(matrix, max_jobs=max_jobs) if matrix is not None else {}
    both = [axis for axis in axes if axis in template]
    if both:
        raise ScheduleError(
            f"{', '.join(both)} given both in the job template and as a matrix axis; keep only one of them"
        )
    missing = [key for key in ("model", "method") if key not in template and key not in axes]
    if missing:
        raise ScheduleError(
            f"job template needs {' and '.join(missing)} (in the template or as a matrix axis)"
        )
    names = list(axes)
    jobs: list[MatrixJob] = []
    for values in itertools.product(*(axes[n] for n in names)):
        cell = dict(zip(names, values, strict=True))
        labels = {**dict(template.get("labels") or {}), **dict(extra_labels or {})}
        labels.update({f"matrix.{axis}": _label_value(axis, value) for axis, value in cell.items()})
        if len(labels) > MAX_LABELS:
            raise ScheduleError(
                f"a matrix job would carry {len(labels)} labels (the limit is {MAX_LABELS}); drop some template labels"
            )
        jobs.append(MatrixJob(body={**dict(template), **cell, "labels": labels}, cell=cell))
    return jobs


def _label_value(axis: str, value: Any) -> str:
    """Label text for one axis value: a model URI is shortened to its last path segment."""
    if axis == "model" and isinstance(value, str):
        name = PurePosixPath(value.rstrip("/")).name or value
        return name[:255]
    return str(value)[:255]
