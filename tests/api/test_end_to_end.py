"""End to end, the way a client sees it: submit over HTTP → the job runs on a real local Ray → succeeded
with metrics → the manifest in S3 (moto's server) lists every file, and every sha256 matches the bytes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import boto3
import httpx
import pytest

from api.embedded import serve_in_thread
from api.main import create_app
from orchestrator.auth import create_api_key
from orchestrator.db import make_engine, session_factory, transaction
from orchestrator.dispatcher import Dispatcher, start_in_thread
from orchestrator.settings import Settings


@pytest.mark.ray
def test_submit_over_http_run_on_ray_publish_to_s3(
    ray_cluster: None,
    clean_sqlite_url: str,
    allowed_root: Path,
    tiny_assets: dict,
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    from orchestrator.executors.ray_executor import RayExecutor

    settings = Settings(
        database_url=clean_sqlite_url,
        object_store=f"s3://{s3_bucket}/quantfleet",
        s3_endpoint_url=s3_endpoint,
        allowed_roots=[allowed_root],
        cache_dir=tmp_path / "cache",
        work_dir=tmp_path / "work",
        executor="ray",
        poll_seconds=0.1,
    )
    sessions = session_factory(make_engine(settings.database_url))
    with transaction(sessions) as s:
        token = create_api_key(s, owner="e2e", scopes=["submit", "read"])
    api = serve_in_thread(create_app(settings))
    dispatcher = start_in_thread(Dispatcher(sessions, RayExecutor(capacity=1), settings))
    try:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            body = {
                "model": str(tiny_assets["model"]),
                "method": "awq",
                "bits": 4,
                "group_size": 32,
                "calibration": {"uri": str(tiny_assets["calibration"]), "num_samples": 16, "seq_len": 64},
                "eval": {"uri": str(tiny_assets["eval"]), "seq_len": 64, "max_windows": 16},
                "output": {"formats": ["compressed-tensors", "gptq"]},
            }
            submitted = http.post("/v1/jobs", json=body)
            assert submitted.status_code == 202, submitted.text
            job_url = submitted.json()["url"]
            seen, deadline = set(), time.monotonic() + 180
            while (job := http.get(job_url).json())["state"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, f"job stuck in {job['state']}"
                if job["progress"]:
                    seen.add(job["progress"]["stage"])
                time.sleep(0.1)
            artifacts = http.get(f"{job_url}/artifacts").json()
            events = http.get(f"{job_url}/events").json()
    finally:
        dispatcher[1].set()
        dispatcher[0].join(timeout=60)
        api.stop()

    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"]["stage"] == "done"
    assert seen & {
        "load",
        "calibrate",
        "quantize",
        "evaluate",
        "upload",
    }  # progress was visible while running
    metrics = job["metrics"]
    assert metrics["windows"] == 16 and metrics["seq_len"] == 64
    assert metrics["ppl_original"] > 1 and metrics["ppl_quantized"] > 1 and 0 < metrics["top1_agreement"] <= 1
    assert job["report"]["bytes_quantized"] < job["report"]["bytes_original"]
    prefix = f"quantfleet/jobs/{job['id']}"
    assert job["output_uri"] == f"s3://{s3_bucket}/{prefix}"
    assert [e["state"] for e in events if e["kind"] == "state"] == ["queued", "running", "succeeded"]
    layers = {(e["layer"], e["num_layers"]) for e in events if e["stage"] == "quantize"}
    assert layers == {(1, 2), (2, 2)}  # 1-based layer i/N

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    stored = {
        o["Key"][len(prefix) + 1 :]: o
        for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "/")["Contents"]
    }
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    assert {f["path"] for f in manifest["files"]} == set(stored) - {"manifest.json"}
    for entry in manifest["files"]:
        data = s3.get_object(Bucket=s3_bucket, Key=f"{prefix}/{entry['path']}")["Body"].read()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"], entry[
            "path"
        ]
    assert {"model.safetensors", "gptq/model.safetensors", "eval.json", "README.md"} <= set(stored)
    by_path = {a["path"]: a for a in artifacts}
    assert set(by_path) == set(stored)
    assert by_path["manifest.json"]["uri"] == f"s3://{s3_bucket}/{prefix}/manifest.json"
    config = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{prefix}/config.json")["Body"].read())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    eval_json = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{prefix}/eval.json")["Body"].read())
    assert eval_json["eval"] == metrics
