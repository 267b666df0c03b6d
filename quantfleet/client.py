"""A small client of the QuantFleet REST API, used by the `quantfleet` CLI (jobs, schedules, batches,
webhooks, artifacts) and usable from scripts.

Where to connect and as whom: QF_API_URL and QF_API_KEY from the environment, else `url` and `api_key`
in ~/.config/quantfleet/config.toml (or $XDG_CONFIG_HOME/quantfleet/config.toml):

    url = "https://quantfleet.internal"
    api_key = "qf_0123abcd_..."

Live progress comes from `GET /v1/jobs/{id}/events?follow=true` (Server-Sent Events). `follow_events`
reconnects after a dropped connection from the last event id it saw, so a flaky network neither loses
nor repeats events, and stops at the job's terminal state.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(RuntimeError):
    """The API refused a request (or could not be reached); `detail` is the server's explanation."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str | None
    source: str  # where the settings came from, for error messages


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "quantfleet" / "config.toml"


def load_config(environ: Mapping[str, str] = os.environ, path: Path | None = None) -> ClientConfig:
    """Environment first (QF_API_URL, QF_API_KEY), then the config file, then the loopback default."""
    path = path or config_path(environ)
    file_values: dict[str, Any] = {}
    if path.is_file():
        try:
            file_values = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ApiError(
                None, f'{path} is not valid TOML ({e}); expected url = "..." and api_key = "..."'
            ) from e
        unknown = sorted(set(file_values) - {"url", "api_key"})
        if unknown:
            raise ApiError(
                None, f"{path}: unknown setting(s) {', '.join(unknown)}; only url and api_key are read"
            )
    url = environ.get("QF_API_URL") or file_values.get("url") or DEFAULT_URL
    key = environ.get("QF_API_KEY") or file_values.get("api_key")
    source = (
        "environment"
        if environ.get("QF_API_URL") or environ.get("QF_API_KEY")
        else (str(path) if file_values else "defaults")
    )
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ApiError(None, f"API URL {url!r} (from {source}) must start with http:// or https://")
    if key is not None and not isinstance(key, str):
        raise ApiError(None, f"api_key in {path} must be a string")
    return ClientConfig(url.rstrip("/"), key or None, source)


@dataclass(frozen=True)
class StreamEvent:
    """One Server-Sent Event: `event` is state, progress, attempt, or end (the job reached a terminal state)."""

    id: int | None
    event: str
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[StreamEvent]:
    """Events of a text/event-stream, per the HTML spec's rules (comments and unknown fields ignored)."""
    event_id: int | None = None
    name = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield StreamEvent(event_id, name, json.loads("\n".join(data)))
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue  # keep-alive comment
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
        elif field == "id" and value.isdigit():
            event_id = int(value)


class QuantFleetClient:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        config: ClientConfig | None = None,
    ) -> None:
        config = config or (
            load_config() if url is None else ClientConfig(url.rstrip("/"), api_key, "arguments")
        )
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = httpx.Client(base_url=config.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> QuantFleetClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(
                None,
                f"cannot reach the QuantFleet API at {self.config.url} ({e}); "
                "set QF_API_URL or url in the config file",
            ) from e
        if response.is_success:
            return response.json() if response.content else None
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise ApiError(response.status_code, str(detail))

    # --- jobs -------------------------------------------------------------------------------------------

    def submit_job(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._request("POST", "/v1/jobs", json=dict(body), headers=headers))

    def list_jobs(
        self,
        *,
        states: list[str] | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        params: list[tuple[str, str | int]] = [("limit", limit)]
        params += [("state", s) for s in states or []]
        params += [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        if cursor:
            params.append(("cursor", cursor))
        return dict(self._request("GET", "/v1/jobs", params=params))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def job_events(self, job_id: str, *, after: int = 0) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after}))

    def job_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/v1/jobs/{job_id}/artifacts"))

    def follow_events(self, job_id: str, *, after: int = 0, reconnects: int = 5) -> Iterator[StreamEvent]:
        """Stream the job's events until its terminal state (the last event yielded is `end`)."""
        last = after
        failures = 0
        while True:
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    params={"follow": "true", "after": last},
                    headers={"Accept": "text/event-stream"},
                    timeout=httpx.Timeout(30.0, read=None),
                ) as response:
                    if not response.is_success:
                        response.read()
                        try:
                            detail = response.json().get("detail", response.text)
                        except ValueError:
                            detail = response.text
                        raise ApiError(response.status_code, str(detail))
                    for event in parse_sse(response.iter_lines()):
                        if event.event == "error":  # the server could not go on (database): resume later
                            break
                        failures = 0
                        if event.id is not None:
                            last = event.id
                        yield event
                        if event.event == "end":
                            return
            except httpx.HTTPError as e:
                failures += 1
                if failures > reconnects:
                    raise ApiError(
                        None, f"lost the event stream of job {job_id} {failures} times ({e})"
                    ) from e
                time.sleep(min(2.0**failures / 4, 5.0))
                continue
            # The server closed the stream without an `end` (restart, proxy timeout, an `error` event):
            # resume after `last`.
            failures += 1
            if failures > reconnects:
                raise ApiError(None, f"the event stream of job {job_id} keeps closing before the job ends")
            time.sleep(min(2.0**failures / 8, 5.0))

    # --- schedules, batches, webhooks, artifacts ---------------------------------------------------------

    def create_schedule(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/schedules", json=dict(body)))

    def list_schedules(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/schedules")["schedules"])

    def get_schedule(self, schedule_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/schedules/{schedule_id}"))

    def update_schedule(self, schedule_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._request("PATCH", f"/v1/schedules/{schedule_id}", json=dict(changes)))

    def delete_schedule(self, schedule_id: str) -> None:
        self._request("DELETE", f"/v1/schedules/{schedule_id}")

    def pause_schedule(self, schedule_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/schedules/{schedule_id}/pause"))

    def resume_schedule(self, schedule_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/schedules/{schedule_id}/resume"))

    def create_batch(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/batches", json=dict(body)))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/batches/{batch_id}"))

    def list_batches(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/batches")["batches"])

    def create_webhook(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/webhooks", json=dict(body)))

    def list_webhooks(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/webhooks")["webhooks"])

    def delete_webhook(self, webhook_id: str) -> None:
        self._request("DELETE", f"/v1/webhooks/{webhook_id}")

    def webhook_deliveries(self, webhook_id: str) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/v1/webhooks/{webhook_id}/deliveries")["deliveries"])

    def list_artifacts(self, **filters: str | int) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return list(self._request("GET", "/v1/artifacts", params=params)["artifacts"])
