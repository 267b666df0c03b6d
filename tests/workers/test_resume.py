"""Per-layer resume (issue 14): a job killed mid-run resumes at its first unfinished decoder layer and writes
the bytes an uninterrupted run writes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_llama
from tests.workers.resume_job import spec_fields
from tests.workers.test_pipeline import RecordingSink, run
from workers import resume
from workers.errors import JobCancelled
from workers.job import run_job
from workers.pipeline import PipelineOptions
from workers.progress import Progress
from workers.spec import JobSpec, OutputFormat
from workers.storage import open_store

ROOT = Path(__file__).resolve().parents[2]
NOT_WEIGHTS = {"eval.json", "README.md", "manifest.json"}  # timings, and the manifest's creation time


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-4", num_layers=4, seed=2)


def stored_hashes(store_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(store_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store_dir.rglob("*")) if p.is_file() and p.name not in NOT_WEIGHTS}


def run_process(args: Path, kill_at: int | None = None) -> tuple[int, list[dict[str, object]]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QF_TEST_KILL_AT_LAYER", None)
    if kill_at is not None:
        env["QF_TEST_KILL_AT_LAYER"] = str(kill_at)
    done = subprocess.run([sys.executable, "-m", "tests.workers.resume_job", str(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events


def test_a_killed_job_resumes_at_its_first_unfinished_layer_with_the_same_bytes(
    make_spec: Callable[..., JobSpec], four_layers: Path, tmp_path: Path
) -> None:
    spec = make_spec("gptq", with_eval=False, model_dir=four_layers, formats=(OutputFormat.COMPRESSED_TENSORS, OutputFormat.GPTQ))
    # uninterrupted, in this process (one torch thread, as the job process uses)
    (tmp_path / "work-whole").mkdir()
    run_job(spec, open_store(str(tmp_path / "whole")), "jobs/j1", work_dir=tmp_path / "work-whole")
    expected = stored_hashes(tmp_path / "whole")
    assert any(name.endswith("model.safetensors") for name in expected)

    work = tmp_path / "work"
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"spec": spec_fields(spec), "store": str(tmp_path / "store"), "prefix": "jobs/j1",
                                "work_dir": str(work)}))
    code, events = run_process(args, kill_at=2)
    assert code == -signal.SIGKILL
    assert max(e["layer"] for e in events if e["stage"] == "quantize" and e["layer"] is not None) == 2
    assert not (tmp_path / "store" / "jobs" / "j1" / "manifest.json").exists()
    [state] = work.glob("resume/*/*/state.json")
    assert json.loads(state.read_text())["next_layer"] == 2

    code, events = run_process(args)  # the retry: same job, same node
    assert code == 0
    [resumed] = [e for e in events if e["stage"] == "resume"]
    assert resumed["layer"] == 2 and "resuming at decoder layer 2 of 4" in str(resumed["message"])
    started = [e["layer"] for e in events if e["stage"] == "quantize" and e["module"] is None]
    assert started == [2, 3]
    assert not any(e["stage"] == "calibrate" and "embedding" in str(e["message"]) for e in events)
    assert stored_hashes(tmp_path / "store") == expected
    assert not list(work.glob("resume/*/*"))  # a finished job leaves no resume state


def cancel_at(layer: int) -> Callable[[], bool]:
    """should_cancel that stops the run before decoder layer `layer` (checked once per layer)."""
    calls = iter(range(100))
    return lambda: next(calls) >= layer


@pytest.mark.parametrize(("method", "every", "stop", "resumes_at"), [("awq", 2, 3, 2), ("rtn", 1, 2, 2), ("gptq", 3, 2, 0)])
def test_resume_at_the_last_saved_inputs_gives_the_same_tensors(
    make_spec: Callable[..., JobSpec], four_layers: Path, tmp_path: Path, method: str, every: int, stop: int,
    resumes_at: int,
) -> None:
    """Saved every `every` layers, a run stopped before layer `stop` resumes at the last saved inputs."""
    spec = make_spec(method, with_eval=False, model_dir=four_layers, calibration=method != "rtn")
    options = PipelineOptions(resume_dir=tmp_path / "resume", checkpoint_every=every)
    whole_result, whole, _ = run(spec)
    with pytest.raises(JobCancelled):
        run(spec, options=options, should_cancel=cancel_at(stop))
    events: list[Progress] = []
    result, resumed, _ = run(spec, options=options, on_progress=events.append)
    starts = [e.layer for e in events if e.stage == "quantize" and e.module is None]
    assert starts == list(range(resumes_at, 4))
    assert_same(whole, resumed)
    assert result.module_errors == whole_result.module_errors


def assert_same(a: RecordingSink, b: RecordingSink) -> None:
    assert list(a.dense) == list(b.dense) and list(a.quantized) == list(b.quantized)  # the same order too
    for name in a.dense:
        assert torch.equal(a.dense[name], b.dense[name]), name
    for name, qt in a.quantized.items():
        other = b.quantized[name]
        assert torch.equal(qt.q, other.q) and torch.equal(qt.scale, other.scale), name
        assert (qt.zero_point is None) == (other.zero_point is None)


def test_a_changed_spec_does_not_resume_stale_layers(make_spec: Callable[..., JobSpec], four_layers: Path, tmp_path: Path) -> None:
    options = PipelineOptions(resume_dir=tmp_path / "resume")
    spec = make_spec("rtn", with_eval=False, model_dir=four_layers, calibration=False)
    with pytest.raises(JobCancelled):
        run(spec, options=options, should_cancel=cancel_at(2))
    other = make_spec("rtn", with_eval=False, model_dir=four_layers, calibration=False, bits=8)
    events: list[Progress] = []
    run(other, options=options, on_progress=events.append)
    assert not [e for e in events if e.stage == "resume"]


def test_a_retry_through_run_job_resumes_in_the_shared_node_local_directory(
    make_spec: Callable[..., JobSpec], four_layers: Path, tmp_path: Path
) -> None:
    """The orchestrator retries a job by calling run_job again with the same store, prefix and work_dir
    (orchestrator/queue/attempt.py): the retry finds the state the failed attempt left."""
    spec = make_spec("gptq", with_eval=False, model_dir=four_layers)
    store, work = open_store(str(tmp_path / "store")), tmp_path / "work"
    work.mkdir()
    stops = iter([False, False, False, OSError("worker lost its disk mount")])

    def fail_before_layer_3(_: Progress) -> None:
        if _.stage == "quantize" and _.module is None and isinstance(error := next(stops), Exception):
            raise error

    with pytest.raises(OSError, match="disk mount"):  # a retryable failure: the state stays
        run_job(spec, store, "jobs/j2", fail_before_layer_3, work_dir=work)
    events: list[Progress] = []
    run_job(spec, store, "jobs/j2", events.append, work_dir=work)
    assert [e.layer for e in events if e.stage == "resume"] == [3]
    assert not list(work.glob("resume/*"))


def test_a_cancelled_job_leaves_no_resume_state(make_spec: Callable[..., JobSpec], four_layers: Path, tmp_path: Path) -> None:
    spec = make_spec("rtn", with_eval=False, model_dir=four_layers, calibration=False)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(JobCancelled):
        run_job(spec, open_store(str(tmp_path / "store")), "jobs/j3", should_cancel=cancel_at(2), work_dir=work)
    assert not list(work.glob("resume/*"))


def test_prune_removes_only_state_untouched_for_a_week(tmp_path: Path) -> None:
    old, fresh = tmp_path / "old" / "key", tmp_path / "fresh" / "key"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(old / "state.json", (week_ago, week_ago))
    resume.prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]


def test_state_whose_inputs_are_gone_starts_over(tmp_path: Path) -> None:
    checkpoints = resume.LayerCheckpoints(tmp_path, "key", num_layers=4)
    checkpoints.save_layer(0, {"w": torch.ones(2)}, {}, [], [])
    checkpoints.save_inputs(1, torch.zeros(1, 2, 3))
    assert checkpoints.start()[0] == 1 and torch.equal(checkpoints.start()[1], torch.zeros(1, 2, 3))  # type: ignore[arg-type]
    (checkpoints.dir / "inputs-00001.safetensors").unlink()  # a concurrent attempt of the same job removed it
    assert checkpoints.start() == (0, None)
