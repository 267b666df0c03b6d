"""`quantfleet` commands that talk to a running service over its REST API (quantfleet/client.py): submit (with
live progress bars), jobs, schedules, batches, webhooks, artifacts; plus the background loops the
service processes run (scheduler, webhook/registry deliveries).

The API URL and key come from QF_API_URL / QF_API_KEY or ~/.config/quantfleet/config.toml. Lists print
tables (or JSON with --json); single objects print as JSON, so output can be piped into jq (`jobs show`
adds a short summary of the job's preflight plan on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantfleet.client import TERMINAL_STATES, ApiError, QuantFleetClient
from workers.preflight import summary_lines as plan_summary

BackgroundThread = tuple[threading.Thread, threading.Event]


# --- background loops of service processes ---------------------------------------------------------------


def start_background(settings: Any, *, scheduler: bool, deliveries: bool) -> list[BackgroundThread]:
    """Start the scheduler and/or the delivery loop on daemon threads (set each event, then join, to stop)."""
    from orchestrator.db import make_engine, session_factory

    sessions = session_factory(make_engine(settings.database_url))
    threads: list[BackgroundThread] = []
    if scheduler:
        from orchestrator.fleet.scheduler import Scheduler
        from orchestrator.fleet.scheduler import start_in_thread as start_scheduler

        threads.append(start_scheduler(Scheduler(sessions, settings)))
    if deliveries:
        from orchestrator.fleet.delivery_loop import DeliveryLoop
        from orchestrator.fleet.delivery_loop import start_in_thread as start_deliveries

        threads.append(start_deliveries(DeliveryLoop(sessions, settings)))
    return threads


def stop_background(threads: list[BackgroundThread]) -> None:
    for _, stop in threads:
        stop.set()
    for thread, _ in threads:
        thread.join(timeout=30)


def cmd_scheduler(args: argparse.Namespace) -> int:
    import signal

    from orchestrator.settings import Settings

    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = Settings(**overrides)
    threads = start_background(settings, scheduler=True, deliveries=False)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    print("scheduler ready", flush=True)
    stopped.wait()
    stop_background(threads)
    return 0


# --- output helpers --------------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)


Column = str | Callable[[dict[str, Any]], Any]  # a field name, or a function of the item


def _listing(
    as_json: bool, raw: Any, items: list[dict[str, Any]], title: str, columns: dict[str, Column]
) -> None:
    """A list command's output: `raw` as JSON, or a table of `items`, one cell per column."""
    if as_json:
        _print_json(raw)
        return
    rows = [[item.get(c) if isinstance(c, str) else c(item) for c in columns.values()] for item in items]
    _table(title, list(columns), rows)


def _stderr() -> Any:
    """Progress bars go to stderr, so stdout stays JSON that can be piped into jq."""
    from rich.console import Console

    return Console(stderr=True)


