"""Two QuantFleet jobs on two GPUs through Ray: does a pair finish in about the time of one?

Builds the Llama-3-8B-shaped checkpoint of gpu_speed.py once (same synthetic weights, word tokenizer and
calibration ids; `--layers K` writes the first K decoder layers), starts a local Ray, then times
  1. a warm-up job (not reported: it fills the page cache and Triton's on-disk kernel cache),
  2. one GPTQ job alone, as a Ray task with num_gpus=1,
  3. two identical jobs submitted together, each num_gpus=1,
and prints a table: wall time of one, wall time of two together, their ratio (1.00 = perfect), and the
GPU each job ran on (Ray's GPU id, the CUDA_VISIBLE_DEVICES Ray set, the device's name and UUID).

Each job is a Ray task with the options the service's RayExecutor gives a 1-GPU job ({"num_gpus": 1,
"num_cpus": cpus}) and, like it, a fresh worker process per task (max_calls=1); inside, the engine's
`run_local` (what the service's attempts run, minus the database and the object store) on device "auto".
Wall times are the driver's, from submitting to the last result: they include starting the worker
process, importing torch and creating the CUDA context, as a service attempt does.

Usage (repository root, on a machine with 2 GPUs; Ray is NOT on the device image: see
benchmarks/README.md for carrying its wheel):
    python benchmarks/gpu_ray_two_jobs.py --work /tmp/qf2 --layers 4 --results $OUT/two-jobs.json
CPU smoke test (Ray declares logical GPUs; torch sees no CUDA and the engine runs on the CPU):
    python benchmarks/gpu_ray_two_jobs.py --work /tmp/qf2 --shape tiny --layers 2 --samples 4 \\
        --seq-len 64 --logical-gpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import gpu_speed as gs  # noqa: E402


@dataclass(frozen=True)
class JobRun:
    """One job as its Ray task saw it: where it ran and when (host clock, seconds since the epoch)."""

    gpu_ids: list[int | str]
    cuda_visible_devices: str | None
    device: str  # "NVIDIA H200 GPU-…" where torch sees CUDA, else "cpu"
    pid: int
    start: float
    end: float
    engine_s: float  # the engine's own total (EngineReport.timings_s["total"])
    peak_gpu_gib: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Round:
    """Jobs submitted together; `wall_s` from the submission to the last result, on the driver."""

    name: str
    wall_s: float
    runs: list[JobRun]


def job_options(cpus_per_job: int) -> dict[str, Any]:
    """The Ray options of one 1-GPU job: what orchestrator.executors.ray_executor.task_options gives on a GPU cluster."""
    return {"num_gpus": 1, "num_cpus": cpus_per_job}


def run_job_task(job: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task: one QuantFleet job with the GPU(s) Ray assigned, timed from the inside (the
    engine's imports included: the task's process is fresh)."""
    start = time.time()
    import ray

    from workers.engine import run_local
    from workers.spec import CalibrationSpec, JobSpec, Method, QuantScheme

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    spec = JobSpec(
        model_dir=job["model_dir"],
        method=Method(job["method"]),
        scheme=QuantScheme(bits=4, group_size=128, symmetric=True),
        calibration=CalibrationSpec(
            path=job["calibration"], num_samples=job["samples"], seq_len=job["seq_len"], seed=0
        ),
        device="auto",
    )
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} GPU-{props.uuid}"
        torch.cuda.reset_peak_memory_stats()
    else:
        device = "cpu"
    shutil.rmtree(job["out_dir"], ignore_errors=True)
    report = run_local(spec, job["out_dir"])
    run = JobRun(
        gpu_ids=list(ray.get_gpu_ids()),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        device=device,
        pid=os.getpid(),
        start=start,
        end=time.time(),
        engine_s=report.timings_s.get("total", float("nan")),
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
    )
    return asdict(run)


def run_round(ray: Any, task: Any, name: str, jobs: list[dict[str, Any]], options: dict[str, Any]) -> Round:
    """Submit `jobs` at once and wait for all of them."""
    t0 = time.perf_counter()
    refs = [task.options(**options).remote(job) for job in jobs]
    runs = [JobRun(**r) for r in ray.get(refs)]
    return Round(name, time.perf_counter() - t0, runs)


def overlap_s(runs: list[JobRun]) -> float:
    """Seconds during which every run was in progress (negative: they never all ran at once)."""
    return min(r.end for r in runs) - max(r.start for r in runs)


def summary(one: Round, two: Round) -> dict[str, Any]:
    gpus = [tuple(r.gpu_ids) for r in two.runs]
    return {
        "one_wall_s": one.wall_s,
        "two_wall_s": two.wall_s,
        "ratio": two.wall_s / one.wall_s,
        "pair_overlap_s": overlap_s(two.runs),
        "pair_on_distinct_gpus": len(set(gpus)) == len(gpus) and all(len(g) == 1 for g in gpus),
        "pair_on_distinct_devices": len({r.device for r in two.runs}) == len(two.runs),
    }


