"""Load benchmark of the API on loopback, with PostgreSQL (bounded: about two minutes).

Starts the API as the container images run it, `uvicorn api.main:app` (uvicorn's defaults: log level info
and an access log line per request, written to a file), in a child process: one worker process, or
`--workers N` (what `quantfleet serve --workers N` runs), on a fresh PostgreSQL database created for the
run (and dropped after). Then measures from this process, the load generator (one process, one asyncio loop,
one keep-alive connection per client):

1. submits: POST /v1/jobs (a real, fully validated job body: a tiny local model, calibration and evaluation
   text) from 1, 20 and 100 concurrent clients, each sending its next request as soon as the last one was
   answered, for --seconds each: throughput and p50/p99 latency, and any non-202. Each level runs twice:
   all clients one owner (every submit then waits for that owner's cap lock, held while the server runs
   the insert), and one owner per client.
2. /healthz with 200 open event streams: 200 `GET /v1/jobs/{id}/events?follow=true` streams held open
   (10 API keys × 20, the per-key cap) on queued jobs, then sequential /healthz requests: p50/p99/max,
   next to the same measured with no stream open.

The client shares the machine with the server: on 2 cores both compete for the CPU, so the throughput is a
floor of what the server alone does. The submits are sent by a minimal keep-alive HTTP/1.1 client
(`RawClient`: each request's bytes built once, 0.1 ms of CPU per request; `--client httpx` for httpx, which
costs more than the server's own work). The first line printed names the server command and the server and
client processes; each level also reports the CPU time per submit of the API processes, of the database's
backends and of the load generator itself (from /proc), and the load average: throughput on a shared
machine depends on what else runs, the CPU per submit much less. Run from the repository root:

    .venv/bin/python benchmarks/api_load.py [--seconds 8] [--workers 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POSTGRES_ADMIN_URL = os.environ.get(
    "QF_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
STREAM_KEYS = 10
STREAMS_PER_KEY = 20
MAX_OWNERS = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _database_backends(database: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend serving `database` (their process title names it)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read()
        except OSError:
            continue
        if title.startswith(b"postgres:") and f" {database} ".encode() in title:
            found[int(entry)] = _cpu_seconds(int(entry))
    return found


class CpuMeter:
    """CPU seconds spent by the API server's processes and by the database's backends over a measurement
    (Linux /proc): what one submit costs, whatever else the machine runs meanwhile. A backend that ends
    during the measurement is not counted (the API's pool keeps its connections, so few do)."""

    def __init__(self, server_pids: list[int], database: str) -> None:
        self.server_pids, self.database = server_pids, database
        self._backends: dict[int, float] = {}

    def start(self) -> float:
        self._backends = _database_backends(self.database)
        return sum(_cpu_seconds(p) for p in self.server_pids)

    def since_start(self, server_start: float) -> tuple[float, float]:
        """(server, database) CPU seconds since start()."""
        now = _database_backends(self.database)
        database = sum(cpu - self._backends.get(pid, 0.0) for pid, cpu in now.items())
        return sum(_cpu_seconds(p) for p in self.server_pids) - server_start, database


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(_percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2) if latencies else float("nan"),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else float("nan"),
    }


class Database:
    """A fresh, migrated PostgreSQL database for this run, dropped afterwards."""

    def __init__(self) -> None:
        import psycopg

        self.admin = psycopg.connect(
            POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True
        )
        self.name = f"qf_bench_{uuid.uuid4().hex[:10]}"
        self.admin.execute(f'CREATE DATABASE "{self.name}"')
        self.url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.admin.close()


