"""`quantfleet` command line: serve, dispatcher, scheduler, keys, migrate, quantize (the engine's local CLI),
and the REST client commands of quantfleet/cli_fleet.py (submit, jobs, schedules, batches, webhooks, artifacts).

Settings come from QF_* environment variables (orchestrator/settings.py); flags here override them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from orchestrator.settings import Settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("executor", "concurrency", "database_url"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "no_auth", False):
        overrides["no_auth"] = True
    return Settings(**overrides)


def _settings_environment(settings: Settings) -> dict[str, str]:
    """The QF_* variables that give a process started from this environment the flags' settings."""
    environment = {
        "QF_DATABASE_URL": settings.database_url,
        "QF_EXECUTOR": settings.executor,
        "QF_NO_AUTH": "true" if settings.no_auth else "false",
    }
    if settings.concurrency is not None:
        environment["QF_CONCURRENCY"] = str(settings.concurrency)
    return environment


def cmd_migrate(args: argparse.Namespace) -> int:
    from orchestrator.db import migrate

    settings = _settings(args)
    migrate(settings.database_url)
    print(f"database is at the newest migration ({settings.database_url.split('@')[-1]})")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from orchestrator.auth import create_api_key, parse_scopes, revoke_api_key
    from orchestrator.db import make_engine, session_factory, transaction

    sessions = session_factory(make_engine(_settings(args).database_url))
    if args.keys_command == "create":
        try:
            scopes = parse_scopes(args.scopes)
            with transaction(sessions) as s:
                token = create_api_key(s, owner=args.owner, scopes=scopes)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(token)
        print(
            f"API key for {args.owner} with scopes {','.join(scopes)}; it is shown only once.",
            file=sys.stderr,
        )
        return 0
    with transaction(sessions) as s:
        found = revoke_api_key(s, args.key_id)
    print("revoked" if found else f"no API key with id {args.key_id}", file=sys.stderr)
    return 0 if found else 1


def _dispatcher(settings: Settings, name: str | None = None, metrics: Any = None) -> Any:
    from orchestrator.db import make_engine, session_factory
    from orchestrator.dispatcher import Dispatcher
    from orchestrator.executors import build_executor

    return Dispatcher(
        session_factory(make_engine(settings.database_url)),
        build_executor(settings),
        settings,
        name=name,
        metrics=metrics,
    )


def cmd_dispatcher(args: argparse.Namespace) -> int:
    import threading

    from orchestrator.metrics import ServiceMetrics
    from quantfleet.cli_fleet import start_background, stop_background

    settings = _settings(args)
    metrics = ServiceMetrics()
    dispatcher = _dispatcher(settings, args.name, metrics)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, registry=metrics.registry)
    background = start_background(settings, scheduler=False, deliveries=True)  # webhooks, MLflow
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"dispatcher {dispatcher.name} ready (capacity {dispatcher.executor.capacity})", flush=True)
    dispatcher.run(stop)
    stop_background(background)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app
    from orchestrator.db import migrate
    from orchestrator.dispatcher import start_in_thread

    if args.no_auth and not is_loopback(args.host):
        print(
            f"error: --no-auth is only allowed on a loopback address, not {args.host}; "
            "create API keys with `quantfleet keys create` instead",
            file=sys.stderr,
        )
        return 2
    settings = _settings(args)
    if not args.skip_migrate:
        migrate(settings.database_url)
    from orchestrator.metrics import ServiceMetrics
    from quantfleet.cli_fleet import start_background, stop_background

    metrics = ServiceMetrics()  # one registry: the API's /metrics shows the dispatcher's numbers too
    worker = None
    if not args.no_dispatcher:
        worker = start_in_thread(_dispatcher(settings, metrics=metrics))
    background = start_background(
        settings, scheduler=not args.no_scheduler, deliveries=not args.no_dispatcher
    )
    try:
        if args.workers > 1:
            # Worker processes build the app from the environment (api.main:app): pass this command's flags
            # on there. Each process has its own /metrics; the dispatcher's numbers are not among them.
            os.environ.update(_settings_environment(settings))
            uvicorn.run("api.main:app", host=args.host, port=args.port, workers=args.workers, log_level="info")
        else:
            uvicorn.run(
                create_app(settings, service_metrics=metrics), host=args.host, port=args.port, log_level="info"
            )
    finally:
        stop_background(background)
        if worker is not None:
            thread, stop = worker
            stop.set()
            thread.join(timeout=30)
    return 0


def cmd_quantize(argv: Sequence[str]) -> int:
    from workers.cli import quantize_command  # type: ignore[import-not-found,unused-ignore]

    return int(quantize_command(list(argv)) or 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantfleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add_common(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--database-url", help="override QF_DATABASE_URL")

    serve = sub.add_parser("serve", help="run the API and a dispatcher")
    add_common(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--no-auth", action="store_true", help="no API keys; refused unless --host is loopback"
    )
    serve.add_argument("--executor", choices=["ray", "thread"])
    serve.add_argument("--concurrency", type=int, help="attempts the dispatcher runs at once")
    serve.add_argument("--no-dispatcher", action="store_true", help="API only (run dispatchers separately)")
    serve.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="API processes (default 1). One process runs Python on one core at a time: with more cores than "
        "the database needs, 2 or more answer more submits; the dispatcher and scheduler stay in this process",
    )
    serve.add_argument("--skip-migrate", action="store_true", help="do not upgrade the database on start")
    serve.add_argument("--no-scheduler", action="store_true", help="do not fire schedules in this process")
    serve.set_defaults(func=cmd_serve)

    disp = sub.add_parser("dispatcher", help="run a dispatcher only (any number may share one database)")
    add_common(disp)
    disp.add_argument("--executor", choices=["ray", "thread"])
    disp.add_argument("--concurrency", type=int)
    disp.add_argument("--name", help="lease owner name (default host:pid:random)")
    disp.set_defaults(func=cmd_dispatcher)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print its token once")
    add_common(create)
    create.add_argument("--owner", required=True, help="whose jobs the key submits and sees")
    create.add_argument("--scopes", default="submit,read", help="comma-separated: submit, read, admin")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (the part after qf_)")
    add_common(revoke)
    revoke.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)

    mig = sub.add_parser("migrate", help="create or upgrade the database schema")
    add_common(mig)
    mig.set_defaults(func=cmd_migrate)

    sub.add_parser("quantize", help="quantize a model locally, without the service (see quantize --help)")

    from quantfleet.cli_fleet import add_fleet_commands

    add_fleet_commands(sub)  # scheduler, and the REST client commands: submit, jobs, schedules, batches, ...
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "quantize":  # the engine's CLI owns every flag after the subcommand
        return cmd_quantize(argv[1:])
    if os.environ.get("QF_LOG_FORMAT") == "json":  # structured logs with job ids, for log shippers
        from orchestrator.logging_setup import configure_json_logging

        configure_json_logging(logging.INFO)
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
