"""Cron fire times in time zones (DST included), the missed-fire policies, and matrix expansion."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.fleet.schedules import (
    MISSED_COUNT_CAP,
    MissedFirePolicy,
    ScheduleError,
    expand_matrix,
    next_fire_after,
    next_fire_times,
    parse_cron,
    plan_fires,
    schedule_labels,
)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --- fire times -----------------------------------------------------------------------------------------


def test_fire_times_exclude_after_and_include_until() -> None:
    fires = next_fire_times("* * * * *", "UTC", utc(2026, 1, 1, 10, 0), utc(2026, 1, 1, 10, 3))
    assert fires == [utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 10, 2), utc(2026, 1, 1, 10, 3)]
    assert all(f.tzinfo is UTC for f in fires)


def test_cron_is_read_in_the_schedule_time_zone() -> None:
    winter = next_fire_after("0 2 * * *", "Europe/Berlin", utc(2026, 1, 10, 12, 0))
    summer = next_fire_after("0 2 * * *", "Europe/Berlin", utc(2026, 7, 10, 12, 0))
    new_york = next_fire_after("0 2 * * *", "America/New_York", utc(2026, 1, 10, 12, 0))
    assert winter == utc(2026, 1, 11, 1, 0)  # CET = UTC+1
    assert summer == utc(2026, 7, 11, 0, 0)  # CEST = UTC+2
    assert new_york == utc(2026, 1, 11, 7, 0)  # EST = UTC-5


def test_spring_forward_runs_a_skipped_fixed_time_right_after_the_jump() -> None:
    # 2026-03-29 in Berlin: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist that day.
    fires = next_fire_times("30 2 * * *", "Europe/Berlin", utc(2026, 3, 27, 12), utc(2026, 3, 30, 12))
    assert fires == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]


def test_fall_back_runs_a_fixed_time_once_but_wildcard_hours_in_both_hours() -> None:
    # 2026-10-25 in Berlin: 03:00 CEST falls back to 02:00 CET, so 02:00-02:59 happens twice.
    nightly = next_fire_times("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12), utc(2026, 10, 26, 12))
    assert nightly == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    half_hourly = next_fire_times(
        "*/30 * * * *", "Europe/Berlin", utc(2026, 10, 24, 23, 45), utc(2026, 10, 25, 1, 45)
    )
    assert half_hourly == [
        utc(2026, 10, 25, 0, 0),
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 25, 1, 0),
        utc(2026, 10, 25, 1, 30),
    ]


def test_macros_expand_and_whitespace_is_normalised() -> None:
    assert parse_cron("@daily") == "0 0 * * *"
    assert parse_cron("  0   2 * *  1-5 ") == "0 2 * * 1-5"
    assert next_fire_after("@hourly", "UTC", utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 11, 0)


@pytest.mark.parametrize(
    ("cron", "words"),
    [
        ("", "non-empty"),
        ("* * * *", "has 4 fields"),
        ("0 * * * * *", "has 6 fields"),
        ("61 * * * *", "not a valid expression"),
        ("0 25 * * *", "not a valid expression"),
        ("every day", "has 2 fields"),
    ],
)
def test_bad_cron_says_what_to_fix(cron: str, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        next_fire_after(cron, "UTC", utc(2026, 1, 1))


def test_unknown_time_zone_and_naive_datetimes_are_refused() -> None:
    with pytest.raises(ScheduleError, match="unknown time zone 'Mars/Olympus'"):
        next_fire_after("* * * * *", "Mars/Olympus", utc(2026, 1, 1))
    with pytest.raises(ScheduleError, match="IANA"):
        next_fire_after("* * * * *", "", utc(2026, 1, 1))
    with pytest.raises(ScheduleError, match="time-zone-aware"):
        next_fire_after("* * * * *", "UTC", datetime(2026, 1, 1))


# --- missed fires ---------------------------------------------------------------------------------------

GRACE = timedelta(seconds=30)


def test_a_fire_seen_within_grace_runs_and_the_next_one_is_computed() -> None:
    plan = plan_fires(
        "* * * * *", "UTC", utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 10, 1, 5), "skip", grace=GRACE
    )
    assert plan.fires == [utc(2026, 1, 1, 10, 1)]
    assert (plan.missed, plan.catch_up, plan.next_fire_at) == (0, None, utc(2026, 1, 1, 10, 2))


def test_nothing_is_due_before_next_fire_at() -> None:
    plan = plan_fires(
        "* * * * *", "UTC", utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 10, 0, 59), "run_once", grace=GRACE
    )
    assert plan.fires == [] and plan.next_fire_at == utc(2026, 1, 1, 10, 1)


def test_a_fire_exactly_grace_old_is_still_on_time() -> None:
    plan = plan_fires(
        "* * * * *", "UTC", utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 10, 1, 30), "skip", grace=GRACE
    )
    assert plan.fires == [utc(2026, 1, 1, 10, 1)] and plan.missed == 0


def test_downtime_over_two_fires_skip_runs_nothing_run_once_runs_one_catch_up() -> None:
    # The last tick handled 10:00; schedulers were down until 10:02:40, past 10:01 and 10:02 (+ grace).
    args = ("* * * * *", "UTC", utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 10, 2, 40))
    skip = plan_fires(*args, MissedFirePolicy.SKIP, grace=GRACE)
    once = plan_fires(*args, MissedFirePolicy.RUN_ONCE, grace=GRACE)
    assert (skip.fires, skip.missed, skip.next_fire_at) == ([], 2, utc(2026, 1, 1, 10, 3))
    assert once.fires == [utc(2026, 1, 1, 10, 2)]  # one catch-up, labelled with the latest missed fire
    assert (once.catch_up, once.missed, once.next_fire_at) == (
        utc(2026, 1, 1, 10, 2),
        2,
        utc(2026, 1, 1, 10, 3),
    )


def test_catch_up_comes_before_an_on_time_fire() -> None:
    args = ("* * * * *", "UTC", utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 10, 3, 10))
    assert plan_fires(*args, "skip", grace=GRACE).fires == [utc(2026, 1, 1, 10, 3)]
    assert plan_fires(*args, "run_once", grace=GRACE).fires == [
        utc(2026, 1, 1, 10, 2),
        utc(2026, 1, 1, 10, 3),
    ]


def test_a_year_of_downtime_is_one_cheap_catch_up() -> None:
    started = time.perf_counter()
    plan = plan_fires(
        "* * * * *", "UTC", utc(2025, 1, 1, 0, 1), utc(2026, 1, 1, 0, 0, 45), "run_once", grace=GRACE
    )
    assert time.perf_counter() - started < 2.0
    assert plan.fires == [utc(2026, 1, 1, 0, 0)] and plan.missed == MISSED_COUNT_CAP
    assert plan.next_fire_at == utc(2026, 1, 1, 0, 1)


def test_nightly_catch_up_after_two_missed_nights_in_local_time() -> None:
    # Nightly at 02:00 Berlin; down from Jan 9 to Jan 11 midday: the nights of the 10th and 11th were missed.
    plan = plan_fires("0 2 * * *", "Europe/Berlin", utc(2026, 1, 10, 1), utc(2026, 1, 11, 11), "run_once")
    assert plan.fires == [utc(2026, 1, 11, 1)] and plan.missed == 2
    assert plan.next_fire_at == utc(2026, 1, 12, 1)


def test_ticking_scheduler_fires_every_occurrence_exactly_once() -> None:
    next_fire_at = next_fire_after("*/2 * * * *", "UTC", utc(2026, 1, 1, 9, 59, 59))
    fired: list[datetime] = []
    for tick in range(0, 10 * 60, 7):  # a tick every 7 s for 10 minutes
        plan = plan_fires(
            "*/2 * * * *", "UTC", next_fire_at, utc(2026, 1, 1, 10) + timedelta(seconds=tick), "run_once"
        )
        fired += plan.fires
        next_fire_at = plan.next_fire_at
    assert fired == [utc(2026, 1, 1, 10, m) for m in (0, 2, 4, 6, 8)]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ScheduleError, match="choose one of: skip, run_once"):
        plan_fires("* * * * *", "UTC", utc(2026, 1, 1), utc(2026, 1, 1), "catch_up_all")


def test_schedule_labels_name_the_schedule_and_fire_time_in_utc() -> None:
    assert schedule_labels("sch_1", utc(2026, 1, 1, 2, 0)) == {
        "schedule.id": "sch_1",
        "schedule.fire-time": "2026-01-01T02:00:00Z",
    }


# --- matrices -------------------------------------------------------------------------------------------

TEMPLATE = {
    "calibration": {"uri": "/data/cal.txt", "num_samples": 16, "seq_len": 64},
    "symmetric": True,
    "labels": {"team": "nlp"},
}


def test_matrix_expands_to_every_combination_with_labels() -> None:
    matrix = {
        "model": ["/models/a/SmolLM2-135M", "s3://bucket/models/tiny-llama/"],
        "method": ["gptq", "awq"],
        "bits": [4, 8],
        "group_size": [32, 64],
    }
    jobs = expand_matrix(TEMPLATE, matrix, extra_labels={"batch.id": "b1"})
    assert len(jobs) == 16
    cells = {(j.body["model"], j.body["method"], j.body["bits"], j.body["group_size"]) for j in jobs}
    assert len(cells) == 16
    first = jobs[0].body
    assert first["calibration"] == TEMPLATE["calibration"] and first["symmetric"] is True
    assert first["labels"] == {
        "team": "nlp",
        "batch.id": "b1",
        "matrix.model": "SmolLM2-135M",
        "matrix.method": "gptq",
        "matrix.bits": "4",
        "matrix.group_size": "32",
    }
    assert jobs[-1].body["labels"]["matrix.model"] == "tiny-llama"
    assert jobs[-1].cell == {
        "model": "s3://bucket/models/tiny-llama/",
        "method": "awq",
        "bits": 8,
        "group_size": 64,
    }
    assert TEMPLATE["labels"] == {"team": "nlp"}  # the template is not modified


def test_no_matrix_is_one_job() -> None:
    jobs = expand_matrix({**TEMPLATE, "model": "/m", "method": "rtn"}, None)
    assert [j.body["method"] for j in jobs] == ["rtn"] and jobs[0].cell == {}


@pytest.mark.parametrize(
    ("template", "matrix", "words"),
    [
        ({"model": "/m"}, {"method": []}, "axis 'method' is empty"),
        ({"model": "/m"}, {"method": ["gptq"], "dampening": [0.1]}, "axis 'dampening' is not supported"),
        ({"model": "/m"}, {"method": ["gptq", "gptq"]}, "lists 'gptq' twice"),
        ({"model": "/m"}, {"method": "gptq"}, "must be a list"),
        ({"model": "/m", "method": "gptq"}, {}, "matrix has no axes"),
        ({"model": "/m", "method": "gptq"}, {"method": ["awq"]}, "method given both in the job template"),
        ({"method": "gptq"}, {"bits": [4]}, "needs model"),
        (
            {"model": "/m", "method": "gptq", "labels": {f"k{i}": "v" for i in range(32)}},
            {"bits": [4]},
            "33 labels",
        ),
    ],
)
def test_bad_matrix_says_what_to_fix(template: dict, matrix: dict, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        expand_matrix(template, matrix)


def test_too_big_a_matrix_is_refused_with_its_size() -> None:
    matrix = {
        "model": [f"/m{i}" for i in range(5)],
        "method": ["gptq", "awq", "rtn"],
        "bits": [2, 3, 4, 8],
        "group_size": [32, 64],
    }
    with pytest.raises(
        ScheduleError,
        match=r"expands to 120 jobs \(5 model × 3 method × 4 bits × 2 group_size\); "
        r"the limit is 64",
    ):
        expand_matrix({}, matrix)
    assert len(expand_matrix({}, matrix, max_jobs=120)) == 120
