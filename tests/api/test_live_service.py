"""The whole service on loopback: uvicorn serving the API, a dispatcher running real tiny jobs, and the
delivery loop. Shows live progress over Server-Sent Events up to the terminal state (also through
`quantfleet submit --wait`), a signed webhook from a real job delivered exactly once after two failures,
a batch whose jobs tokenize their shared calibration set once, and /metrics fed by the dispatcher."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import workers.calibration_cache as calibration_cache
from api.main import create_app
from orchestrator.auth import create_api_key
from orchestrator.db import transaction
from orchestrator.dispatcher import Dispatcher, start_in_thread
from orchestrator.executors import ThreadExecutor
from orchestrator.fleet.delivery_loop import DeliveryLoop
from orchestrator.fleet.delivery_loop import start_in_thread as start_deliveries
from orchestrator.fleet.webhooks import SIGNATURE_HEADER, SignatureError, verify_signature
from orchestrator.metrics import ServiceMetrics
from orchestrator.settings import Settings
from quantfleet.client import QuantFleetClient
from tests.orchestrator.support import gptq_body, service_settings, sessions_for, stop, wait_for
from workers.storage import LocalStore


@dataclass
class Service:
    url: str
    token: str
    settings: Settings
    client: QuantFleetClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service(clean_sqlite_url: str, allowed_root: Path, tmp_path: Path) -> Iterator[Service]:
    settings = service_settings(
        clean_sqlite_url,
        allowed_root,
        tmp_path,
        webhook_allow_loopback=True,
        webhook_backoff_seconds=0.05,
        delivery_poll_seconds=0.05,
        concurrency=2,
    )
    sessions = sessions_for(clean_sqlite_url)
    with transaction(sessions) as s:
        token = create_api_key(s, owner="alice", scopes=["submit", "read"])
    metrics = ServiceMetrics()
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, service_metrics=metrics), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    api = threading.Thread(target=server.run, daemon=True)
    api.start()
    wait_for(lambda: server.started, 30, "the API server to start")
    dispatcher = start_in_thread(
        Dispatcher(sessions, ThreadExecutor(2), settings, name="live", metrics=metrics)
    )
    deliveries = start_deliveries(DeliveryLoop(sessions, settings))
    url = f"http://127.0.0.1:{port}"
    client = QuantFleetClient(url, token)
    try:
        yield Service(url, token, settings, client)
    finally:
        client.close()
        stop(deliveries)
        stop(dispatcher)
        server.should_exit = True
        api.join(timeout=10)


def test_sse_streams_progress_up_to_the_terminal_state(service: Service, tiny_assets: dict) -> None:
    job = service.client.submit_job(gptq_body(tiny_assets))
    stream = list(service.client.follow_events(job["id"]))
    kinds = [e.event for e in stream]
    assert kinds[-1] == "end" and stream[-1].data == {"job_id": job["id"], "state": "succeeded"}
    states = [e.data["state"] for e in stream if e.event == "state"]
    assert states == ["queued", "running", "succeeded"]
    progress = [e.data for e in stream if e.event == "progress"]
    quantize = [(p["layer"], p["num_layers"]) for p in progress if p["stage"] == "quantize"]
    assert quantize == [(1, 2), (2, 2)]  # layer i/N of the 2-layer model, in order
    stages = list(dict.fromkeys(p["stage"] for p in progress))
    assert stages == ["load", "calibrate", "quantize", "write", "evaluate", "upload", "done"]
    ids = [e.id for e in stream if e.event != "end" and e.id is not None]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # Reconnecting after an event id resumes right after it: nothing lost, nothing repeated.
    middle = ids[len(ids) // 2]
    resumed = [e.id for e in service.client.follow_events(job["id"], after=middle) if e.event != "end"]
    assert resumed == [i for i in ids if i > middle]


def test_cli_submit_wait_draws_progress_and_exits_with_the_outcome(
    service: Service, tiny_assets: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from quantfleet.cli import main

    monkeypatch.setenv("QF_API_URL", service.url)
    monkeypatch.setenv("QF_API_KEY", service.token)
    body = tmp_path / "job.json"
    body.write_text(json.dumps(gptq_body(tiny_assets)))
    assert main(["submit", "-f", str(body), "--bits", "8", "--label", "run=cli", "--wait"]) == 0
    out = capsys.readouterr()
    shown = json.loads(out.out)
    assert shown["state"] == "succeeded" and shown["spec"]["bits"] == 8 and shown["labels"] == {"run": "cli"}
    assert "quantize 2/2" in out.err and "succeeded" in out.err  # the bars and states, on stderr
    assert main(["jobs", "show", shown["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == shown["id"]
    monkeypatch.setenv("QF_API_KEY", "qf_wrong_key")
    assert main(["jobs", "show", shown["id"]]) == 2
    assert "401" in capsys.readouterr().err


@dataclass
class Receiver:
    secret: str = ""
    plan: list[int] = field(default_factory=lambda: [500, 500, 200])
    received: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[tuple[str, Receiver]]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                verify_signature(state.secret, body, self.headers.get(SIGNATURE_HEADER))
                valid = True
            except SignatureError:
                valid = False
            state.received.append({"body": json.loads(body), "valid": valid})
            status = state.plan[min(len(state.received), len(state.plan)) - 1] if valid else 401
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/registry/hook", state
    server.shutdown()
    server.server_close()


def test_webhook_from_a_real_job_is_delivered_once_after_two_failures(
    service: Service, tiny_assets: dict, receiver: tuple[str, Receiver]
) -> None:
    url, state = receiver
    hook = service.client.create_webhook({"url": url, "events": ["job.succeeded", "job.gate_failed"]})
    state.secret = hook["secret"]
    body = {**gptq_body(tiny_assets), "gate": {"max_kl": 10.0}}  # a gate the tiny job passes
    job = service.client.submit_job(body)
    assert [e.event for e in service.client.follow_events(job["id"])][-1] == "end"

    def delivered() -> list[dict[str, Any]] | None:
        found = service.client.webhook_deliveries(hook["id"])
        return found if found and found[0]["state"] != "pending" else None

    deliveries = wait_for(delivered, 30, "the webhook delivery to finish")
    assert len(deliveries) == 1  # the gate passed: job.succeeded only
    delivery = deliveries[0]
    assert (
        delivery["event"] == "job.succeeded"
        and delivery["state"] == "succeeded"
        and delivery["attempts"] == 3
    )
    assert [(a["attempt"], a["status_code"], a["ok"]) for a in delivery["attempt_log"]] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]
    assert len(state.received) == 3 and all(r["valid"] for r in state.received)
    event = state.received[-1]["body"]
    assert event["id"] == delivery["id"] and event["type"] == "job.succeeded"
    sent = event["data"]["job"]
    assert sent["id"] == job["id"] and sent["gate"]["passed"] is True and sent["metrics"]["kl_mean"] >= 0
    assert {a["path"] for a in sent["artifacts"]} >= {"manifest.json", "eval.json", "model.safetensors"}
    assert all(len(a["sha256"]) == 64 for a in sent["artifacts"])
    got = service.client.get_job(job["id"])
    assert got["gate"]["passed"] is True and got["gate"]["checks"][0]["metric"] == "kl_mean"


def test_batch_jobs_share_one_tokenization_of_their_calibration_set(
    service: Service, tiny_assets: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = calibration_cache.calibration_windows

    def counting(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(calibration_cache, "calibration_windows", counting)
    template = {k: v for k, v in gptq_body(tiny_assets).items() if k not in ("model", "method", "bits")}
    batch = service.client.create_batch(
        {
            "template": template,
            "matrix": {"model": [str(tiny_assets["model"])], "method": ["gptq", "awq"], "bits": [4]},
        }
    )

    def finished() -> dict[str, Any] | None:
        current = service.client.get_batch(batch["id"])
        return current if current["done"] else None

    done = wait_for(finished, 120, "the batch to finish", interval=0.2)
    assert done["counts"]["succeeded"] == 2, done["jobs"]
    assert all(row["delta_ppl_pct"] is not None for row in done["jobs"])
    assert len(calls) == 1  # two jobs, one model + calibration set: tokenized once
    cached = LocalStore(service.settings.object_store).list("cache/calibration")
    assert len(cached) == 1 and cached[0].endswith(".safetensors")

    awq_done = ("quantfleet_job_duration_seconds_count", (("method", "awq"), ("outcome", "succeeded")))

    def scraped() -> dict[Any, float] | None:
        """The dispatcher records an attempt's duration when it sees the attempt end, just after the job row."""
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(_get(f"{service.url}/metrics"))
            for s in f.samples
        }
        return samples if awq_done in samples else None

    samples = wait_for(scraped, 10, "the dispatcher to record the AWQ attempt", interval=0.2)
    assert samples[awq_done] == 1
    assert samples[("quantfleet_jobs", (("state", "succeeded"),))] == 2


