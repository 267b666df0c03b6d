"""Webhooks against a real HTTP receiver on loopback: signatures, retries with backoff, every attempt
reported, the URL policy that keeps webhooks on public addresses (unless an operator allows a network),
and the connection pinned to the address that was checked."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from orchestrator.fleet.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    DeliveryAttempt,
    RetryPolicy,
    SignatureError,
    WebhookError,
    attempt_delivery,
    check_events,
    check_webhook_url,
    deliver,
    encode_event,
    next_backoff,
    parse_networks,
    sign,
    verify_signature,
)

SECRET = "whsec_test_3f9a"


@dataclass
class Receiver:
    """Answers each POST with the next planned status (the last one repeats) after verifying its signature."""

    url: str
    plan: list[int]
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    reply: bytes = b"ok"
    received: list[dict] = field(default_factory=list)  # one per request: body, headers, signature verdict


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="", plan=[200])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                verify_signature(SECRET, body, self.headers.get(SIGNATURE_HEADER))
                verdict = "valid"
            except SignatureError as e:
                verdict = str(e)
            state.received.append({"body": body, "headers": dict(self.headers), "signature": verdict})
            time.sleep(state.delay_s)
            status = state.plan[min(len(state.received) - 1, len(state.plan) - 1)]
            if verdict != "valid":
                status = 401
            self.send_response(status)
            for key, value in state.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(state.reply)))
            self.end_headers()
            self.wfile.write(state.reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/quantfleet"
    yield state
    server.shutdown()
    server.server_close()


PUBLIC = "93.184.215.14"  # a global address: nothing in these tests connects to it
EVENT_DATA = {"job_id": "job_42", "state": "succeeded", "output_uri": "s3://artifacts/jobs/job_42/"}


def test_fails_twice_then_succeeds_one_success_three_attempts_recorded(receiver: Receiver) -> None:
    receiver.plan = [500, 503, 200]
    recorded: list[DeliveryAttempt] = []
    slept: list[float] = []
    result = deliver(
        receiver.url,
        SECRET,
        "job.succeeded",
        EVENT_DATA,
        policy=RetryPolicy(max_attempts=5, initial_backoff_s=0.5, multiplier=3.0),
        on_attempt=recorded.append,
        allow_loopback=True,
        sleep=slept.append,
    )
    assert result.delivered and result.attempts == recorded
    assert [(a.attempt, a.status_code, a.ok) for a in recorded] == [
        (1, 500, False),
        (2, 503, False),
        (3, 200, True),
    ]
    assert [a.error for a in recorded] == ["HTTP 500", "HTTP 503", None]
    assert slept == [0.5, 1.5]  # exponential backoff between attempts, none after the success
    assert len(receiver.received) == 3 and [r["signature"] for r in receiver.received] == ["valid"] * 3
    successes = [r for r, a in zip(receiver.received, recorded, strict=True) if a.ok]
    assert len(successes) == 1
    bodies = {r["body"] for r in receiver.received}
    assert len(bodies) == 1  # the same event bytes on every retry
    event = json.loads(bodies.pop())
    assert event["type"] == "job.succeeded" and event["data"] == EVENT_DATA
    assert (
        {r["headers"][DELIVERY_HEADER] for r in receiver.received}
        == {event["id"]}
        == {recorded[0].delivery_id}
    )
    assert receiver.received[0]["headers"][EVENT_HEADER] == "job.succeeded"


def test_gives_up_after_max_attempts(receiver: Receiver) -> None:
    receiver.plan = [500]
    result = deliver(
        receiver.url,
        SECRET,
        "job.failed",
        EVENT_DATA,
        policy=RetryPolicy(max_attempts=3),
        allow_loopback=True,
        sleep=lambda _: None,
    )
    assert not result.delivered and [a.status_code for a in result.attempts] == [500, 500, 500]
    assert len(receiver.received) == 3


def test_a_slow_receiver_times_out_and_is_retried(receiver: Receiver) -> None:
    receiver.delay_s = 0.6
    result = deliver(
        receiver.url,
        SECRET,
        "job.failed",
        EVENT_DATA,
        policy=RetryPolicy(max_attempts=2, timeout_s=0.2),
        allow_loopback=True,
        sleep=lambda _: None,
    )
    assert not result.delivered
    assert all(
        a.status_code is None and a.error and "timed out after 0.2 s" in a.error for a in result.attempts
    )
    assert all(a.duration_s < 0.55 for a in result.attempts)


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.plan = [302]
    receiver.headers = {"Location": "http://169.254.169.254/latest/meta-data/"}
    result = deliver(
        receiver.url,
        SECRET,
        "job.succeeded",
        EVENT_DATA,
        policy=RetryPolicy(max_attempts=1),
        allow_loopback=True,
    )
    assert not result.delivered and result.attempts[0].status_code == 302
    assert "not followed" in (result.attempts[0].error or "")
    assert len(receiver.received) == 1


def test_retry_after_is_honoured_up_to_the_cap(receiver: Receiver) -> None:
    receiver.plan = [429, 200]
    receiver.headers = {"Retry-After": "7"}
    slept: list[float] = []
    result = deliver(
        receiver.url,
        SECRET,
        "job.succeeded",
        EVENT_DATA,
        allow_loopback=True,
        sleep=slept.append,
        policy=RetryPolicy(initial_backoff_s=1.0),
    )
    assert result.delivered and slept == [7.0] and result.attempts[0].retry_after_s == 7.0
    policy = RetryPolicy(initial_backoff_s=2, multiplier=2, max_backoff_s=30)
    assert [next_backoff(policy, n) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]
    assert next_backoff(policy, 1, retry_after_s=3600) == 30


def test_connection_refused_is_an_attempt_not_an_exception() -> None:
    result = deliver(
        "http://127.0.0.1:9/none",
        SECRET,
        "job.failed",
        EVENT_DATA,
        policy=RetryPolicy(max_attempts=2),
        allow_loopback=True,
        sleep=lambda _: None,
    )
    assert not result.delivered and len(result.attempts) == 2
    assert result.attempts[0].status_code is None and "ConnectError" in (result.attempts[0].error or "")


def test_loopback_is_refused_unless_allowed(receiver: Receiver) -> None:
    result = deliver(receiver.url, SECRET, "job.succeeded", EVENT_DATA, policy=RetryPolicy(max_attempts=1))
    assert not result.delivered and "loopback" in (result.attempts[0].error or "")
    assert receiver.received == []


# --- signatures -----------------------------------------------------------------------------------------

BODY = b'{"type":"job.succeeded"}'


def test_signature_round_trip_and_format() -> None:
    header = sign(SECRET, BODY, timestamp=1_767_225_600)
    t, v1 = header.split(",")
    assert t == "t=1767225600" and v1.startswith("v1=") and len(v1) == 3 + 64
    assert verify_signature(SECRET, BODY, header, now=1_767_225_600 + 10) == 1_767_225_600


@pytest.mark.parametrize(
    ("secret", "body", "header", "words"),
    [
        (SECRET, BODY + b" ", None, "no v1 signature matches"),  # tampered body
        ("other-secret", BODY, None, "no v1 signature matches"),
        (SECRET, BODY, "", f"missing {SIGNATURE_HEADER}"),
        (SECRET, BODY, "v1=abc", "must look like"),
        (SECRET, BODY, "t=soon,v1=abc", "not an integer"),
    ],
)
def test_bad_signatures_are_refused(secret: str, body: bytes, header: str | None, words: str) -> None:
    header = sign(SECRET, BODY, timestamp=1_767_225_600) if header is None else header
    with pytest.raises(SignatureError, match=words):
        verify_signature(secret, body, header, now=1_767_225_600)


def test_old_signatures_are_refused_as_replays_and_rotated_secrets_accepted() -> None:
    old = sign(SECRET, BODY, timestamp=1_767_225_600)
    with pytest.raises(SignatureError, match="possible replay"):
        verify_signature(SECRET, BODY, old, now=1_767_225_600 + 301)
    rotated = f"{sign('new-secret', BODY, timestamp=1_767_225_600)},v1={old.split('v1=')[1]}"
    assert verify_signature(SECRET, BODY, rotated, now=1_767_225_600) == 1_767_225_600
    assert verify_signature("new-secret", BODY, rotated, now=1_767_225_600) == 1_767_225_600


def test_events_are_checked() -> None:
    with pytest.raises(
        WebhookError, match="webhooks can subscribe to job.succeeded, job.failed, job.gate_failed"
    ):
        encode_event("job.exploded", {})
    assert check_events(["job.failed", "job.succeeded", "job.failed"]) == ["job.succeeded", "job.failed"]
    with pytest.raises(WebhookError, match="not allowed"):
        check_events([])


# --- URL policy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://registry.example/hook", "http:// or https://"),
        ("/relative/hook", "http:// or https://"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://169.254.10.10/x", "link-local"),
        ("http://[fe80::1]/x", "link-local"),
        ("http://[::ffff:169.254.169.254]/x", "cloud metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata service"),
        ("http://127.0.0.1:8080/x", "loopback"),
        ("http://[::1]/x", "loopback"),
        ("http://0.0.0.0/x", "unspecified"),
        ("http://224.0.0.1/x", "multicast"),
        ("https://user:pw@registry.example/x", "credentials"),
        ("http://registry.example:99999/x", "invalid port"),
    ],
)
def test_unsafe_webhook_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(WebhookError, match=words):
        check_webhook_url(url, resolve=lambda host, port: [PUBLIC])


def test_a_name_resolving_to_metadata_or_a_private_network_is_refused() -> None:
    with pytest.raises(WebhookError, match="resolves to 169.254.169.254"):
        check_webhook_url("https://evil.example/x", resolve=lambda host, port: [PUBLIC, "169.254.169.254"])
    with pytest.raises(WebhookError, match="resolves to 10.2.3.4, a private"):
        check_webhook_url("https://registry.internal/x", resolve=lambda h, p: ["10.2.3.4"])
    assert (
        check_webhook_url("https://hooks.example/x", resolve=lambda h, p: [PUBLIC])
        == "https://hooks.example/x"
    )
    assert check_webhook_url("http://127.0.0.1:8080/x", allow_loopback=True) == "http://127.0.0.1:8080/x"

    def unresolvable(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(WebhookError, match="does not resolve"):
        check_webhook_url("https://nowhere.invalid/x", resolve=unresolvable)


PRIVATE = [
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "100.64.0.1",
    "198.18.0.1",
    "[fd00::1]",
    "[fc00::1]",
    "[fec0::1]",
    "[::ffff:10.0.0.1]",
    "[2002:a00:1::1]",  # 6to4 form of 10.0.0.1
    "[64:ff9b::a00:1]",  # NAT64 form of 10.0.0.1
    "[2001:db8::1]",
]


@pytest.mark.parametrize("host", PRIVATE)
def test_private_networks_are_refused_by_address_and_by_name(host: str) -> None:
    with pytest.raises(WebhookError, match="webhooks may only target public addresses"):
        check_webhook_url(f"https://{host}/hooks")
    address = host.strip("[]")
    with pytest.raises(WebhookError, match=f"resolves to {address}"):
        check_webhook_url("https://registry.example/hooks", resolve=lambda h, p: [PUBLIC, address])


def test_an_operator_can_allow_networks_but_never_metadata() -> None:
    networks = parse_networks(["10.20.0.0/16", "fd00::/8", "169.254.0.0/16"])
    assert check_webhook_url("https://10.20.3.4/h", allowed_networks=networks) == "https://10.20.3.4/h"
    assert check_webhook_url("https://[fd00::5]/h", allowed_networks=networks) == "https://[fd00::5]/h"
    with pytest.raises(WebhookError, match="private"):
        check_webhook_url("https://10.21.0.1/h", allowed_networks=networks)
    with pytest.raises(WebhookError, match="cloud metadata"):
        check_webhook_url("http://169.254.169.254/latest/", allowed_networks=networks)
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not a network"):
        parse_networks(["10.0.0.0/33"])


def test_allowed_networks_setting_reads_a_cidr_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from orchestrator.settings import Settings

    monkeypatch.setenv("QF_WEBHOOK_ALLOWED_NETWORKS", "10.20.0.0/16, fd00::/8")
    assert [str(n) for n in Settings().webhook_allowed_networks] == ["10.20.0.0/16", "fd00::/8"]
    monkeypatch.setenv("QF_WEBHOOK_ALLOWED_NETWORKS", "10.20.0.0/16,registry")
    with pytest.raises(ValidationError, match="'registry' is not a network"):
        Settings()
    monkeypatch.delenv("QF_WEBHOOK_ALLOWED_NETWORKS")
    assert Settings().webhook_allowed_networks == []


# --- pinning the connection to the checked address -----------------------------------------------------


class CountingResolver:
    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]


def test_the_connection_goes_to_the_checked_address_with_the_urls_host(receiver: Receiver) -> None:
    """hooks.test does not exist in DNS: the request arrives only because it went to the checked address."""
    port = receiver.url.split(":")[2].split("/")[0]
    resolver = CountingResolver(["127.0.0.1"])
    result = deliver(
        f"http://hooks.test:{port}/hooks/quantfleet",
        SECRET,
        "job.succeeded",
        EVENT_DATA,
        policy=RetryPolicy(max_attempts=1),
        allow_loopback=True,
        resolve=resolver,
    )
    assert result.delivered, result.attempts
    assert resolver.calls == ["hooks.test"]  # one lookup per attempt: checked and connected alike
    assert receiver.received[0]["headers"]["Host"] == f"hooks.test:{port}"


def test_each_attempt_checks_again_and_a_rebound_name_is_not_contacted(receiver: Receiver) -> None:
    """The name pointed at the receiver when registered (and on attempt 1); now it points inside."""
    port = receiver.url.split(":")[2].split("/")[0]
    receiver.plan = [500]
    resolver = CountingResolver(["127.0.0.1"], ["10.0.0.7"])
    result = deliver(
        f"http://hooks.test:{port}/x",
        SECRET,
        "job.failed",
        EVENT_DATA,
        policy=RetryPolicy(max_attempts=2),
        allow_loopback=True,
        resolve=resolver,
        sleep=lambda _: None,
    )
    assert [a.status_code for a in result.attempts] == [500, None]
    assert "resolves to 10.0.0.7, a private" in (result.attempts[1].error or "")
    assert len(receiver.received) == 1 and resolver.calls == ["hooks.test", "hooks.test"]


def test_the_receivers_reply_is_not_kept(receiver: Receiver) -> None:
    receiver.plan = [500]
    receiver.reply = b"redis_password=hunter2"
    result = deliver(
        receiver.url,
        SECRET,
        "job.failed",
        EVENT_DATA,
        policy=RetryPolicy(max_attempts=1),
        allow_loopback=True,
    )
    [attempt] = result.attempts
    assert attempt.status_code == 500 and attempt.error == "HTTP 500" and attempt.duration_s > 0
    assert "hunter2" not in repr(attempt)


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_keeps_the_server_name_and_verifies_the_certificate_for_it(tmp_path: Path) -> None:
    """The certificate names hooks.test only (no IP): the delivery to 127.0.0.1 succeeds because the TLS
    server name is the URL's, and a certificate for another name is refused."""
    cert, key = _self_signed(tmp_path, "hooks.test")
    seen: dict[str, object] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            seen["host"] = self.headers["Host"]
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    def note_server_name(sock: object, name: str | None, ctx: object) -> None:
        seen.setdefault("sni", []).append(name)  # type: ignore[union-attr]

    server_ctx.sni_callback = note_server_name  # type: ignore[assignment]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        with httpx.Client(verify=trust) as client:
            ok = attempt_delivery(
                f"https://hooks.test:{port}/x",
                SECRET,
                "job.succeeded",
                b"{}",
                delivery_id="d1",
                attempt=1,
                allow_loopback=True,
                client=client,
                resolve=lambda h, p: ["127.0.0.1"],
            )
            wrong = attempt_delivery(
                f"https://other.test:{port}/x",
                SECRET,
                "job.succeeded",
                b"{}",
                delivery_id="d2",
                attempt=1,
                allow_loopback=True,
                client=client,
                resolve=lambda h, p: ["127.0.0.1"],
            )
    finally:
        server.shutdown()
        server.server_close()
    assert ok.ok and ok.status_code == 204, ok.error
    assert seen["sni"] == ["hooks.test", "other.test"] and seen["host"] == f"hooks.test:{port}"
    assert not wrong.ok and wrong.status_code is None and "ConnectError" in (wrong.error or "")
