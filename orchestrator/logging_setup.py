"""Structured logs: one JSON object per line, with job_id and attempt when the caller passes them.

    log.info("attempt started", extra={"job_id": job.id, "attempt": job.attempts})
    → {"ts": "2026-01-01T02:00:00.123Z", "level": "INFO", "logger": "quantfleet.dispatcher",
       "msg": "attempt started", "job_id": "job_42", "attempt": 1}

Log shippers (Loki, CloudWatch, Elasticsearch) index these fields, so "everything about job_42" is one
query. `configure_json_logging` is called by the process entry points (the CLI), never on import.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import IO, Any

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
FIRST_FIELDS = ("job_id", "attempt")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        for key in FIRST_FIELDS:
            if key in extras:
                entry[key] = extras.pop(key)
        entry.update(extras)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_json_logging(level: int | str = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to `stream` (stderr) as JSON lines; replaces the root logger's handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class JobLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to one attempt of one job: every record carries its job_id and attempt."""

    def __init__(self, logger: logging.Logger, job_id: str, attempt: int) -> None:
        super().__init__(logger, {"job_id": job_id, "attempt": attempt})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        given: Mapping[str, Any] = kwargs.get("extra") or {}
        kwargs["extra"] = {**(self.extra or {}), **given}
        return msg, kwargs
