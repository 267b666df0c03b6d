"""Object storage the engine writes artifacts through: a local directory (embedded default) or S3.

Keys are '/'-separated relative paths (never absolute, never containing '..'), so a key can never
escape the store's root or prefix. Writes are whole-object replacements: re-running a job overwrites
the same keys, which is what makes at-least-once execution safe.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlparse

from workers.errors import InputError

MULTIPART_THRESHOLD = 8 * 1024 * 1024  # files above this go up in parts (S3 minimum part is 5 MiB)
MULTIPART_CHUNK = 8 * 1024 * 1024


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def uri(self, key: str) -> str: ...


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative object key; raise InputError saying what is wrong otherwise."""
    if not key or key.startswith("/") or "\\" in key:
        raise InputError(f"object key {key!r} must be a non-empty relative path with '/' separators")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InputError(f"object key {key!r} must not contain '.', '..' or empty segments")
    return key


def join_key(*parts: str) -> str:
    """Join key segments, ignoring empty ones: join_key("", "jobs/1", "a.json") == "jobs/1/a.json"."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class LocalStore:
    """Objects as files under `root`. Each write lands in a temp file first, then an atomic rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_atomically(self, key: str, write: Any) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:
            self._write_atomically(key, lambda dst: shutil.copyfileobj(src, dst, 4 * 1024 * 1024))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(key, lambda dst: dst.write(data))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise InputError(f"object {self.uri(key)} does not exist")
        return path.read_bytes()

    def download_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise InputError(f"object {self.uri(key)} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist yet; True if this call created it. An atomic test-and-set
        (O_EXCL), which is what a lock between workers sharing the store needs."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def delete(self, key: str) -> None:
        """Remove `key` if it exists."""
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        sub = check_key(prefix.strip("/")) if prefix.strip("/") else ""
        base = self.root / sub if sub else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if not PurePosixPath(k).name.startswith("."))

    def uri(self, key: str) -> str:
        return str(self._path(key))


class S3Store:
    """Objects in one S3 bucket under a key prefix. Credentials and region come from the standard AWS
    variables; `endpoint_url` (or AWS_ENDPOINT_URL) points at MinIO, moto or another S3-compatible server."""

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any | None = None
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        if not bucket:
            raise InputError("S3 store needs a bucket name (s3://BUCKET/prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.client: Any = client or boto3.client(
            "s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK
        )

    def _key(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey as e:
            raise InputError(f"object {self.uri(key)} does not exist") from e

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.exists(key):
            raise InputError(f"object {self.uri(key)} does not exist")
        self.client.download_file(self.bucket, self._key(key), str(path), Config=self._transfer)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist yet (S3 conditional write, If-None-Match: *); True if this
        call created it."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def delete(self, key: str) -> None:
        """Remove `key` if it exists (deleting a missing object is not an error in S3)."""
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> list[str]:
        sub = check_key(prefix.strip("/")) if prefix.strip("/") else ""
        under = join_key(self.prefix, sub)
        full = f"{under}/" if under else ""
        strip = len(f"{self.prefix}/") if self.prefix else 0
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(url: str, *, endpoint_url: str | None = None) -> LocalStore | S3Store:
    """Store for `url`: `s3://bucket/prefix` → S3Store, a directory path or `file://` URL → LocalStore."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and url[1:3] in (":\\", ":/")):
        return LocalStore(url)
    raise InputError(f"object store {url!r} is not supported; use a directory path or s3://bucket/prefix")
