"""A job run as its own process, for the per-layer resume test: `python -m tests.workers.resume_job ARGS.json`.

ARGS.json: {"spec": JobSpec fields, "store": dir, "prefix": key, "work_dir": dir}. Progress events are
printed as JSON lines. With QF_TEST_KILL_AT_LAYER=k the process SIGKILLs itself when decoder layer k starts,
once the resume state records layers 0..k-1 as finished (workers/resume.py writes it on the writer thread).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from workers.progress import Progress
from workers.spec import CalibrationSpec, JobSpec, Method, OutputFormat, QuantScheme


def spec_from(fields: dict[str, Any]) -> JobSpec:
    return JobSpec(
        model_dir=fields["model_dir"], method=Method(fields["method"]), scheme=QuantScheme(**fields["scheme"]),
        calibration=CalibrationSpec(**fields["calibration"]), formats=tuple(OutputFormat(f) for f in fields["formats"]),
    )


def spec_fields(spec: JobSpec) -> dict[str, Any]:
    return {"model_dir": spec.model_dir, "method": spec.method.value, "scheme": dataclasses.asdict(spec.scheme),
            "calibration": dataclasses.asdict(spec.calibration), "formats": [f.value for f in spec.formats]}


def _next_layer(work_dir: Path) -> int:
    states = list((work_dir / "resume").glob("*/*/state.json"))
    return json.loads(states[0].read_text())["next_layer"] if states else 0


def main(args_path: str) -> None:
    from workers.job import run_job
    from workers.storage import open_store

    torch.set_num_threads(1)  # the same arithmetic as the test process (tests/workers/conftest.py)
    args = json.loads(Path(args_path).read_text())
    work_dir = Path(args["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)  # the worker's node-local scratch (orchestrator: settings.work_dir)
    kill_at = int(os.environ.get("QF_TEST_KILL_AT_LAYER", "-1"))

    def on_progress(p: Progress) -> None:
        print(json.dumps(dataclasses.asdict(p)), flush=True)
        if p.stage == "quantize" and p.layer == kill_at and p.module is None:
            deadline = time.monotonic() + 60
            while _next_layer(work_dir) < kill_at and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

    run_job(spec_from(args["spec"]), open_store(args["store"]), args["prefix"], on_progress, work_dir=work_dir)


if __name__ == "__main__":
    main(sys.argv[1])
