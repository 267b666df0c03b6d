"""Where one decoder layer's time goes, on one GPU and on several: a diagnostic for the data-parallel path.

Runs QuantFleet GPTQ (or AWQ) through `workers.engine.run_local` on the checkpoint and token ids of
gpu_speed.py, with the engine's phase functions wrapped by timers:

* wall phases (every GPU synchronised before and after): loading a layer, replicating it, the Hessian
  capture, the solves, the forward of the quantized layer, syncing the replicas;
* per-device busy times inside the data-parallel phases (the thread's own GPU synchronised): capture,
  each group's solve, the shard's forward. With two GPUs working truly at once, a phase's wall time is
  the largest of its devices' times, not their sum.

The synchronisations cost a little overlap (the read-ahead and background writes keep running), so the
total is a bit above gpu_speed.py's. Layer 0 is left out of the averages (Triton compile, first allocations).
It first times a bf16 GEMM loop on each GPU alone and on all of them at once from one thread each, the
upper bound of what threads can get.

Usage (GPU machine, wheels as in benchmarks/README.md):
    python3 benchmarks/gpu_phase_times.py --work /tmp/qfb --layers 6 --devices 1,2
CPU smoke test: python benchmarks/gpu_phase_times.py --work /tmp/qfp --shape tiny --layers 3 --samples 8 \\
    --seq-len 64 --devices 1
Several CPU "devices" (the multi-device code path on one CPU, threads sharing its cores: the schedule and each
device's busy time, not a speed-up): --cpu-devices, e.g.
    python benchmarks/gpu_phase_times.py --work /tmp/qfp --shape llama3-8b-div8 --layers 3 --samples 8 \\
        --seq-len 256 --devices 1,2,4 --cpu-devices
Phases named "… [qf-device-i]" are busy times on device i's thread; "round one" is the wall time of the solve
round where the costliest group's factorisation runs (and where one device waited for the others before).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import gpu_speed as gs  # noqa: E402


def sync_all() -> None:
    for d in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.synchronize(d)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Seconds per phase name, summed over the layers from `first_layer` on."""

    def __init__(self, first_layer: int = 1, trace_layer: int | None = None, trace_path: Path | None = None) -> None:
        self.first_layer = first_layer
        self.trace_layer, self.trace_path = trace_layer, trace_path
        self._profiler: Any = None
        self.layer = -1
        self.seconds: dict[str, float] = defaultdict(float)
        self.layers_seen: dict[str, set[int]] = defaultdict(set)
        self._lock = threading.Lock()
        self._layer_start: float | None = None

    def on_progress(self, progress: Any) -> None:
        if progress.stage == "quantize" and progress.layer != self.layer and not progress.module:
            sync_all()
            now = time.perf_counter()
            if self._layer_start is not None:
                self.add("layer (wall)", now - self._layer_start)  # the last layer has no next start
            self._trace(progress.layer)
            self.layer, self._layer_start = progress.layer, time.perf_counter()

    def _trace(self, starting: int) -> None:
        """A torch.profiler (Chrome) trace of exactly layer `trace_layer`, every device's kernels on it."""
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler.export_chrome_trace(str(self.trace_path))
            self._profiler = None
        if starting == self.trace_layer and self.trace_path is not None:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._profiler.start()

    def add(self, name: str, seconds: float) -> None:
        if self.layer >= self.first_layer:
            with self._lock:
                self.seconds[name] += seconds
                self.layers_seen[name].add(self.layer)

    def wrap(self, name: str | Callable[..., str], fn: Callable[..., Any], sync: Callable[..., None]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs) if callable(name) else name
            sync(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(*args, **kwargs)
            self.add(label, time.perf_counter() - t0)
            return out

        return timed

    def per_layer_ms(self) -> dict[str, float]:
        per_layer = {k: 1000 * v / len(self.layers_seen[k]) for k, v in self.seconds.items()}
        return dict(sorted(per_layer.items(), key=lambda kv: -kv[1]))


def instrument(clock: PhaseClock) -> Callable[[], None]:
    """Wrap the engine's phase functions (module attributes, so the callers pick the wrappers up)."""
    from workers import activations, devices, loading, pipeline, statistics
    from workers.methods import base, groups

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, wrapper: Any) -> None:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrapper)

    every = lambda *a, **k: sync_all()  # noqa: E731
    patch(loading.LayerwiseModel, "decoder_layer", clock.wrap("load layer", loading.LayerwiseModel.decoder_layer, every))
    patch(base, "collect_statistics", clock.wrap("input statistics (capture)", base.collect_statistics, every))
    patch(pipeline, "replicate", clock.wrap("replicate layer", pipeline.replicate, every))
    patch(pipeline, "sync_replicas", clock.wrap("sync replicas", pipeline.sync_replicas, every))
    patch(devices.DeviceThreads, "run", clock.wrap(
        lambda self, work: f"all devices: {work.__name__}", devices.DeviceThreads.run, every))

    def group_label(work: Any, solver: Any, device: int, group: tuple[str, ...], hessian: torch.Tensor) -> str:
        thread = threading.current_thread().name  # logical CPU devices all say "cpu": name the device's thread
        where = f" [{thread}]" if hessian.device.type == "cpu" and thread.startswith("qf-device") else ""
        return f"solve {group[0].split('.')[-1]} on {hessian.device}{where}"

    patch(groups, "solve_group", clock.wrap(
        group_label, groups.solve_group, lambda work, solver, device, group, hessian: sync_device(hessian.device)))
    patch(activations.Activations, "forward", clock.wrap(
        lambda self, *a, **k: f"forward shard on {self.device}", activations.Activations.forward,
        lambda self, *a, **k: sync_device(self.device)))
    patch(statistics, "capture_inputs", clock.wrap(
        lambda layer, acts, *a: f"capture shard on {acts.device}", statistics.capture_inputs,
        lambda layer, acts, *a: sync_device(acts.device)))
    patch(statistics, "merge_hessians", clock.wrap(
        lambda parts, device: f"merge hessians on {device}", statistics.merge_hessians,
        lambda parts, device: sync_device(device)))
    _instrument_factorisation(clock, patch)

    def restore() -> None:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)

    return restore


