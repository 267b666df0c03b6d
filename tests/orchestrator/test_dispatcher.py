"""The dispatcher with the in-process thread executor and the real engine on a tiny model: success with
a verified manifest, cancellation at a layer boundary, retry of a transient failure, no retry of bad input."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import boto3

from orchestrator.db import transaction
from orchestrator.dispatcher import Dispatcher, start_in_thread
from orchestrator.executors import ThreadExecutor
from orchestrator.queue import crud
from orchestrator.queue.models import Job
from tests.helpers import make_tiny_llama
from tests.orchestrator.support import (
    artifacts,
    check_manifest,
    events,
    gptq_body,
    load_job,
    service_settings,
    sessions_for,
    submit,
    wait_for,
    wait_for_quantizing,
    wait_for_state,
)
from workers.storage import LocalStore, S3Store


def running(dispatcher: Dispatcher) -> tuple[threading.Thread, threading.Event]:
    return start_in_thread(dispatcher)


def stop(worker: tuple[threading.Thread, threading.Event]) -> None:
    thread, event = worker
    event.set()
    thread.join(timeout=30)


def test_job_succeeds_with_metrics_events_and_verified_manifest(
    database_url: str, allowed_root: Path, tiny_assets: dict, tmp_path: Path
) -> None:
    settings = service_settings(database_url, allowed_root, tmp_path)
    sessions = sessions_for(database_url)
    job_id = submit(sessions, gptq_body(tiny_assets, base_model="example/tiny-llama"), settings)
    worker = running(Dispatcher(sessions, ThreadExecutor(1), settings, name="d1"))
    try:
        job = wait_for_state(sessions, job_id, {"succeeded", "failed"}, timeout=120)
    finally:
        stop(worker)
    assert job.state == "succeeded", job.error
    assert job.attempts == 1 and job.lease_owner is None and job.error is None
    metrics = job.result["eval"]
    assert metrics["windows"] == 20 and metrics["ppl_quantized"] > 0 and 0 <= metrics["top1_agreement"] <= 1
    assert job.result["method"] == "gptq" and job.result["bits"] == 4

    store = LocalStore(settings.object_store)
    manifest = check_manifest(store, f"jobs/{job_id}")
    assert job.output_uri == str(Path(settings.object_store).resolve() / "jobs" / job_id)
    rows = {a.path: a for a in artifacts(sessions, job_id)}
    assert set(rows) == {f["path"] for f in manifest["files"]} | {"manifest.json"}
    for entry in manifest["files"]:
        assert (rows[entry["path"]].sha256, rows[entry["path"]].bytes) == (entry["sha256"], entry["bytes"])
    manifest_bytes = store.get_bytes(f"jobs/{job_id}/manifest.json")
    assert rows["manifest.json"].sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert {"model.safetensors", "config.json", "eval.json", "README.md"} <= set(rows)
    card = store.get_bytes(f"jobs/{job_id}/README.md").decode()
    assert 'base_model: "example/tiny-llama"' in card and "base_model_relation: quantized" in card
    assert f"{metrics['ppl_quantized']:.4f}" in card

    history = events(sessions, job_id)
    assert [e.state for e in history if e.kind == "state"] == ["queued", "running", "succeeded"]
    [attempt] = [e for e in history if e.kind == "attempt"]
    assert attempt.attempt == 1 and attempt.data["pid"] > 0
    stages = [e.stage for e in history if e.kind == "progress"]
    assert stages[0] == "load" and stages[-1] == "done"
    assert {"quantize", "evaluate", "upload"} <= set(stages)
    quantize_layers = {(e.layer, e.num_layers) for e in history if e.stage == "quantize"}
    assert quantize_layers == {(0, 2), (1, 2)}


def test_cancel_stops_a_running_job_at_a_layer_boundary(
    database_url: str, allowed_root: Path, tiny_assets: dict, tmp_path: Path
) -> None:
    settings = service_settings(database_url, allowed_root, tmp_path)
    sessions = sessions_for(database_url)
    slow = make_tiny_llama(
        allowed_root / f"cancel-{tmp_path.name}", num_layers=8, seed=2, hidden_size=128, intermediate_size=256
    )
    body = gptq_body({**tiny_assets, "slow": slow}, model="slow", eval_=False)
    body["calibration"]["num_samples"] = 64
    job_id = submit(sessions, body, settings)
    worker = running(Dispatcher(sessions, ThreadExecutor(1), settings))
    try:
        wait_for_quantizing(sessions, job_id, timeout=60)
        with transaction(sessions) as s:
            assert crud.request_cancel(s, s.get(Job, job_id)).state == "cancelling"
        job = wait_for_state(sessions, job_id, {"cancelled", "succeeded", "failed"}, timeout=60)
    finally:
        stop(worker)
    assert job.state == "cancelled"
    layers = {e.layer for e in events(sessions, job_id) if e.stage == "quantize"}
    assert max(layers) < 7  # stopped before the last layer
    assert LocalStore(settings.object_store).list(f"jobs/{job_id}") == []  # nothing published
    assert artifacts(sessions, job_id) == []


def test_transient_failure_is_retried(
    database_url: str, allowed_root: Path, tiny_assets: dict, tmp_path: Path, s3_endpoint: str
) -> None:
    """The first attempt fails to upload (the bucket does not exist yet); once it exists, a retry succeeds."""
    bucket = f"late-{tmp_path.name[-20:].lower().replace('_', '-')}"
    settings = service_settings(
        database_url,
        allowed_root,
        tmp_path,
        object_store=f"s3://{bucket}/runs",
        s3_endpoint_url=s3_endpoint,
        retry_backoff_seconds=1.0,
    )
    sessions = sessions_for(database_url)
    job_id = submit(sessions, gptq_body(tiny_assets, eval_=False), settings)
    worker = running(Dispatcher(sessions, ThreadExecutor(1), settings))
    try:
        wait_for(lambda: load_job(sessions, job_id).error, 60, "the first attempt to fail")
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
        job = wait_for_state(sessions, job_id, {"succeeded", "failed"}, timeout=60)
    finally:
        stop(worker)
    assert job.state == "succeeded" and job.attempts == 2
    retry = [e for e in events(sessions, job_id) if e.state == "queued" and e.attempt == 1]
    assert len(retry) == 1 and "NoSuchBucket" in retry[0].message
    check_manifest(S3Store(bucket, "runs", endpoint_url=s3_endpoint), f"jobs/{job_id}")
    assert job.output_uri == f"s3://{bucket}/runs/jobs/{job_id}"


def test_bad_input_found_at_run_time_fails_without_retry(
    database_url: str, allowed_root: Path, tiny_assets: dict, tmp_path: Path
) -> None:
    settings = service_settings(database_url, allowed_root, tmp_path)
    sessions = sessions_for(database_url)
    doomed = shutil.copytree(tiny_assets["model"], allowed_root / f"doomed-{tmp_path.name}")
    job_id = submit(sessions, gptq_body({**tiny_assets, "doomed": doomed}, model="doomed"), settings)
    shutil.rmtree(doomed)  # the model disappears between submission and run
    worker = running(Dispatcher(sessions, ThreadExecutor(1), settings))
    try:
        job = wait_for_state(sessions, job_id, {"succeeded", "failed"}, timeout=60)
    finally:
        stop(worker)
    assert job.state == "failed" and job.attempts == 1
    assert "does not exist" in job.error or "no config.json" in job.error
