"""Prepared calibration tokens, cached in object storage by content hash, so the jobs of a batch that
share a model (tokenizer) and a calibration set tokenize it once instead of once per job.

Key: sha256 over everything the token windows depend on — the calibration file's bytes, the
tokenizer's files, num_samples, seq_len, seed and the transformers version (tokenization can change
between releases) — stored as `cache/calibration/<hash>.safetensors` (safetensors: loading it runs no
code, unlike a pickled tensor). Same inputs → same key → same tokens, whichever worker built them.

Jobs of a batch usually start together, so a plain get-or-build would have every one of them miss and
tokenize. The first to miss therefore takes a build lock (`<key>.lock`, created with an atomic
create-if-absent: O_EXCL locally, a conditional write on S3) and the others wait for the object to appear.
A lock older than `stale_after_s` (its builder died) is broken; a waiter that runs out of patience builds
the tensor itself. Either way the outcome is the same bytes, so the worst case is duplicated work, never a
wrong result. A cached object that cannot be read or has the wrong shape is rebuilt and overwritten, so a
corrupted cache costs one tokenization, never a failed job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from workers.calibration import calibration_windows
from workers.errors import InputError
from workers.spec import CalibrationSpec
from workers.storage import ObjectStore, join_key

log = logging.getLogger("quantfleet.calibration_cache")

CACHE_PREFIX = "cache/calibration"
KEY_VERSION = b"quantfleet-calibration/1"
# Files that decide how text becomes tokens (generation_config, chat templates do not).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
TENSOR_NAME = "input_ids"

CalibrationProvider = Callable[[CalibrationSpec, PreTrainedTokenizerBase], Tensor]


def _update_with_file(digest: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * 1024 * 1024), b""):
            digest.update(chunk)


def calibration_hash(spec: CalibrationSpec, tokenizer_dir: str | Path) -> str:
    """Content hash of everything the calibration windows depend on (see module docstring)."""
    if spec.path is None:
        raise InputError("no calibration file was given")
    calibration = Path(spec.path)
    if not calibration.is_file():
        raise InputError(f"calibration file {calibration} does not exist")
    directory = Path(tokenizer_dir)
    tokenizer_files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not tokenizer_files:
        raise InputError(f"{directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    digest = hashlib.sha256(KEY_VERSION)
    for field, value in (
        ("num_samples", spec.num_samples),
        ("seq_len", spec.seq_len),
        ("seed", spec.seed),
        ("transformers", transformers.__version__),
    ):
        digest.update(f"\0{field}={value}".encode())
    digest.update(b"\0calibration\0")
    _update_with_file(digest, calibration)
    for path in tokenizer_files:  # name and bytes, in a fixed order
        digest.update(f"\0tokenizer:{path.name}\0".encode())
        _update_with_file(digest, path)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedCalibration:
    tokens: Tensor  # [num_samples, seq_len] int64
    key: str
    hit: bool  # True when read from the cache, False when built (and stored) now


class CalibrationCache:
    """Get-or-build of calibration windows through an ObjectStore."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str = CACHE_PREFIX,
        *,
        wait_s: float = 600.0,
        stale_after_s: float = 900.0,
        poll_s: float = 0.2,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.wait_s, self.stale_after_s, self.poll_s = wait_s, stale_after_s, poll_s

    def key(self, spec: CalibrationSpec, tokenizer_dir: str | Path) -> str:
        return join_key(self.prefix, f"{calibration_hash(spec, tokenizer_dir)}.safetensors")

    def get_or_build(
        self, spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: str | Path
    ) -> CachedCalibration:
        key = self.key(spec, tokenizer_dir)
        lock = f"{key}.lock"
        deadline = time.monotonic() + self.wait_s
        while True:
            cached = self._read(key, spec)
            if cached is not None:
                return CachedCalibration(cached, key, hit=True)
            if self._acquire(lock):
                try:
                    cached = self._read(key, spec)  # built while we were taking the lock
                    if cached is not None:
                        return CachedCalibration(cached, key, hit=True)
                    return CachedCalibration(self._build(key, spec, tokenizer), key, hit=False)
                finally:
                    self._release(lock)
            if time.monotonic() > deadline:
                log.warning("waited %.0f s for calibration cache %s; tokenizing here", self.wait_s, key)
                return CachedCalibration(self._build(key, spec, tokenizer), key, hit=False)
            time.sleep(self.poll_s)

    def _build(self, key: str, spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase) -> Tensor:
        tokens = calibration_windows(spec, tokenizer)
        metadata = {
            "num_samples": str(spec.num_samples),
            "seq_len": str(spec.seq_len),
            "seed": str(spec.seed),
        }
        self.store.put_bytes(key, save_safetensors({TENSOR_NAME: tokens.contiguous()}, metadata=metadata))
        return tokens

    def _acquire(self, lock: str) -> bool:
        """True if this worker may build: it took the lock, or the store cannot lock (then everyone builds)."""
        create = getattr(self.store, "create_exclusive", None)
        if create is None:
            return True
        stamp = json.dumps({"holder": f"{socket.gethostname()}:{os.getpid()}", "at": time.time()}).encode()
        if create(lock, stamp):
            return True
        try:
            held_since = float(json.loads(self.store.get_bytes(lock))["at"])
        except Exception:  # released meanwhile, or half-written: look again next round
            return False
        if time.time() - held_since > self.stale_after_s:
            log.warning("breaking stale calibration cache lock %s", lock)
            self._release(lock)
            return bool(create(lock, stamp))
        return False

    def _release(self, lock: str) -> None:
        delete = getattr(self.store, "delete", None)
        if delete is not None:
            delete(lock)

    def provider(self, tokenizer_dir: str | Path) -> CalibrationProvider:
        """A drop-in for `workers.calibration.calibration_windows` that goes through this cache."""

        def windows(spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase) -> Tensor:
            return self.get_or_build(spec, tokenizer, tokenizer_dir).tokens

        return windows

    def _read(self, key: str, spec: CalibrationSpec) -> Tensor | None:
        if not self.store.exists(key):
            return None
        try:
            tokens = load_safetensors(self.store.get_bytes(key))[TENSOR_NAME]
        except Exception as exc:  # any unreadable object: rebuild rather than fail the job
            log.warning("calibration cache object %s is unreadable (%s); rebuilding it", key, exc)
            return None
        if (
            tokens.dtype != torch.long
            or tokens.dim() != 2
            or tokens.shape != (spec.num_samples, spec.seq_len)
        ):
            log.warning(
                "calibration cache object %s has shape %s %s; rebuilding it",
                key,
                tuple(tokens.shape),
                tokens.dtype,
            )
            return None
        return tokens