def format_table(one: Round, two: Round) -> str:
    head = f"{'round':14} {'wall s':>8} {'job':>4} {'in task s':>9} {'engine s':>9} {'peakGiB':>8}  ray gpu / CUDA_VISIBLE_DEVICES / device"
    lines = [head, "-" * len(head)]
    for rnd in (one, two):
        for i, r in enumerate(rnd.runs):
            first = f"{rnd.name:14} {rnd.wall_s:8.1f}" if i == 0 else " " * 23
            ids = ",".join(str(g) for g in r.gpu_ids) or "-"
            lines.append(
                f"{first} {i:>4} {r.seconds:9.1f} {r.engine_s:9.1f} {r.peak_gpu_gib:8.2f}  "
                f"{ids} / {r.cuda_visible_devices or '-'} / {r.device}"
            )
    s = summary(one, two)
    lines.append(
        f"two together / one alone: {s['ratio']:.2f}x wall ({s['two_wall_s']:.1f} s vs {s['one_wall_s']:.1f} s); "
        f"the pair ran {s['pair_overlap_s']:.1f} s at the same time on "
        f"{'distinct' if s['pair_on_distinct_gpus'] else 'THE SAME'} GPUs"
    )
    return "\n".join(lines)


def start_ray(logical_gpus: int | None, cpus: int) -> Any:
    """A local Ray of our own; workers find the repository on PYTHONPATH (they import workers.*)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    import ray

    ray.init(
        address="local",
        num_cpus=cpus,
        num_gpus=logical_gpus,  # None: what the machine has
        object_store_memory=256 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
    return ray


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/qf-two-jobs", help="scratch directory (~1 GB/layer + 2 outputs)")
    p.add_argument("--shape", choices=sorted(gs.SHAPES), default="llama3-8b")
    p.add_argument("--layers", type=int, default=4, help="the first K decoder layers (a prefix)")
    p.add_argument("--method", choices=gs.METHODS, default="gptq")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus-per-job", type=int, default=None, help="default: the machine's CPUs / 2")
    p.add_argument("--logical-gpus", type=int, default=None, help="declare N GPUs to Ray (CPU smoke test)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--results", default=None, help="write the rounds and summary (JSON) here")
    args = p.parse_args(argv)
    shape = gs.SHAPES[args.shape]
    if not 1 <= args.layers <= shape.layers:
        p.error(f"--layers must be between 1 and {shape.layers}")
    cpus = os.cpu_count() or 2
    cpus_per_job = args.cpus_per_job or max(1, cpus // 2)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ids = gs.calibration_ids(args.samples, args.seq_len, shape.vocab, args.seed)
    gs.write_calibration_jsonl(work / "calib.jsonl", ids)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    build = gs.build_model(work / f"model-{args.shape}-{args.layers}L", shape, args.layers, args.seed, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"built {args.layers} of {shape.layers} layers: {build.bytes_written / 1e9:.2f} GB", flush=True)

    ray = start_ray(args.logical_gpus, max(cpus, 2 * cpus_per_job))
    try:
        have = int(ray.cluster_resources().get("GPU", 0))
        if have < 2:
            print(
                f"Ray sees {have} GPU(s); two jobs on two GPUs need 2 (--logical-gpus 2 on a CPU)", flush=True
            )
            return 2
        task = ray.remote(max_retries=0, max_calls=1)(run_job_task)
        options = job_options(cpus_per_job)

        def job(tag: str) -> dict[str, Any]:
            return {
                "model_dir": build.model_dir,
                "method": args.method,
                "calibration": str(work / "calib.jsonl"),
                "samples": args.samples,
                "seq_len": args.seq_len,
                "out_dir": str(work / f"out-{tag}"),
            }

        if args.warmup:
            warm = run_round(ray, task, "warm-up", [job("warmup")], options)
            print(f"warm-up: {warm.wall_s:.1f} s", flush=True)
        one = run_round(ray, task, "one alone", [job("one")], options)
        two = run_round(ray, task, "two together", [job("pair-0"), job("pair-1")], options)
    finally:
        ray.shutdown()
    table = format_table(one, two)
    print(table, flush=True)
    if args.results:
        out = {
            "shape": asdict(shape),
            "layers": args.layers,
            "method": args.method,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "cpus_per_job": cpus_per_job,
            "rounds": [{**asdict(r), "runs": [asdict(x) for x in r.runs]} for r in (one, two)],
            "summary": summary(one, two),
            "table": table,
        }
        Path(args.results).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
