"""The FastAPI application factory."""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deps import KeyCache
from api.docs import add_docs
from api.event_stream import EventHub, StreamSlots
from api.openapi_errors import document_error_bodies
from api.routes import artifacts, batches, health, jobs, metrics, schedules, webhooks
from api.schemas import unstorable
from api.thread_slots import ThreadSlots
from orchestrator.db import make_engine, session_factory
from orchestrator.metrics import ServiceMetrics
from orchestrator.queue.submission import preload_model_checks
from orchestrator.settings import Settings

DESCRIPTION = """Batch LLM weight quantization (GPTQ, AWQ, RTN) as a service.

Submit a job with `POST /v1/jobs`, follow it with `GET /v1/jobs/{id}` (state, stage, layer i/N) or its
events, and find the checkpoint, `eval.json`, model card and `manifest.json` under its artifacts.
Authenticate with `Authorization: Bearer <API key>` (scopes: submit, read, admin).
"""


log = logging.getLogger("quantfleet.api")


def _printable(value: Any) -> Any:
    """`value` with any lone surrogate escaped, so that a message quoting bad input can be sent as JSON."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def _location(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return _printable(".".join(parts)) or "body"


async def storable_parameters(request: Request) -> None:
    """Every route's path and query parameters: no NUL characters (nor anything else a database cannot
    store or compare), a 422 naming the parameter rather than a database error."""
    problems = [
        {"loc": (where, name), "msg": problem, "type": "value_error"}
        for where, items in (
            ("path", list(request.path_params.items())),
            ("query", request.query_params.multi_items()),
        )
        for name, value in items
        if isinstance(value, str) and (problem := unstorable(value) or unstorable(name))
    ]
    if problems:
        raise RequestValidationError(problems)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """400 for a body that is not JSON at all; 422 naming each bad field otherwise."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    if any(e.get("type") == "json_invalid" for e in errors):
        bad = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (bad.get("ctx") or {}).get("error", "malformed JSON")
        return JSONResponse(
            {"detail": f"request body is not valid JSON ({reason}); send a JSON object"},
            status_code=status.HTTP_400_BAD_REQUEST,
        )
    messages = [f"{_location(tuple(e.get('loc', ())))}: {_printable(e.get('msg'))}" for e in errors]
    return JSONResponse(
        {
            "detail": "; ".join(messages) or "invalid request",
            "errors": [{k: _printable(e.get(k)) for k in ("loc", "msg", "type")} for e in errors],
        },
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own HTTPException answer, with a detail that quotes bad input made safe to encode."""
    assert isinstance(exc, StarletteHTTPException)
    exc.detail = _printable(exc.detail)
    return await http_exception_handler(request, exc)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A JSON 500 for anything no route handled. The log line names the request and the error; database
    errors in it carry no statement parameters (orchestrator.db hides them), so no secret reaches the log."""
    log.error("unhandled %s in %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {"detail": "internal error; the server log has the details"},
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
    )


RETRY_AFTER_SECONDS = 5
SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o", "disk is full")


def is_database_outage(exc: BaseException) -> bool:
    """The database cannot be reached or used right now (refused or lost connection, no free pooled
    connection, a server shutting down), as opposed to a statement that is wrong."""
    if isinstance(exc, PoolTimeout | InterfaceError):
        return True
    if isinstance(exc, OperationalError):
        if isinstance(exc.orig, sqlite3.Error):  # SQLite says "OperationalError" for a missing table too
            return any(words in str(exc.orig).lower() for words in SQLITE_UNAVAILABLE)
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """A JSON 503 with Retry-After while the database is unavailable; any other database error is a 500."""
    if not is_database_outage(exc):
        return await unexpected_error(request, exc)
    log.warning(
        "database unavailable in %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0]
    )
    return JSONResponse(
        {"detail": "the job database is unavailable; try again shortly"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    preload_model_checks()  # before serving: a server's first submit would import torch and transformers
    yield
    app.state.engine.dispose()  # close pooled database connections when the server stops


def create_app(settings: Settings | None = None, *, service_metrics: ServiceMetrics | None = None) -> FastAPI:
    """`service_metrics`: share one metrics registry with a dispatcher running in this process."""
    settings = settings or Settings()
    app = FastAPI(
        title="QuantFleet",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(storable_parameters)],
        docs_url=None,  # add_docs serves them with packaged assets instead of a CDN's
        redoc_url=None,
    )
    add_docs(app)
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url, pool_size=settings.db_pool_size)
    app.state.sessions = session_factory(app.state.engine)
    app.state.event_hub = EventHub(app.state.sessions)
    app.state.stream_slots = StreamSlots(settings.max_streams_per_key)
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.state.submit_slots = ThreadSlots(settings.submit_threads)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(PoolTimeout, database_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.state.metrics = metrics.watch_queue(service_metrics or ServiceMetrics(), app.state.sessions)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(batches.router)
    app.include_router(schedules.router)
    app.include_router(webhooks.router)
    app.include_router(artifacts.router)
    app.include_router(metrics.router)
    document_error_bodies(app)
    return app


@functools.cache
def _environment_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    """`uvicorn api.main:app` (the container images): the app built from the QF_* environment, on first
    use, so importing this module (tests, `create_app` callers) opens no database."""
    if name == "app":
        return _environment_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
