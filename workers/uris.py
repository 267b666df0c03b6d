"""Model and data URIs are user input: resolve them only inside an allow-list (no SSRF, no path escapes).

Accepted: absolute local paths (or `file://` URLs) under one of the allowed roots, after resolving
symlinks, and `s3://bucket/key` in one of the allowed buckets. Everything else (http, ftp, relative
paths, other buckets, `..` segments) is refused with a message that says what would be accepted.
S3 inputs are copied into a local cache before the engine reads them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from workers.errors import InputError
from workers.storage import S3Store


@dataclass(frozen=True)
class InputPolicy:
    """Where job inputs may come from."""

    allowed_roots: tuple[Path, ...] = ()
    allowed_buckets: tuple[str, ...] = ()
    s3_endpoint_url: str | None = None

    def describe(self) -> str:
        roots = ", ".join(str(r) for r in self.allowed_roots) or "none"
        buckets = ", ".join(f"s3://{b}" for b in self.allowed_buckets) or "none"
        return f"allowed local roots: {roots}; allowed buckets: {buckets}"


@dataclass(frozen=True)
class LocalInput:
    path: Path


@dataclass(frozen=True)
class S3Input:
    bucket: str
    key: str  # no leading or trailing '/'
    uri: str = field(compare=False)


def parse_input_uri(uri: str, policy: InputPolicy, *, what: str = "input") -> LocalInput | S3Input:
    """Check `uri` against `policy` without touching it (beyond resolving local symlinks)."""
    if not isinstance(uri, str) or not uri.strip():
        raise InputError(f"{what} URI is empty; give an absolute path or s3://bucket/key")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _parse_s3(uri, parsed.netloc, parsed.path, policy, what)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"{what} URI {uri!r}: file:// URLs must not name a host")
        return _parse_local(uri, parsed.path, policy, what)
    if parsed.scheme == "":
        return _parse_local(uri, uri, policy, what)
    raise InputError(
        f"{what} URI {uri!r} uses scheme '{parsed.scheme}', which is not allowed; use an absolute local path "
        f"or s3://bucket/key ({policy.describe()})"
    )


def _parse_local(uri: str, raw_path: str, policy: InputPolicy, what: str) -> LocalInput:
    path = Path(raw_path)
    if not path.is_absolute():
        raise InputError(f"{what} path {uri!r} is relative; give an absolute path ({policy.describe()})")
    resolved = path.resolve()
    for root in policy.allowed_roots:
        if resolved.is_relative_to(root.resolve()):
            return LocalInput(resolved)
    raise InputError(f"{what} path {uri!r} is outside the allowed roots ({policy.describe()})")


def _parse_s3(uri: str, bucket: str, raw_key: str, policy: InputPolicy, what: str) -> S3Input:
    key = raw_key.strip("/")
    if not bucket or not key:
        raise InputError(f"{what} URI {uri!r} must look like s3://bucket/key")
    if any(part in ("..", ".") for part in key.split("/")):
        raise InputError(f"{what} URI {uri!r} must not contain '.' or '..' segments")
    if bucket not in policy.allowed_buckets:
        raise InputError(f"{what} URI {uri!r}: bucket '{bucket}' is not allowed ({policy.describe()})")
    return S3Input(bucket, key, uri)


def check_input_exists(uri: str, policy: InputPolicy, *, kind: str, what: str) -> LocalInput | S3Input:
    """Parse and check that the input is there: `kind` is "dir" (a model: needs config.json) or "file"."""
    return check_parsed_input_exists(uri, parse_input_uri(uri, policy, what=what), policy, kind=kind, what=what)


def check_parsed_input_exists(
    uri: str, parsed: LocalInput | S3Input, policy: InputPolicy, *, kind: str, what: str
) -> LocalInput | S3Input:
    """check_input_exists for `uri` already parsed (by parse_input_uri) into `parsed`."""
    if isinstance(parsed, LocalInput):
        if kind == "dir" and not (parsed.path / "config.json").is_file():
            raise InputError(f"{what} {uri!r} is not a model directory (no config.json at {parsed.path})")
        if kind == "file" and not parsed.path.is_file():
            raise InputError(f"{what} file {uri!r} does not exist")
        return parsed
    store = S3Store(parsed.bucket, endpoint_url=policy.s3_endpoint_url)
    probe = f"{parsed.key}/config.json" if kind == "dir" else parsed.key
    if not store.exists(probe):
        raise InputError(f"{what} {uri!r} does not exist (no object {store.uri(probe)})")
    return parsed


def materialize(uri: str, policy: InputPolicy, cache_dir: Path, *, kind: str, what: str = "input") -> Path:
    """Local path to read `uri` from: the path itself, or a cached copy of the S3 object(s).

    The cache entry is keyed by the URI and only marked complete after every object arrived, so a
    worker killed halfway re-downloads instead of reading a partial model.
    """
    parsed = parse_input_uri(uri, policy, what=what)
    if isinstance(parsed, LocalInput):
        return parsed.path
    store = S3Store(parsed.bucket, endpoint_url=policy.s3_endpoint_url)
    entry = cache_dir / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    target = entry / PurePosixPath(parsed.key).name
    done = entry / ".complete"
    if done.is_file():
        return target
    if kind == "file":
        store.download_file(parsed.key, target)
    else:
        keys = store.list(parsed.key)
        if not keys:
            raise InputError(f"{what} {uri!r} holds no objects")
        for key in keys:
            store.download_file(key, target / key[len(parsed.key) + 1 :])
    done.touch()
    return target