def _thread_label(what: str) -> Callable[..., str]:
    """`what [thread]`: per-device busy times (device threads are named qf-device-i; one device runs inline)."""
    return lambda *a, **k: f"{what} [{threading.current_thread().name}]"


def _instrument_factorisation(clock: PhaseClock, patch: Callable[[Any, str, Any], None]) -> None:
    """The inverse-Hessian factorisations: one device's (`prepare_hessian`, three steps on one device) and the
    split one (workers/quant/split_inverse.py: Cholesky on one device, chunks of columns of the triangular
    inverse on whichever device is free, U assembled on every device)."""
    from workers.methods import gptq as gptq_method
    from workers.methods import groups
    from workers.quant import gptq

    try:
        from workers.quant import split_inverse
    except ImportError:  # an engine from before the split factorisation (a "before" measurement)
        mine = lambda *a, **k: torch.cuda.synchronize() if torch.cuda.is_available() else None  # noqa: E731
        patch(gptq, "prepare_hessian", clock.wrap(_thread_label("factor H (one device)"), gptq.prepare_hessian, mine))
        patch(gptq_method, "prepare_hessian", clock.wrap(_thread_label("factor H (one device)"),
                                                         gptq_method.prepare_hessian, mine))
        return

    every = lambda *a, **k: sync_all()  # noqa: E731
    mine = lambda *a, **k: torch.cuda.synchronize() if torch.cuda.is_available() else None  # noqa: E731  (the thread's GPU)
    patch(gptq, "prepare_hessian", clock.wrap(_thread_label("factor H (one device)"), gptq.prepare_hessian, mine))
    patch(gptq_method, "prepare_hessian", clock.wrap(_thread_label("factor H (one device)"), gptq_method.prepare_hessian, mine))
    patch(gptq_method, "flipped_cholesky", clock.wrap(_thread_label("split: Cholesky"), gptq_method.flipped_cholesky, mine))
    patch(split_inverse, "solve_chunk", clock.wrap(_thread_label("split: inverse chunks"), split_inverse.solve_chunk, mine))
    patch(split_inverse, "flipped_upper", clock.wrap(_thread_label("split: assemble U"), split_inverse.flipped_upper, mine))
    patch(split_inverse.SharedInverse, "work", clock.wrap(
        lambda self, device: f"split: wait for L + copy + chunks [{threading.current_thread().name}]",
        split_inverse.SharedInverse.work, mine))
    patch(split_inverse.SharedInverse, "_copy", clock.wrap(
        lambda self, lower, device: f"split: copy L [{threading.current_thread().name}]", split_inverse.SharedInverse._copy, mine))
    patch(groups, "_split_sweep", clock.wrap("split: row sweep (wall)", groups._split_sweep, every))
    patch(groups, "_prepared_everywhere", clock.wrap("split: assemble U everywhere (wall)", groups._prepared_everywhere, every))


