"""`make demo`: the whole service on embedded defaults, driven over HTTP like any client would.

Starts the API (loopback, no auth) and a dispatcher on a local Ray, with SQLite under ./var and artifacts
under ./var/objects; submits a GPTQ and an AWQ job for SmolLM2-135M (w4, group 64, symmetric); draws
their progress from GET /v1/jobs/{id}; prints the metrics table and where the artifacts are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Where each stage starts on the progress bar, in percent; the layer i/N of a stage moves within it.
STAGE_SPANS = {
    "load": (0, 2),
    "calibrate": (2, 5),
    "quantize": (5, 70),
    "write": (70, 72),
    "evaluate": (72, 96),
    "upload": (96, 100),
    "done": (100, 100),
}


def percent(progress: dict[str, Any] | None, state: str) -> float:
    if state == "succeeded":
        return 100.0
    if not progress or progress.get("stage") not in STAGE_SPANS:
        return 0.0
    start, end = STAGE_SPANS[progress["stage"]]
    layer, total = progress.get("layer"), progress.get("num_layers")
    inside = (layer - 1) / total if layer and total else 0.0
    return start + (end - start) * inside


def job_body(method: str, assets: Any, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": str(assets.model_dir),
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "method": method,
        "bits": 4,
        "group_size": 64,
        "symmetric": True,
        "calibration": {
            "uri": str(assets.calibration_path),
            "num_samples": args.samples,
            "seq_len": args.calib_len,
        },
        "eval": {"uri": str(assets.eval_path), "seq_len": args.eval_len, "max_windows": args.eval_windows},
        "labels": {"source": "demo"},
    }


def follow(
    http: httpx.Client, jobs: dict[str, dict[str, Any]], console: Console
) -> dict[str, dict[str, Any]]:
    """Poll each job until it finishes, drawing one bar per job; returns the final job bodies."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    final: dict[str, dict[str, Any]] = {}
    with Progress(*columns, console=console) as bars:
        tasks = {m: bars.add_task(f"{m.upper():5}", total=100, status="queued") for m in jobs}
        while len(final) < len(jobs):
            for method, job in jobs.items():
                if method in final:
                    continue
                current = http.get(job["url"]).json()
                summary = (current.get("progress") or {}).get("summary") or current["state"]
                if current["attempts"] > 1:
                    summary += f" (attempt {current['attempts']})"
                bars.update(
                    tasks[method],
                    completed=percent(current.get("progress"), current["state"]),
                    status=summary,
                )
                if current["state"] in ("succeeded", "failed", "cancelled"):
                    bars.update(tasks[method], status=current["state"])
                    final[method] = current
            time.sleep(0.5)
    return final


def metrics_table(finished: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="SmolLM2-135M-Instruct, W4 g64 symmetric (Shakespeare, held-out plays)")
    for column in (
        "method",
        "ppl original",
        "ppl quantized",
        "Δ ppl",
        "KL mean",
        "KL p99",
        "top-1",
        "weights",
        "time",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, job in finished.items():
        m, r = job.get("metrics") or {}, job.get("report") or {}
        if job["state"] != "succeeded" or not m:
            table.add_row(method.upper(), *["—"] * 7, job["state"])
            continue
        size = f"{r['bytes_original'] / 2**20:.0f} → {r['bytes_quantized'] / 2**20:.0f} MiB"
        table.add_row(
            method.upper(),
            f"{m['ppl_original']:.3f}",
            f"{m['ppl_quantized']:.3f}",
            f"{m['delta_ppl_pct']:+.2f} %",
            f"{m['kl_mean']:.4f}",
            f"{m['kl_p99']:.4f}",
            f"{m['top1_agreement']:.1%}",
            size,
            f"{r['timings_s'].get('total', 0):.0f} s",
        )
    return table


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def demo_cpus_per_task(jobs: int, cpu_count: int, configured: int) -> int:
    """CPUs each demo job's Ray attempt gets: the machine's CPUs shared by the jobs that run at once (each
    task then runs torch with that many threads), unless QF_CPUS_PER_TASK says otherwise."""
    if "QF_CPUS_PER_TASK" in os.environ:
        return configured
    return max(1, cpu_count // max(1, jobs))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m quantfleet.demo", description=__doc__)
    p.add_argument("--methods", default="gptq,awq", help="comma-separated methods to run")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences per job")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--eval-len", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--eval-windows", type=int, default=8, help="evaluation windows per job")
    p.add_argument(
        "--assets", type=Path, default=None, help="assets cache (default: QF_ASSETS_DIR or .cache/assets)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    console = Console()
    if not console.is_terminal:
        console.width = 120  # logs and CI: room for the whole metrics table
    started = time.monotonic()

    from api.embedded import serve_in_thread
    from api.main import create_app
    from orchestrator.db import make_engine, migrate, session_factory
    from orchestrator.dispatcher import Dispatcher, start_in_thread
    from orchestrator.executors import build_executor
    from orchestrator.settings import Settings
    from workers.assets import default_cache, ensure_assets

    cache = (args.assets or default_cache()).resolve()
    with console.status("fetching the reference assets (SmolLM2-135M, Shakespeare)…"):
        assets = ensure_assets(cache)
    defaults = Settings()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = Settings(
        no_auth=True,
        allowed_roots=[*defaults.allowed_roots, cache],
        cpus_per_task=demo_cpus_per_task(len(methods), usable_cpus(), defaults.cpus_per_task),
    )
    migrate(settings.database_url)
    with console.status("starting a local Ray and the dispatcher…"):
        dispatcher = Dispatcher(
            session_factory(make_engine(settings.database_url)), build_executor(settings), settings
        )
        worker = start_in_thread(dispatcher)
    api = serve_in_thread(create_app(settings))
    console.print(f"API on [bold]{api.url}[/] (docs: {api.url}/docs) · database {settings.database_url}")
    try:
        with httpx.Client(timeout=60) as http:
            http.base_url = httpx.URL(api.url)
            jobs = {}
            for method in methods:
                r = http.post("/v1/jobs", json=job_body(method, assets, args))
                if r.status_code != 202:
                    console.print(
                        f"[red]submitting {method} failed ({r.status_code}): {r.json()['detail']}[/]"
                    )
                    return 1
                jobs[method] = r.json()
                console.print(f"submitted {method.upper()} job {r.json()['id']} → POST /v1/jobs 202")
            try:
                finished = follow(http, jobs, console)
            except BaseException:  # interrupted: leave no queued work behind for the next run
                for job in jobs.values():
                    http.post(f"{job['url']}/cancel")
                raise
            console.print(metrics_table(finished))
            for method, job in finished.items():
                if job["state"] == "succeeded":
                    console.print(
                        f"{method.upper()} artifacts: [bold]{job['output_uri']}[/] (manifest.json lists them)"
                    )
                else:
                    console.print(f"[red]{method.upper()} {job['state']}: {job.get('error')}[/]")
    finally:
        worker[1].set()
        worker[0].join(timeout=60)
        api.stop()
    console.print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0 if all(j["state"] == "succeeded" for j in finished.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