def _get(url: str) -> str:
    import httpx

    deadline = time.monotonic() + 5
    while True:
        try:
            return httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_cli_schedules_commands(
    service: Service, tiny_assets: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from quantfleet.cli import main

    monkeypatch.setenv("QF_API_URL", service.url)
    monkeypatch.setenv("QF_API_KEY", service.token)
    template = {k: v for k, v in gptq_body(tiny_assets).items() if k != "method"}
    spec = tmp_path / "schedule.json"
    spec.write_text(
        json.dumps(
            {
                "name": "nightly",
                "cron": "@daily",
                "tz": "America/New_York",
                "template": template,
                "matrix": {"method": ["gptq", "awq"]},
            }
        )
    )
    assert main(["schedules", "create", "-f", str(spec)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["jobs_per_fire"] == 2 and created["next_fire_at"].endswith(("05:00:00Z", "04:00:00Z"))
    assert main(["schedules", "pause", created["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["next_fire_at"] is None
    assert main(["schedules", "list", "--json"]) == 0
    assert [s["paused"] for s in json.loads(capsys.readouterr().out)] == [True]
    spec.write_text(json.dumps({"name": "bad", "cron": "0 25 * * *", "template": template}))
    assert main(["schedules", "create", "-f", str(spec)]) == 2
    assert "not a valid expression" in capsys.readouterr().err