def gemm_concurrency(count: int, reps: int = 40) -> dict[str, float]:
    """TFLOP/s of a [8192, 4096]·[4096, 14336] bf16 GEMM loop: on GPU 0 alone, then on `count` GPUs at once."""
    if not torch.cuda.is_available():
        return {}
    m, k, n = 8192, 4096, 14336
    operands = [
        (torch.randn(m, k, device=f"cuda:{d}", dtype=torch.bfloat16), torch.randn(k, n, device=f"cuda:{d}", dtype=torch.bfloat16))
        for d in range(count)
    ]

    def loop(d: int) -> None:
        with torch.cuda.device(d):
            a, b = operands[d]
            for _ in range(reps):
                a @ b
            torch.cuda.synchronize(d)

    loop(0)
    t0 = time.perf_counter()
    loop(0)
    alone = time.perf_counter() - t0
    threads = [threading.Thread(target=loop, args=(d,)) for d in range(count)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = time.perf_counter() - t0
    flops = 2 * m * k * n * reps
    return {"alone_tflops": flops / alone / 1e12, f"together_{count}gpu_tflops_each": flops / together / 1e12}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from workers.engine import run_local
    from workers.pipeline import PipelineOptions
    from workers.spec import CalibrationSpec, JobSpec, Method, QuantScheme

    shape = gs.SHAPES[args.shape]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ids = gs.calibration_ids(args.samples, args.seq_len, shape.vocab, args.seed)
    gs.write_calibration_jsonl(work / "calib.jsonl", ids)
    cuda = torch.cuda.is_available()
    build = gs.build_model(work / f"model-{args.shape}-{args.layers}L", shape, args.layers, args.seed,
                           torch.device("cuda" if cuda else "cpu"))
    out: dict[str, Any] = {"layers": args.layers, "method": args.method, "no_overlap": args.no_overlap, "runs": {}}
    counts = [int(c) for c in args.devices.split(",")]
    if args.cpu_devices and not cuda:
        _allow_cpu_devices()
    if cuda and max(counts) > 1:
        out["gemm"] = gemm_concurrency(max(counts))
        print(f"bf16 GEMM: {json.dumps({k: round(v, 1) for k, v in out['gemm'].items()})}", flush=True)
    for count in counts:
        spec = JobSpec(
            model_dir=build.model_dir, method=Method(args.method), scheme=QuantScheme(bits=4, group_size=128, symmetric=True),
            calibration=CalibrationSpec(path=str(work / "calib.jsonl"), num_samples=args.samples, seq_len=args.seq_len, seed=0),
            device="cuda" if cuda else "cpu", devices=count,
        )
        trace = Path(args.trace_dir) / f"trace-{args.method}-{count}dev.json" if args.trace_dir else None
        clock = PhaseClock(trace_layer=args.trace_layer if trace else None, trace_path=trace)
        restore = instrument(clock)
        try:
            out_dir = work / f"phases-out-{count}"
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
            options = PipelineOptions(prefetch_weights=False, background_writes=False) if args.no_overlap else None
            report = run_local(spec, out_dir, on_progress=clock.on_progress, options=options)
        finally:
            restore()
        out["runs"][str(count)] = {"per_layer_ms": clock.per_layer_ms(), "engine_total_s": report.timings_s.get("total")}
        if trace is not None and trace.exists():
            out["runs"][str(count)]["trace"] = summarize_trace(trace)
    return out


def _allow_cpu_devices() -> None:
    """run_local gives several devices only to CUDA GPUs; here N logical CPU devices, as the CPU tests run them."""
    from workers import engine

    engine.resolve_devices = lambda device, count: [torch.device("cpu")] * count  # type: ignore[assignment]


def summarize_trace(path: Path) -> dict[str, Any]:
    """From a Chrome trace: each GPU's busy time (union of its kernels) and the costliest CUDA runtime calls."""
    events = json.loads(path.read_text()).get("traceEvents", [])
    kernels: dict[int, list[tuple[float, float]]] = defaultdict(list)
    runtime: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") != "X":
            continue
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels[int(e.get("args", {}).get("device", -1))].append((e["ts"], e["ts"] + e.get("dur", 0)))
        elif e.get("cat") == "cuda_runtime":
            runtime[e["name"]][0] += 1
            runtime[e["name"]][1] += e.get("dur", 0)
    devices = {}
    for dev, spans in kernels.items():
        spans.sort()
        busy, end = 0.0, -1.0
        for a, b in spans:
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        devices[f"cuda:{dev}"] = {"kernels": len(spans), "busy_ms": busy / 1e3, "span_ms": (spans[-1][1] - spans[0][0]) / 1e3}
    top = sorted(runtime.items(), key=lambda kv: -kv[1][1])[:8]
    return {"devices": devices, "runtime_ms": {k: {"calls": int(c), "ms": t / 1e3} for k, (c, t) in top}}


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for count, r in result["runs"].items():
        lines.append(f"--- {count} device(s), {result['method']}{' (no overlap)' if result.get('no_overlap') else ''}: ms per layer (layers 1..{result['layers'] - 1}), "
                     f"engine total {r['engine_total_s']:.1f} s")
        lines += [f"  {name:44} {ms:9.1f}" for name, ms in r["per_layer_ms"].items()]
        if "trace" in r:
            lines.append(f"  trace of one layer: {json.dumps(r['trace'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/qf-phases")
    p.add_argument("--shape", choices=sorted(gs.SHAPES), default="llama3-8b")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--method", choices=gs.METHODS, default="gptq")
    p.add_argument("--devices", default="1,2", help="comma list of GPU counts to run")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=None)
    p.add_argument("--no-overlap", action="store_true", help="no read-ahead thread, no background writes")
    p.add_argument("--trace-dir", default=None, help="write a Chrome trace of --trace-layer per device count here")
    p.add_argument("--trace-layer", type=int, default=2)
    p.add_argument("--cpu-devices", action="store_true",
                   help="without CUDA: run --devices counts as that many logical CPU devices (the code path, not a speed-up)")
    args = p.parse_args(argv)
    if args.layers < 2:
        p.error("--layers must be at least 2 (layer 0 is left out of the averages)")
    result = run(args)
    table = format_table(result)
    print(table, flush=True)
    if args.results:
        Path(args.results).write_text(json.dumps(result | {"table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
