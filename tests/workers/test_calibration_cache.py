"""Calibration tokens cached by content hash: the second job reads instead of tokenizing, every input
that changes the tokens changes the key, and a corrupt cache object is rebuilt."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import workers.calibration_cache as cc
from tests.helpers import make_tokenizer, write_text_corpus
from workers.calibration import calibration_windows
from workers.calibration_cache import CalibrationCache, calibration_hash
from workers.errors import InputError
from workers.loading import load_tokenizer
from workers.spec import CalibrationSpec
from workers.storage import LocalStore, S3Store


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    tokenizer_dir = tmp_path / "model"
    make_tokenizer().save_pretrained(tokenizer_dir)
    return tokenizer_dir, write_text_corpus(tmp_path / "calibration.txt", 3000, seed=0)


def _no_tokenizing(*_: object) -> torch.Tensor:
    raise AssertionError("the cache was hit, so nothing should be tokenized")


def test_second_job_reads_the_cached_tokens_without_tokenizing(
    inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer_dir, text = inputs
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = CalibrationSpec(path=str(text), num_samples=8, seq_len=32, seed=3)
    store = LocalStore(tmp_path / "objects")
    first = CalibrationCache(store).get_or_build(spec, tokenizer, tokenizer_dir)
    assert not first.hit and first.tokens.shape == (8, 32) and first.tokens.dtype == torch.long
    assert torch.equal(first.tokens, calibration_windows(spec, tokenizer))
    assert store.list("cache/calibration") == [first.key]
    assert first.key == f"cache/calibration/{calibration_hash(spec, tokenizer_dir)}.safetensors"

    monkeypatch.setattr(cc, "calibration_windows", _no_tokenizing)
    second = CalibrationCache(LocalStore(tmp_path / "objects")).get_or_build(spec, tokenizer, tokenizer_dir)
    assert second.hit and second.key == first.key and torch.equal(second.tokens, first.tokens)
    provided = CalibrationCache(store).provider(tokenizer_dir)(spec, tokenizer)
    assert torch.equal(provided, first.tokens)


def test_every_input_of_the_tokens_is_in_the_key(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    tokenizer_dir, text = inputs
    base = CalibrationSpec(path=str(text), num_samples=8, seq_len=32, seed=0)
    key = calibration_hash(base, tokenizer_dir)
    assert len(key) == 64 and calibration_hash(base, tokenizer_dir) == key
    for changed in (
        CalibrationSpec(path=str(text), num_samples=9, seq_len=32, seed=0),
        CalibrationSpec(path=str(text), num_samples=8, seq_len=33, seed=0),
        CalibrationSpec(path=str(text), num_samples=8, seq_len=32, seed=1),
    ):
        assert calibration_hash(changed, tokenizer_dir) != key
    # Same bytes elsewhere: same key (content, not path). One byte more: another key.
    copy = shutil.copy(text, tmp_path / "elsewhere.txt")
    assert calibration_hash(CalibrationSpec(path=str(copy), num_samples=8, seq_len=32), tokenizer_dir) == key
    Path(copy).write_text(Path(copy).read_text() + "ba")
    assert calibration_hash(CalibrationSpec(path=str(copy), num_samples=8, seq_len=32), tokenizer_dir) != key
    # A different tokenizer: another key.
    other_tok = tmp_path / "other-model"
    shutil.copytree(tokenizer_dir, other_tok)
    config = other_tok / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"<s>"', '"</s>"', 1))
    assert calibration_hash(base, other_tok) != key


def test_shared_through_s3_between_two_workers(
    inputs: tuple[Path, Path], s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer_dir, text = inputs
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = CalibrationSpec(path=str(text), num_samples=4, seq_len=64, seed=0)
    worker_a = CalibrationCache(S3Store(s3_bucket, "qf", endpoint_url=s3_endpoint))
    built = worker_a.get_or_build(spec, tokenizer, tokenizer_dir)
    monkeypatch.setattr(cc, "calibration_windows", _no_tokenizing)
    worker_b = CalibrationCache(S3Store(s3_bucket, "qf", endpoint_url=s3_endpoint))
    read = worker_b.get_or_build(spec, tokenizer, tokenizer_dir)
    assert not built.hit and read.hit and torch.equal(read.tokens, built.tokens)
    assert worker_b.store.uri(read.key).startswith(f"s3://{s3_bucket}/qf/cache/calibration/")


@pytest.mark.parametrize("garbage", [b"not a safetensors file", "wrong-shape"])
def test_a_corrupt_cache_object_is_rebuilt(
    inputs: tuple[Path, Path], tmp_path: Path, garbage: object
) -> None:
    from safetensors.torch import save

    tokenizer_dir, text = inputs
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = CalibrationSpec(path=str(text), num_samples=4, seq_len=32, seed=0)
    cache = CalibrationCache(LocalStore(tmp_path / "objects"))
    key = cache.key(spec, tokenizer_dir)
    bad = garbage if isinstance(garbage, bytes) else save({"input_ids": torch.zeros(2, 32, dtype=torch.long)})
    cache.store.put_bytes(key, bad)
    got = cache.get_or_build(spec, tokenizer, tokenizer_dir)
    assert not got.hit and torch.equal(got.tokens, calibration_windows(spec, tokenizer))
    assert cache.get_or_build(spec, tokenizer, tokenizer_dir).hit  # the rebuilt object replaced the bad one


def test_missing_inputs_say_what_is_missing(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    tokenizer_dir, text = inputs
    with pytest.raises(InputError, match="no calibration file"):
        calibration_hash(CalibrationSpec(path=None), tokenizer_dir)
    with pytest.raises(InputError, match="does not exist"):
        calibration_hash(CalibrationSpec(path=str(tmp_path / "nope.txt")), tokenizer_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no tokenizer files"):
        calibration_hash(CalibrationSpec(path=str(text)), tmp_path / "empty")


def test_jobs_starting_together_tokenize_once(
    inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer_dir, text = inputs
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = CalibrationSpec(path=str(text), num_samples=4, seq_len=32, seed=0)
    builds: list[int] = []

    def slow_windows(*args: Any) -> torch.Tensor:
        builds.append(1)
        time.sleep(0.5)  # long enough that every other job misses the cache while this one builds
        return calibration_windows(*args)

    monkeypatch.setattr(cc, "calibration_windows", slow_windows)
    results: list[Any] = [None] * 3

    def job(i: int) -> None:  # each job opens its own store, as separate workers do
        cache = CalibrationCache(LocalStore(tmp_path / "objects"), poll_s=0.05)
        results[i] = cache.get_or_build(spec, tokenizer, tokenizer_dir)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(builds) == 1
    assert sorted(r.hit for r in results) == [False, True, True]
    assert all(torch.equal(r.tokens, results[0].tokens) for r in results)
    assert LocalStore(tmp_path / "objects").list("cache") == [results[0].key]  # the lock is gone


def test_a_stale_lock_is_broken_and_a_live_one_waited_for(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    tokenizer_dir, text = inputs
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = CalibrationSpec(path=str(text), num_samples=4, seq_len=32, seed=0)
    store = LocalStore(tmp_path / "objects")
    cache = CalibrationCache(store, wait_s=0.3, stale_after_s=60, poll_s=0.05)
    lock = cache.key(spec, tokenizer_dir) + ".lock"
    assert store.create_exclusive(lock, json.dumps({"at": time.time() - 3600}).encode())
    assert not store.create_exclusive(lock, b"{}")  # test-and-set: the second create fails
    built = cache.get_or_build(spec, tokenizer, tokenizer_dir)  # its builder died an hour ago
    assert not built.hit and not store.exists(lock)

    other = CalibrationSpec(path=str(text), num_samples=4, seq_len=32, seed=1)
    live = cache.key(other, tokenizer_dir) + ".lock"
    store.create_exclusive(live, json.dumps({"at": time.time()}).encode())
    started = time.monotonic()
    waited = cache.get_or_build(other, tokenizer, tokenizer_dir)  # the holder never finishes: build after wait_s
    assert not waited.hit and time.monotonic() - started >= 0.3
    assert store.exists(live)  # someone else's lock is not ours to remove
    store.delete(live)
    assert not store.exists(live)
    store.delete(live)  # deleting what is gone is fine


def test_s3_create_exclusive_is_a_conditional_write(s3_endpoint: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "qf", endpoint_url=s3_endpoint)
    assert store.create_exclusive("locks/a", b"1") and not store.create_exclusive("locks/a", b"2")
    assert store.get_bytes("locks/a") == b"1"
    store.delete("locks/a")
    assert not store.exists("locks/a") and store.create_exclusive("locks/a", b"3")