def _prepare(db_url: str, work: Path) -> dict[str, Any]:
    """Migrate, make the inputs and the API keys."""
    from orchestrator.auth import create_api_key
    from orchestrator.db import make_engine, migrate, session_factory, transaction
    from tests.helpers import make_tiny_llama, write_text_corpus

    migrate(db_url)
    inputs = work / "inputs"
    model = make_tiny_llama(inputs / "tiny-llama", num_layers=2, seed=0)
    calibration = write_text_corpus(inputs / "calibration.txt", 6000, seed=0)
    evaluation = write_text_corpus(inputs / "eval.txt", 3000, seed=1)
    engine = make_engine(db_url)
    with transaction(session_factory(engine)) as s:
        submitter = create_api_key(s, owner="bench", scopes=["submit", "read"])
        owners = [create_api_key(s, owner=f"team{i}", scopes=["submit", "read"]) for i in range(MAX_OWNERS)]
        readers = [create_api_key(s, owner="bench", scopes=["read"]) for _ in range(STREAM_KEYS)]
    engine.dispose()
    body = {
        "model": str(model),
        "method": "gptq",
        "bits": 4,
        "group_size": 32,
        "calibration": {"uri": str(calibration), "num_samples": 8, "seq_len": 64},
        "eval": {"uri": str(evaluation), "seq_len": 64},
        "labels": {"team": "bench"},
    }
    return {"inputs": inputs, "submitter": submitter, "owners": owners, "readers": readers, "body": body}


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def server_command(port: int, workers: int = 1, access_log: bool = True) -> list[str]:
    """The API as the container images run it (`uvicorn api.main:app`, uvicorn's defaults: log level info,
    one access log line per request), on loopback; `workers` processes."""
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers)]
    return command if access_log else [*command, "--no-access-log"]


