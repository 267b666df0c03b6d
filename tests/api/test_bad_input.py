"""Bad input never reaches the database as a 5xx: NUL bytes, lone surrogates, oversize integers, a cursor
without a time zone, a cron that never fires and overlong paths each get a JSON 4xx naming the field."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

HUGE = 2**70
BODY: dict[str, Any] = {}  # filled per test from the job_body fixture


def _cursor(created_at: str) -> str:
    raw = json.dumps([created_at, "0" * 32]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _raw_json(text: str) -> dict[str, Any]:
    """A request carrying `text` as raw JSON (for escapes like a lone surrogate \\ud800)."""
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


def _job(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def make(base: dict[str, Any]) -> dict[str, Any]:
        body = json.loads(json.dumps(base))
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            target = body
            for p in parents:
                target = target.setdefault(p, {})
            target[leaf] = value
        return {"json": body}

    return make


def _surrogate_job(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def make(base: dict[str, Any]) -> dict[str, Any]:
        body = dict(base)
        placeholder = "SURROGATE-HERE"
        if field == "labels":
            body["labels"] = {"team": placeholder}
        else:
            body[field] = placeholder
        return _raw_json(json.dumps(body).replace(placeholder, "\\ud800"))

    return make


def _fixed(**kwargs: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda base: dict(kwargs)


SCHEDULE = {"name": "nightly", "cron": "0 2 * * *", "template": {}, "matrix": None}
LONG = "/" + "x" * 300

# (id, method, url, request builder, words the answer must contain: the field it names)
CASES: list[tuple[str, str, str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    ("NUL in label value", "POST", "/v1/jobs", _job(labels={"team": "a\x00b"}), "labels"),
    ("NUL in label key", "POST", "/v1/jobs", _job(labels={"te\x00am": "x"}), "labels"),
    ("NUL in model", "POST", "/v1/jobs", _job(model="/models/x\x00y"), "model"),
    ("NUL in calibration uri", "POST", "/v1/jobs", _job(calibration__uri="/d/c\x00.txt"), "calibration.uri"),
    ("NUL in eval uri", "POST", "/v1/jobs", _job(eval__uri="/d/e\x00.txt"), "eval.uri"),
    ("NUL in output uri", "POST", "/v1/jobs", _job(output={"uri": "/o/x\x00"}), "output.uri"),
    ("NUL in base_model", "POST", "/v1/jobs", _job(base_model="tiny\x00"), "base_model"),
    ("lone surrogate in label", "POST", "/v1/jobs", _surrogate_job("labels"), "labels"),
    ("lone surrogate in model", "POST", "/v1/jobs", _surrogate_job("model"), "model"),
    ("lone surrogate in base_model", "POST", "/v1/jobs", _surrogate_job("base_model"), "base_model"),
    ("model path over 255", "POST", "/v1/jobs", _job(model=LONG), "model"),
    ("calibration path over 255", "POST", "/v1/jobs", _job(calibration__uri=LONG), "calibration"),
    ("eval path over 255", "POST", "/v1/jobs", _job(eval__uri="/" + "e" * 4096), "eval"),
    ("huge seed", "POST", "/v1/jobs", _job(calibration__seed=HUGE), "seed"),
    ("huge max_windows", "POST", "/v1/jobs", _job(eval__max_windows=HUGE), "max_windows"),
    ("huge num_samples", "POST", "/v1/jobs", _job(calibration__num_samples=HUGE), "num_samples"),
    ("huge bits", "POST", "/v1/jobs", _job(bits=HUGE), "bits"),
    ("NUL in batch name", "POST", "/v1/batches", _fixed(json={"name": "n\x00", "template": {}}), "name"),
    ("NUL in batch template", "POST", "/v1/batches", _fixed(json={"template": {"model": "/m\x00"}}), "model"),
    ("NUL in schedule name", "POST", "/v1/schedules", _fixed(json={**SCHEDULE, "name": "n\x00"}), "name"),
    ("NUL in schedule tz", "POST", "/v1/schedules", _fixed(json={**SCHEDULE, "tz": "UTC\x00"}), "tz"),
    ("cron never fires", "POST", "/v1/schedules", _fixed(json={**SCHEDULE, "cron": "0 0 31 2 *"}), "cron"),
    (
        "cron never fires (30 Feb)",
        "POST",
        "/v1/schedules",
        _fixed(json={**SCHEDULE, "cron": "0 0 30 2 *"}),
        "cron",
    ),
    ("NUL in webhook url", "POST", "/v1/webhooks", _fixed(json={"url": "https://93.184.215.14/\x00"}), "url"),
    (
        "NUL in webhook secret",
        "POST",
        "/v1/webhooks",
        _fixed(json={"url": "https://93.184.215.14/h", "secret": "s" * 20 + "\x00"}),
        "secret",
    ),
    (
        "lone surrogate in webhook secret",
        "POST",
        "/v1/webhooks",
        _fixed(**_raw_json('{"url": "https://93.184.215.14/h", "secret": "ssssssssssssssssssss\\udc80"}')),
        "secret",
    ),
    (
        "NUL in webhook event",
        "POST",
        "/v1/webhooks",
        _fixed(json={"url": "https://93.184.215.14/h", "events": ["job.\x00"]}),
        "events",
    ),
    ("NUL in job id", "GET", "/v1/jobs/ab%00cd", _fixed(), "job"),
    ("NUL in job id (events)", "GET", "/v1/jobs/%00/events", _fixed(), "job"),
    ("NUL in job id (cancel)", "POST", "/v1/jobs/%00/cancel", _fixed(), "job"),
    ("NUL in batch id", "GET", "/v1/batches/%00", _fixed(), "batch"),
    ("NUL in schedule id", "GET", "/v1/schedules/%00", _fixed(), "schedule"),
    ("NUL in schedule id (patch)", "PATCH", "/v1/schedules/%00", _fixed(json={"name": "x"}), "schedule"),
    ("NUL in webhook id", "GET", "/v1/webhooks/%00/deliveries", _fixed(), "webhook"),
    ("job id over 255", "GET", "/v1/jobs/" + "a" * 300, _fixed(), "job"),
    ("schedule id over 255", "GET", "/v1/schedules/" + "a" * 300, _fixed(), "schedule"),
    ("NUL in label filter", "GET", "/v1/jobs?label=team%3Dn%00", _fixed(), "label"),
    ("NUL in artifact model filter", "GET", "/v1/artifacts?model=m%00", _fixed(), "model"),
    ("huge group_size", "GET", f"/v1/artifacts?group_size={HUGE}", _fixed(), "group_size"),
    ("huge bits filter", "GET", f"/v1/artifacts?bits={-HUGE}", _fixed(), "bits"),
    (
        "cursor without time zone",
        "GET",
        f"/v1/jobs?cursor={_cursor('2026-01-01T00:00:00')}",
        _fixed(),
        "cursor",
    ),
    (
        "artifacts cursor without tz",
        "GET",
        f"/v1/artifacts?cursor={_cursor('2026-01-01T00:00:00')}",
        _fixed(),
        "cursor",
    ),
    (
        "cursor with NUL id",
        "GET",
        f"/v1/jobs?cursor={_cursor('2026-01-01T00:00:00+00:00')[:-2]}AA",
        _fixed(),
        "cursor",
    ),
    ("huge limit", "GET", f"/v1/jobs?limit={HUGE}", _fixed(), "limit"),
    (
        "NaN dampening",
        "POST",
        "/v1/jobs",
        lambda base: _raw_json(json.dumps({**base, "dampening": float("nan")})),
        "dampening",
    ),
    (
        "Infinity in a template",
        "POST",
        "/v1/batches",
        _fixed(**_raw_json('{"template": {"dampening": Infinity}}')),
        "template",
    ),
    (
        "huge int in a template",
        "POST",
        "/v1/batches",
        _fixed(json={"template": {"calibration": {"seed": HUGE}}}),
        "template",
    ),
    ("unknown field with NUL", "POST", "/v1/jobs", lambda base: {"json": {**base, "x\x00": 1}}, "x"),
    (
        "unknown field with lone surrogate",
        "POST",
        "/v1/jobs",
        _fixed(**_raw_json('{"model": "/m", "method": "rtn", "\\ud800": 1}')),
        "unicode",
    ),
    (
        "NUL in idempotency key",
        "POST",
        "/v1/jobs",
        lambda base: {"json": base, "headers": {"Idempotency-Key": "k\x00"}},
        "Idempotency-Key",
    ),
]


@pytest.fixture
def a_job(client: TestClient, keys: dict, job_body: dict) -> str:
    r = client.post("/v1/jobs", json=job_body, headers=keys["alice"])
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


EVENT_CASES = [
    ("huge after", {"params": {"after": HUGE}}, "after"),
    ("huge after, follow", {"params": {"after": HUGE, "follow": "true"}}, "after"),
    ("huge Last-Event-ID", {"headers": {"Last-Event-ID": str(HUGE)}}, "Last-Event-ID"),
    ("Last-Event-ID not a number", {"headers": {"Last-Event-ID": "x"}}, "Last-Event-ID"),
]


def _check(r: Any, words: str) -> None:
    assert r.status_code < 500, r.text
    assert r.status_code in (404, 422), r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    assert words.lower() in r.json()["detail"].lower(), r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "url", "build", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_json_4xx_naming_the_field(
    client: TestClient, keys: dict, job_body: dict, method: str, url: str, build: Any, words: str
) -> None:
    request = build(job_body)
    headers = {**keys["alice"], **request.pop("headers", {})}
    r = client.request(method, url, headers=headers, **request)
    _check(r, words)


@pytest.mark.parametrize(
    ("request_args", "words"), [c[1:] for c in EVENT_CASES], ids=[c[0] for c in EVENT_CASES]
)
def test_bad_event_positions_are_a_json_422(
    client: TestClient, keys: dict, a_job: str, request_args: dict[str, Any], words: str
) -> None:
    headers = {**keys["alice"], **request_args.get("headers", {})}
    r = client.get(f"/v1/jobs/{a_job}/events", params=request_args.get("params"), headers=headers)
    _check(r, words)


def test_an_overlong_path_under_an_allowed_root_is_a_422(
    client: TestClient, keys: dict, job_body: dict, allowed_root: Path
) -> None:
    long_name = str(allowed_root / ("m" * 300))
    r = client.post("/v1/jobs", json={**job_body, "model": long_name}, headers=keys["alice"])
    _check(r, "model")
