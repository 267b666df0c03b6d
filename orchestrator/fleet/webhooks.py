"""Outgoing webhooks: signed JSON POSTs to a receiver, retried with exponential backoff.

Signature (the Stripe scheme): header `X-QuantFleet-Signature: t=<unix seconds>,v1=<hex>` where
hex = HMAC-SHA256(secret, f"{t}.".encode() + body). Signing the timestamp with the body lets a receiver
refuse replays (old `t`) as well as forgeries; `verify_signature` is what a receiver (or a test) runs.

Delivery: `attempt_delivery` makes exactly one POST and reports what happened; `deliver` loops over it
with backoff for callers that can block. The service's delivery loop calls `attempt_delivery` itself and
keeps the schedule in the database (`next_backoff`), so a restart loses no retries. Every attempt is
handed to a callback, so each one can be recorded and listed.

Webhook URLs are user input pointing the service at the network, so only http(s) URLs to public
addresses are accepted: a host that resolves to a private network (10/8, 172.16/12, 192.168/16,
100.64/10, fc00::/7, fec0::/10, ...), loopback, link-local (169.254.0.0/16: cloud metadata), multicast,
reserved or unspecified address is refused, at registration and again before every attempt. An operator
can allow networks (`allowed_networks`, QF_WEBHOOK_ALLOWED_NETWORKS: an internal model registry, say);
cloud metadata addresses stay refused even then. Loopback is allowed only when the caller says so (tests,
single-host installs).

Each attempt resolves the host once, checks every address, and connects to the checked address itself
(the Host header and the TLS server name stay the URL's, so virtual hosts and certificate checks work):
a name that resolves to a public address for the check and to an internal one for the connection (DNS
rebinding) reaches nothing. Redirects are not followed (a redirect could point anywhere), and the
receiver's response body is never read or stored: only the status, the timing and an error are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

SIGNATURE_HEADER = "X-QuantFleet-Signature"
EVENT_HEADER = "X-QuantFleet-Event"
DELIVERY_HEADER = "X-QuantFleet-Delivery"
EVENTS = ("job.succeeded", "job.failed", "job.gate_failed")
DEFAULT_TOLERANCE_S = 300
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.azure.internal", "instance-data"}
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254", "169.254.169.254", "169.254.170.2")
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses embedded in IPv6 by NAT64 gateways

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookError(ValueError):
    """A webhook that cannot be registered or delivered to; the message says what to change."""


class SignatureError(ValueError):
    """A signature header that does not prove the body came from the holder of the secret."""


# --- signing --------------------------------------------------------------------------------------------


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """The signature header value for `body`, e.g. 't=1767225600,v1=5f0c...'."""
    if not secret:
        raise WebhookError("a webhook secret must not be empty")
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str | None,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check `header` against `body`; return its timestamp, or raise SignatureError saying what is wrong.

    Accepts several `v1=` entries (a sender rotating secrets signs with both). Comparison is constant-time.
    """
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError as e:
                raise SignatureError(f"timestamp t={value!r} is not an integer") from e
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError(f"{SIGNATURE_HEADER} must look like 't=<unix seconds>,v1=<hex>'")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        raise SignatureError(
            f"timestamp is {age:.0f} s away from now (tolerance {tolerance_s} s): possible replay"
        )
    expected = _digest(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise SignatureError("no v1 signature matches the body and secret")
    return timestamp


def encode_event(
    event: str, data: Mapping[str, Any], *, delivery_id: str | None = None, at: datetime | None = None
) -> bytes:
    """The JSON body of one event: {"id", "type", "created_at", "data"}; the same bytes on every retry."""
    if event not in EVENTS:
        raise WebhookError(f"event {event!r} is unknown; webhooks can subscribe to {', '.join(EVENTS)}")
    envelope = {
        "id": delivery_id or uuid.uuid4().hex,
        "type": event,
        "created_at": (at or datetime.now(UTC)).astimezone(UTC).isoformat(),
        "data": dict(data),
    }
    return json.dumps(envelope, sort_keys=True, separators=(",", ":"), default=str).encode()


def check_events(events: list[str]) -> list[str]:
    """The subscribed events, deduplicated in EVENTS order; WebhookError for an unknown or empty list."""
    unknown = [e for e in events if e not in EVENTS]
    if unknown or not events:
        raise WebhookError(
            f"events {unknown or events!r} not allowed; subscribe to one or more of: {', '.join(EVENTS)}"
        )
    return [e for e in EVENTS if e in events]


# --- URL policy -----------------------------------------------------------------------------------------

Resolve = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    """The host's addresses in the resolver's order of preference, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_networks(values: Iterable[str | Network]) -> tuple[Network, ...]:
    """CIDR strings (or networks) as networks; ValueError naming the one that is not a network."""
    networks = []
    for value in values:
        try:
            networks.append(
                ipaddress.ip_network(value.strip() if isinstance(value, str) else value, strict=False)
            )
        except ValueError as e:
            raise ValueError(f"{value!r} is not a network in CIDR form such as 10.20.0.0/16 ({e})") from e
    return tuple(networks)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address.sixtofour:
        return address.sixtofour
    if address.teredo:
        return address.teredo[1]
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _refusal(
    address: Address, allow_loopback: bool, allowed_networks: tuple[Network, ...] = ()
) -> str | None:
    """Why the service may not connect to `address`, or None if it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return None if allow_loopback else "loopback (this machine)"
    if any(address in network for network in allowed_networks):
        return None
    if address.is_link_local:
        return "link-local (cloud metadata lives there)"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_reserved:
        return "reserved"
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return "a site-local (private) address"
        inner = _embedded_ipv4(address)
        if inner is not None:
            reason = _refusal(inner, allow_loopback, allowed_networks)
            if reason:
                return f"an IPv6 form of {inner}, {reason}"
    if address.is_private or not address.is_global:
        return "a private or otherwise non-public address"
    return None


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL and the address the connection must go to (no second lookup)."""

    url: str
    host: str  # lower-case, no trailing dot; the TLS server name and the Host header's host
    port: int
    address: str  # the checked IP address


def resolve_webhook_target(
    url: str,
    *,
    allow_loopback: bool = False,
    allowed_networks: Iterable[Network] = (),
    resolve: Resolve = _resolve,
) -> WebhookTarget:
    """Resolve `url`'s host once and check every address it resolves to; WebhookError saying why the
    service may not POST there. The connection is then made to `address` (see `pinned_request`)."""
    networks = tuple(allowed_networks)
    parts = urlsplit(url.strip() if isinstance(url, str) else "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"webhook URL {url!r} must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise WebhookError(
            "webhook URL must not carry credentials; the HMAC signature authenticates the service"
        )
    host = parts.hostname.rstrip(".").lower()
    if host in METADATA_HOSTS:
        raise WebhookError(f"webhook host {host!r} is a cloud metadata service; use a receiver's address")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise WebhookError(f"webhook URL {url!r} has an invalid port") from e
    try:
        addresses = [host] if _is_ip(host) else resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise WebhookError(f"webhook host {host!r} does not resolve ({e}); check the URL") from e
    if not addresses:
        raise WebhookError(f"webhook host {host!r} has no address; check the URL")
    for text in addresses:
        reason = _refusal(ipaddress.ip_address(text.split("%")[0]), allow_loopback, networks)
        if reason:
            raise WebhookError(
                f"webhook host {host!r} resolves to {text}, {reason}; webhooks may only target public "
                "addresses (an operator can allow a network with QF_WEBHOOK_ALLOWED_NETWORKS)"
            )
    return WebhookTarget(url.strip(), host, port, addresses[0].split("%")[0])


def check_webhook_url(
    url: str,
    *,
    allow_loopback: bool = False,
    allowed_networks: Iterable[Network] = (),
    resolve: Resolve = _resolve,
) -> str:
    """Return `url` if the service may POST to it; WebhookError saying why not otherwise."""
    return resolve_webhook_target(
        url, allow_loopback=allow_loopback, allowed_networks=allowed_networks, resolve=resolve
    ).url


def pinned_request(target: WebhookTarget) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """(URL with the checked address as its host, Host header, request extensions): the request goes to
    `target.address` while the receiver still sees its own name in Host and, for https, in the TLS server
    name, against which its certificate is verified."""
    original = httpx.URL(target.url)
    pinned = original.copy_with(host=target.address)
    extensions: dict[str, Any] = {"sni_hostname": original.host} if original.scheme == "https" else {}
    return pinned, {"Host": original.netloc.decode("ascii")}, extensions


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- delivery -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    initial_backoff_s: float = 2.0
    multiplier: float = 2.0
    max_backoff_s: float = 300.0
    timeout_s: float = 10.0  # per attempt: connect + read


def next_backoff(policy: RetryPolicy, attempt: int, retry_after_s: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based); a receiver's Retry-After is honoured
    up to max_backoff_s."""
    delay = min(policy.initial_backoff_s * policy.multiplier ** (attempt - 1), policy.max_backoff_s)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, policy.max_backoff_s))
    return delay