def _start_server(
    db_url: str, work: Path, inputs: Path, port: int, workers: int = 1, access_log: bool = True
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "QF_DATABASE_URL": db_url,
        "QF_OBJECT_STORE": str(work / "objects"),
        "QF_ALLOWED_ROOTS": str(inputs),
        "QF_CACHE_DIR": str(work / "cache"),
        "QF_WORK_DIR": str(work / "work"),
        "QF_MAX_ACTIVE_JOBS_PER_OWNER": str(10**9),  # measure the API, not the per-owner cap
    }
    with open(work / "server.log", "wb") as log:  # the access log goes where a container's output would
        server = subprocess.Popen(
            server_command(port, workers, access_log), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the API server exited with {server.returncode}")
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the API server did not become ready in 60 s")


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection, the request's bytes built
    once, the response read by its Content-Length. A load generator on the same 2 cores as the server must
    cost far less than the server: httpx spends 2-6 ms of CPU per request here, more than a submit costs
    the API, so it measured itself as much as the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @staticmethod
    def request(method: str, path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(self, raw: bytes) -> int:
        """Send a prepared request; returns the response status (the body is read and dropped)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(raw)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self._reader.readexactly(length)
        return status

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def _submits(
    url: str,
    tokens: list[str],
    body: dict[str, Any],
    clients: int,
    seconds: float,
    meter: CpuMeter,
    client_kind: str = "raw",
) -> dict[str, Any]:
    """`clients` concurrent clients; client i submits with tokens[i % len(tokens)] (one owner per token)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    host_port = url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    payload = json.dumps(body).encode()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        for token in tokens[:clients]:  # warm up: connections, the first validation, each key once
            await client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"})
        stop_at = time.perf_counter() + seconds
        cpu_start, client_start = meter.start(), time.process_time()

        async def one_httpx_client(i: int) -> None:
            headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.post("/v1/jobs", json=body, headers=headers)
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        async def one_raw_client(i: int) -> None:
            headers = {
                "Authorization": f"Bearer {tokens[i % len(tokens)]}",
                "Content-Type": "application/json",
            }
            raw = RawClient.request("POST", "/v1/jobs", host_port, headers, payload)
            connection = RawClient(host, int(port))
            try:
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    code = await connection.send(raw)
                    latencies.append(time.perf_counter() - t0)
                    statuses[code] = statuses.get(code, 0) + 1
            finally:
                await connection.close()

        one_client = one_raw_client if client_kind == "raw" else one_httpx_client
        started = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
        server_cpu, database_cpu = meter.since_start(cpu_start)
        client_cpu = time.process_time() - client_start
    ok = statuses.get(202, 0)
    n = max(1, len(latencies))
    return {
        "client": client_kind,
        "clients": clients,
        "owners": min(clients, len(tokens)),
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "accepted_202": ok,
        "other_statuses": {str(k): v for k, v in statuses.items() if k != 202},
        "submits_per_s": round(ok / elapsed, 1),
        **_summary(latencies),
        "server_cpu_ms_per_submit": round(server_cpu * 1000 / n, 2),
        "database_cpu_ms_per_submit": round(database_cpu * 1000 / n, 2),
        "client_cpu_ms_per_submit": round(client_cpu * 1000 / n, 2),  # this load generator's own
        "load_average": os.getloadavg()[0],
    }


async def _healthz(client: httpx.AsyncClient, n: int) -> dict[str, Any]:
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.get("/healthz")
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.01)
    return {"requests": n, **_summary(latencies)}


async def _healthz_with_streams(
    url: str, token: str, readers: list[str], body: dict[str, Any], probes: int
) -> dict[str, Any]:
    streams = STREAM_KEYS * STREAMS_PER_KEY
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        jobs = []
        for _ in range(20):  # queued jobs (no dispatcher runs): their streams stay open
            r = await client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"})
            jobs.append(r.json()["id"])
        alone = await _healthz(client, probes)

    opened: list[int] = []
    refused: list[int] = []
    hold = asyncio.Event()
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as streaming:

        async def stream(i: int) -> None:
            headers = {"Authorization": f"Bearer {readers[i % len(readers)]}"}
            path = f"/v1/jobs/{jobs[i % len(jobs)]}/events"
            async with streaming.stream("GET", path, params={"follow": "true"}, headers=headers) as r:
                if r.status_code != 200:
                    refused.append(r.status_code)
                    return
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        opened.append(i)
                        break
                await hold.wait()

        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        deadline = time.monotonic() + 60
        while len(opened) + len(refused) < streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
            with_streams = await _healthz(probe, probes)
            t0 = time.perf_counter()
            r = await probe.get(f"/v1/jobs/{jobs[0]}", headers={"Authorization": f"Bearer {token}"})
            read_ms = round((time.perf_counter() - t0) * 1000, 2)
            assert r.status_code == 200
        hold.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "open_streams": len(opened),
        "refused_streams": refused,
        "healthz_without_streams": alone,
        "healthz_with_streams": with_streams,
        "get_job_with_streams_ms": read_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each submit level")
    parser.add_argument("--clients", default="1,20,100", help="concurrency levels of the submit test")
    parser.add_argument("--probes", type=int, default=300, help="/healthz requests per measurement")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the API")
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="submit load generator: a minimal keep-alive HTTP/1.1 client (default) or httpx",
    )
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="start uvicorn with --no-access-log (the images log every request, uvicorn's default)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    access_log = not args.no_access_log

    db = Database()
    server = None
    try:
        with tempfile.TemporaryDirectory(prefix="qf-api-load-") as tmp:
            work = Path(tmp)
            prepared = _prepare(db.url, work)
            port = _free_port()
            server = _start_server(db.url, work, prepared["inputs"], port, args.workers, access_log)
            server_pids = _process_tree(server.pid)
            meter = CpuMeter(server_pids, db.name)
            url = f"http://127.0.0.1:{port}"
            processes = {
                "server_command": " ".join(server_command(port, args.workers, access_log)[1:]),
                "server_processes": len(server_pids),  # uvicorn's supervisor as well when --workers > 1
                "api_workers": args.workers,
                "client_processes": 1,  # this one: one asyncio loop, `--client` connections, one per client
            }
            print(json.dumps(processes), flush=True)
            submits = []
            for clients in (int(c) for c in args.clients.split(",")):
                # One owner: every submit takes that owner's cap lock (counted and inserted in one step).
                # One owner per client: teams submitting side by side.
                for tokens in ([prepared["submitter"]], prepared["owners"]):
                    if len(tokens) > 1 and clients == 1:
                        continue
                    level = asyncio.run(
                        _submits(url, tokens, prepared["body"], clients, args.seconds, meter, args.client)
                    )
                    print(json.dumps(level), flush=True)
                    submits.append(level)
            streams = asyncio.run(
                _healthz_with_streams(
                    url, prepared["submitter"], prepared["readers"], prepared["body"], args.probes
                )
            )
            print(json.dumps(streams), flush=True)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        db.drop()
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        **processes,
        "client": args.client,
        "submits": submits,
        "streams": streams,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
