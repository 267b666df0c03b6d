"""/v1/webhooks against SSRF: only public receivers (unless the operator allows a network), checked at
registration and before each delivery, and the delivery log never shows what the receiver answered."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from api.main import create_app
from orchestrator.db import transaction
from orchestrator.fleet.delivery_loop import ClaimedDelivery, DeliveryLoop
from orchestrator.fleet.webhooks import parse_networks
from orchestrator.logging_setup import JsonFormatter
from orchestrator.queue.models import WebhookDelivery, utcnow
from orchestrator.settings import Settings
from tests.orchestrator.support import sessions_for

PRIVATE_TARGETS = [
    "http://10.0.0.1/hook",
    "https://172.16.0.1/hook",
    "https://192.168.1.10:8443/hook",
    "http://100.64.0.1/hook",
    "https://[fd00::1]/hook",
    "https://[fec0::1]/hook",
    "https://[::ffff:192.168.0.1]/hook",
    "http://localhost:9000/hook",
]


@pytest.mark.parametrize("url", PRIVATE_TARGETS)
def test_private_targets_are_refused_at_registration_and_update(
    client: TestClient, keys: dict, url: str
) -> None:
    r = client.post("/v1/webhooks", json={"url": url}, headers=keys["alice"])
    assert r.status_code == 422, r.text
    assert "QF_WEBHOOK_ALLOWED_NETWORKS" in r.json()["detail"] or "loopback" in r.json()["detail"]
    hook = client.post("/v1/webhooks", json={"url": "https://93.184.215.14/h"}, headers=keys["alice"])
    assert hook.status_code == 201
    moved = client.patch(f"/v1/webhooks/{hook.json()['id']}", json={"url": url}, headers=keys["alice"])
    assert moved.status_code == 422
    shown = client.get(f"/v1/webhooks/{hook.json()['id']}", headers=keys["alice"]).json()
    assert shown["url"] == "https://93.184.215.14/h"


def test_an_operator_allowed_network_may_be_targeted(settings: Settings, keys: dict) -> None:
    allowed = settings.model_copy(update={"webhook_allowed_networks": parse_networks(["10.20.0.0/16"])})
    with TestClient(create_app(allowed)) as c:
        ok = c.post("/v1/webhooks", json={"url": "https://10.20.1.2/hook"}, headers=keys["alice"])
        other = c.post("/v1/webhooks", json={"url": "https://10.21.1.2/hook"}, headers=keys["alice"])
    assert ok.status_code == 201, ok.text
    assert other.status_code == 422


@pytest.fixture
def talkative_receiver() -> Iterator[str]:
    """Answers 500 with a body a caller must never get to see."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"redis_password": "hunter2", "internal": "10.0.0.3"}'
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_the_delivery_log_keeps_status_and_timing_but_not_the_reply(
    settings: Settings, keys: dict, talkative_receiver: str
) -> None:
    loopback = settings.model_copy(update={"webhook_allow_loopback": True, "webhook_max_attempts": 1})
    with TestClient(create_app(loopback)) as c:
        hook = c.post("/v1/webhooks", json={"url": talkative_receiver}, headers=keys["alice"]).json()
        sessions = sessions_for(settings.database_url)
        with transaction(sessions) as s:
            s.add(
                WebhookDelivery(
                    id=uuid.uuid4().hex,
                    webhook_id=hook["id"],
                    event="job.failed",
                    body='{"type": "job.failed"}',
                    state="pending",
                    attempts=0,
                    next_attempt_at=utcnow(),
                    created_at=utcnow(),
                )
            )
        assert DeliveryLoop(sessions, loopback).step() == 1
        r = c.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=keys["alice"])
    assert r.status_code == 200
    [delivery] = r.json()["deliveries"]
    [attempt] = delivery["attempt_log"]
    assert delivery["state"] == "failed"
    assert attempt["status_code"] == 500 and attempt["error"] == "HTTP 500" and attempt["duration_ms"] >= 0
    assert "response_excerpt" not in attempt
    assert "hunter2" not in r.text and "10.0.0.3" not in r.text


@pytest.mark.parametrize("given", [True, False], ids=["secret given", "secret generated"])
def test_a_failed_webhook_insert_logs_no_secret(
    settings: Settings, keys: dict, caplog: pytest.LogCaptureFixture, given: bool
) -> None:
    """The insert fails in the database (its table is missing); the error is logged, with SQL statement
    logging on at DEBUG as well, and no log line, traceback included, carries the secret."""
    app = create_app(settings)

    @event.listens_for(app.state.engine, "before_cursor_execute", retval=True)
    def break_the_insert(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> Any:
        return statement.replace("INSERT INTO webhooks ", "INSERT INTO no_such_webhooks ", 1), params

    secret = "whsec_do-not-log-" + "s" * 24
    body = {"url": "https://93.184.215.14/h", **({"secret": secret} if given else {})}
    with caplog.at_level(logging.DEBUG), TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/webhooks", json=body, headers=keys["alice"])
    assert r.status_code == 500 and r.json() == {"detail": "internal error; the server log has the details"}
    lines = [JsonFormatter().format(record) for record in caplog.records]
    assert any("POST /v1/webhooks" in line and "no_such_webhooks" in line for line in lines)
    leaked = [line for line in lines if "whsec_" in line or secret in line]
    assert leaked == []


def test_a_claimed_delivery_does_not_show_its_secret() -> None:
    claim = ClaimedDelivery("d1", 1, "https://hooks.example/x", "whsec_topsecret", "job.failed", b"{}")
    assert "whsec_topsecret" not in repr(claim)