@dataclass(frozen=True)
class DeliveryAttempt:
    delivery_id: str
    attempt: int  # 1-based
    url: str
    started_at: datetime
    duration_s: float
    status_code: int | None  # None when no HTTP response came back
    ok: bool  # a 2xx response
    error: str | None  # why it failed, for people reading the delivery log (never the receiver's body)
    retry_after_s: float | None = None


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    attempts: list[DeliveryAttempt]


def attempt_delivery(
    url: str,
    secret: str,
    event: str,
    body: bytes,
    *,
    delivery_id: str,
    attempt: int,
    timeout_s: float = RetryPolicy.timeout_s,
    allow_loopback: bool = False,
    allowed_networks: Iterable[Network] = (),
    client: httpx.Client | None = None,
    resolve: Resolve = _resolve,
) -> DeliveryAttempt:
    """One signed POST of `body` to the address checked just before (see `resolve_webhook_target`).
    Never raises for receiver or network trouble: that is the result. The response body is not read."""
    started_at = datetime.now(UTC)
    start = time.perf_counter()

    def result(
        status: int | None, ok: bool, error: str | None, retry_after: float | None = None
    ) -> DeliveryAttempt:
        return DeliveryAttempt(
            delivery_id,
            attempt,
            url,
            started_at,
            time.perf_counter() - start,
            status,
            ok,
            error,
            retry_after,
        )

    try:
        target = resolve_webhook_target(
            url, allow_loopback=allow_loopback, allowed_networks=allowed_networks, resolve=resolve
        )
        pinned, host_header, extensions = pinned_request(target)
    except (WebhookError, httpx.InvalidURL) as e:
        return result(None, False, str(e))
    headers = {
        **host_header,
        "Content-Type": "application/json",
        "User-Agent": "QuantFleet-Webhooks/1",
        "Connection": "close",  # a connection verified for one name is never reused for another
        SIGNATURE_HEADER: sign(secret, body),
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
    }
    own_client = client is None
    http = client or httpx.Client(timeout=timeout_s, follow_redirects=False)
    try:
        request = http.build_request(
            "POST", pinned, content=body, headers=headers, timeout=timeout_s, extensions=extensions
        )
        response = http.send(request, stream=True, follow_redirects=False)
        response.close()  # the body is never read: it is not ours to keep or show
    except httpx.TimeoutException as e:
        return result(None, False, f"timed out after {timeout_s:g} s ({type(e).__name__})")
    except httpx.ProtocolError as e:  # its message may quote what the receiver sent: not shown
        return result(None, False, f"{type(e).__name__}: the receiver's reply was not valid HTTP")
    except httpx.HTTPError as e:
        return result(None, False, f"{type(e).__name__}: {e}")
    finally:
        if own_client:
            http.close()
    if response.is_success:
        return result(response.status_code, True, None)
    error = f"HTTP {response.status_code}"
    if response.is_redirect:
        error += " redirect (not followed: register the final URL)"
    return result(response.status_code, False, error, _retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from webhook receivers; plain backoff applies


def deliver(
    url: str,
    secret: str,
    event: str,
    data: Mapping[str, Any],
    *,
    policy: RetryPolicy = RetryPolicy(),
    on_attempt: Callable[[DeliveryAttempt], None] = lambda _: None,
    delivery_id: str | None = None,
    allow_loopback: bool = False,
    allowed_networks: Iterable[Network] = (),
    sleep: Callable[[float], None] = time.sleep,
    resolve: Resolve = _resolve,
) -> DeliveryResult:
    """Deliver one event, retrying any non-2xx answer or network failure with exponential backoff until it
    succeeds or `policy.max_attempts` is spent. The body (and its id) is the same on every attempt, so
    receivers can deduplicate on the X-QuantFleet-Delivery header; only the signature timestamp changes."""
    delivery_id = delivery_id or uuid.uuid4().hex
    body = encode_event(event, data, delivery_id=delivery_id)
    attempts: list[DeliveryAttempt] = []
    with httpx.Client(timeout=policy.timeout_s, follow_redirects=False) as client:
        for number in range(1, policy.max_attempts + 1):
            outcome = attempt_delivery(
                url,
                secret,
                event,
                body,
                delivery_id=delivery_id,
                attempt=number,
                timeout_s=policy.timeout_s,
                allow_loopback=allow_loopback,
                allowed_networks=allowed_networks,
                client=client,
                resolve=resolve,
            )
            attempts.append(outcome)
            on_attempt(outcome)
            if outcome.ok:
                return DeliveryResult(True, attempts)
            if number < policy.max_attempts:
                sleep(next_backoff(policy, number, outcome.retry_after_s))
    return DeliveryResult(False, attempts)