def _read_body(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        body = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ApiError(None, f"cannot read a JSON object from {path}: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(None, f"{path} must hold a JSON object")
    return body


def _client(args: argparse.Namespace) -> QuantFleetClient:
    return QuantFleetClient()


# --- submit and jobs -------------------------------------------------------------------------------------


def job_body_from_args(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = _read_body(args.file) if args.file else {}
    for field, value in (
        ("model", args.model),
        ("method", args.method),
        ("bits", args.bits),
        ("group_size", args.group_size),
    ):
        if value is not None:
            body[field] = value
    if args.calibration:
        body["calibration"] = {**body.get("calibration", {}), "uri": args.calibration}
    if args.eval:
        body["eval"] = {**body.get("eval", {}), "uri": args.eval}
    for item in args.label or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ApiError(None, f"--label {item!r} must be key=value")
        body.setdefault("labels", {})[key] = value
    if "model" not in body or "method" not in body:
        raise ApiError(None, "give the job as -f job.json or at least --model and --method")
    return body


def follow_with_progress(client: QuantFleetClient, job_id: str) -> str:
    """Draw a progress bar per stage from the job's event stream; returns the final state."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    final = "unknown"
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False, console=_stderr()) as bars:
        tasks: dict[str, Any] = {}
        for event in client.follow_events(job_id):
            data = event.data
            if event.event == "end":
                final = str(data.get("state"))
                break
            if event.event == "state":
                bars.console.print(f"[bold]{data.get('state')}[/bold] {data.get('message') or ''}".rstrip())
                continue
            if event.event != "progress" or not data.get("stage"):
                continue
            stage, layer, total = data["stage"], data.get("layer"), data.get("num_layers")
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total or None)
            if layer is not None and total:
                bars.update(
                    tasks[stage], completed=layer, total=total, description=f"{stage} {layer}/{total}"
                )
        for task in tasks.values():
            bars.update(task, completed=bars.tasks[task].total or 1, total=bars.tasks[task].total or 1)
    return final


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.submit_job(job_body_from_args(args), idempotency_key=args.idempotency_key)
        print(f"job {job['id']} {job['state']}", file=sys.stderr)
        if not args.wait:
            _print_json(job)
            return 0
        final = follow_with_progress(client, job["id"])
        _print_json(client.get_job(job["id"]))
        return 0 if final == "succeeded" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.jobs_command == "list":
            labels = dict(item.partition("=")[::2] for item in args.label or [])
            page = client.list_jobs(states=args.state, labels=labels, limit=args.limit)
            _listing(
                args.json,
                page,
                page["jobs"],
                "jobs",
                {
                    "id": "id",
                    "state": "state",
                    "method": lambda j: j["spec"].get("method"),
                    "bits": lambda j: j["spec"].get("bits"),
                    "group": lambda j: j["spec"].get("group_size"),
                    "progress": lambda j: (j.get("progress") or {}).get("summary"),
                    "created": "created_at",
                },
            )
        elif args.jobs_command == "show":
            job = client.get_job(args.job_id)
            if job.get("plan"):  # a human summary on stderr; stdout stays JSON for jq
                print("\n".join(plan_summary(job["plan"])), file=sys.stderr)
            _print_json(job)
        elif args.jobs_command == "cancel":
            job = client.cancel_job(args.job_id)
            print(f"job {job['id']} {job['state']}")
        elif args.jobs_command == "events":
            if args.follow:
                for event in client.follow_events(args.job_id):
                    print(
                        json.dumps({"id": event.id, "event": event.event, **event.data}, default=str),
                        flush=True,
                    )
            else:
                for item in client.job_events(args.job_id):
                    print(json.dumps(item, default=str))
        elif args.jobs_command == "wait":
            final = follow_with_progress(client, args.job_id)
            print(f"job {args.job_id} {final}")
            return 0 if final == "succeeded" else 1
    return 0


# --- schedules, batches, webhooks, artifacts -------------------------------------------------------------


def cmd_schedules(args: argparse.Namespace) -> int:
    with _client(args) as client:
        command = args.schedules_command
        if command == "list":
            schedules = client.list_schedules()
            _listing(
                args.json,
                schedules,
                schedules,
                "schedules",
                {
                    "id": "id",
                    "name": "name",
                    "cron": "cron",
                    "tz": "tz",
                    "missed": "missed_fire_policy",
                    "status": lambda s: "paused" if s["paused"] else "active",
                    "next fire": "next_fire_at",
                    "jobs": "jobs_per_fire",
                },
            )
        elif command == "create":
            _print_json(client.create_schedule(_read_body(args.file)))
        elif command == "show":
            _print_json(client.get_schedule(args.schedule_id))
        elif command == "pause":
            _print_json(client.pause_schedule(args.schedule_id))
        elif command == "resume":
            _print_json(client.resume_schedule(args.schedule_id))
        elif command == "delete":
            client.delete_schedule(args.schedule_id)
            print(f"schedule {args.schedule_id} deleted")
    return 0


def _wait_for_batch(client: QuantFleetClient, batch_id: str, poll_s: float = 2.0) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("batch {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_stderr(),
    ) as bars:
        task = bars.add_task(batch_id[:12], total=None)
        while True:
            batch = client.get_batch(batch_id)
            finished = sum(batch["counts"].get(s, 0) for s in TERMINAL_STATES)
            bars.update(task, completed=finished, total=batch["total"])
            if batch["done"]:
                return batch
            time.sleep(poll_s)


def cmd_batches(args: argparse.Namespace) -> int:
    with _client(args) as client:
        command = args.batches_command
        batch: dict[str, Any] | None = None
        if command == "list":
            batches = client.list_batches()
            _listing(
                args.json,
                batches,
                batches,
                "batches",
                {
                    "id": "id",
                    "name": "name",
                    "schedule": "schedule_id",
                    "fire time": "fire_time",
                    "created": "created_at",
                },
            )
            return 0
        if command == "create":
            batch = client.create_batch(_read_body(args.file))
            if args.wait:
                batch = _wait_for_batch(client, batch["id"])
        elif command == "show":
            batch = client.get_batch(args.batch_id)
        assert batch is not None
        counts = ", ".join(f"{k} {v}" for k, v in batch["counts"].items() if v)
        _listing(
            args.json,
            batch,
            batch["jobs"],
            f"batch {batch['id']} ({counts})",
            {
                "job": lambda j: j["job_id"][:12],
                "state": "state",
                "method": "method",
                "bits": "bits",
                "group": "group_size",
                "Δppl %": "delta_ppl_pct",
                "KL": "kl_mean",
                "gate": "gate_passed",
            },
        )
        failed = batch["counts"].get("failed", 0) + batch["counts"].get("cancelled", 0)
        return 1 if command == "create" and args.wait and failed else 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        command = args.webhooks_command
        if command == "list":
            _print_json(client.list_webhooks())
        elif command == "create":
            body: dict[str, Any] = {"url": args.url}
            if args.event:
                body["events"] = args.event
            _print_json(client.create_webhook(body))
        elif command == "deliveries":
            _print_json(client.webhook_deliveries(args.webhook_id))
        elif command == "delete":
            client.delete_webhook(args.webhook_id)
            print(f"webhook {args.webhook_id} deleted")
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    filters = {k: getattr(args, k) for k in ("model", "method", "bits", "group_size", "gate")}
    with _client(args) as client:
        _print_json(client.list_artifacts(**{k: v for k, v in filters.items() if v is not None}))
    return 0


# --- wiring ----------------------------------------------------------------------------------------------


def _guarded(func: Any) -> Any:
    """Turn API errors into one readable line and exit status 2 (not a traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except ApiError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def add_fleet_commands(sub: Any) -> None:
    """Add the client commands and `scheduler` to the `quantfleet` subcommand parser."""
    sched = sub.add_parser("scheduler", help="run the schedule loop only (any number may share one database)")
    sched.add_argument("--database-url", help="override QF_DATABASE_URL")
    sched.set_defaults(func=cmd_scheduler)

    submit = sub.add_parser("submit", help="submit a job to the service (QF_API_URL, QF_API_KEY)")
    submit.add_argument("-f", "--file", help="job request as JSON (- for stdin); flags override its fields")
    submit.add_argument("--model")
    submit.add_argument("--method", choices=["gptq", "awq", "rtn", "awq-gptq", "auto"])
    submit.add_argument("--bits", type=int)
    submit.add_argument("--group-size", type=int)
    submit.add_argument("--calibration", help="calibration text URI")
    submit.add_argument("--eval", help="evaluation text URI")
    submit.add_argument("--label", action="append", help="key=value (repeatable)")
    submit.add_argument("--idempotency-key")
    submit.add_argument("--wait", action="store_true", help="show live progress until the job ends")
    submit.set_defaults(func=_guarded(cmd_submit))

    jobs = sub.add_parser("jobs", help="list, show, cancel or follow jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_sub.add_parser("list")
    listing.add_argument("--state", action="append", help="repeatable")
    listing.add_argument("--label", action="append", help="key=value (repeatable)")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    for name in ("show", "cancel", "events", "wait"):
        cmd = jobs_sub.add_parser(name)
        cmd.add_argument("job_id")
        if name == "events":
            cmd.add_argument("--follow", action="store_true", help="stream until the job ends")
    jobs.set_defaults(func=_guarded(cmd_jobs))

    schedules = sub.add_parser("schedules", help="cron schedules of job matrices")
    sch_sub = schedules.add_subparsers(dest="schedules_command", required=True)
    sch_sub.add_parser("list").add_argument("--json", action="store_true")
    sch_sub.add_parser("create").add_argument("-f", "--file", required=True, help="schedule as JSON")
    for name in ("show", "pause", "resume", "delete"):
        sch_sub.add_parser(name).add_argument("schedule_id")
    schedules.set_defaults(func=_guarded(cmd_schedules))

    batches = sub.add_parser("batches", help="job matrices submitted at once")
    bat_sub = batches.add_subparsers(dest="batches_command", required=True)
    bat_sub.add_parser("list").add_argument("--json", action="store_true")
    create = bat_sub.add_parser("create")
    create.add_argument("-f", "--file", required=True, help="{template, matrix} as JSON")
    create.add_argument("--wait", action="store_true", help="show progress until every job ends")
    create.add_argument("--json", action="store_true")
    show = bat_sub.add_parser("show")
    show.add_argument("batch_id")
    show.add_argument("--json", action="store_true")
    batches.set_defaults(func=_guarded(cmd_batches))

    hooks = sub.add_parser("webhooks", help="signed job notifications")
    hook_sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    hook_sub.add_parser("list")
    hook_create = hook_sub.add_parser("create")
    hook_create.add_argument("--url", required=True)
    hook_create.add_argument("--event", action="append", help="job.succeeded, job.failed, job.gate_failed")
    for name in ("deliveries", "delete"):
        hook_sub.add_parser(name).add_argument("webhook_id")
    hooks.set_defaults(func=_guarded(cmd_webhooks))

    arts = sub.add_parser("artifacts", help="finished artifacts with URIs, sha256 and metrics")
    arts.add_argument("--model")
    arts.add_argument("--method")
    arts.add_argument("--bits", type=int)
    arts.add_argument("--group-size", type=int)
    arts.add_argument("--gate", choices=["passed", "failed", "none"])
    arts.set_defaults(func=_guarded(cmd_artifacts))
