"""GPU checks of the pipeline-level fast paths (one device call, well under a minute).

1. Overlap switches: `run_local` on a small random bf16 Llama on CUDA with prefetching, background writes
   and the bf16-operand error report on, and again with all three off: every file of the checkpoint must
   be byte-identical (GPTQ, AWQ, RTN) and the module errors within the report's stated tolerance.
2. Several devices for one job: `quantize_model` with devices=[cuda:0, cuda:1] (or [cuda:0, cuda:0] on a
   one-GPU machine: no speed-up there) against [cuda:0]. This exercises the multi-device code on CUDA (a thread per
   device, per-thread current device, Triton compiling from two threads, cross-replica copies) and
   measures how many codes the Hessian merge's different summation order changes.
3. AWQ searches on the Llama-3-8B module shapes: `search_clip` and `search_scales` on input statistics
   against token-based searches over the same tokens (tests/workers/test_awq.py): equal choices, and time.

    python benchmarks/gpu_pipeline_checks.py --work /tmp/qfpc --results /tmp/pipeline-checks.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import make_tiny_llama, write_text_corpus  # noqa: E402
from workers.calibration import calibration_windows  # noqa: E402
from workers.engine import run_local  # noqa: E402
from workers.loading import CheckpointWeights, LayerwiseModel, load_tokenizer  # noqa: E402
from workers.pipeline import PipelineOptions, quantize_model  # noqa: E402
from workers.quant.grid import QuantizedTensor  # noqa: E402
from workers.spec import CalibrationSpec, JobSpec, Method, QuantScheme  # noqa: E402
from workers.tensor_source import TensorSource  # noqa: E402

OFF = PipelineOptions(prefetch_weights=False, background_writes=False, fast_error_report=False)
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4}


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "eval.json"  # eval.json holds wall times
    }


DEVICE = "cuda"


def spec_for(model_dir: Path, calib: Path, method: str, devices: int = 1) -> JobSpec:
    return JobSpec(
        model_dir=str(model_dir),
        method=Method(method),
        scheme=QuantScheme(4, 128, True),
        calibration=CalibrationSpec(path=str(calib), num_samples=16, seq_len=512),
        device=DEVICE,
        devices=devices,
    )


def check_switches(model_dir: Path, calib: Path, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("gptq", "awq", "rtn"):
        runs = {}
        for label, options in (("on", PipelineOptions()), ("off", OFF)):
            target = work / f"out-{method}-{label}"
            shutil.rmtree(target, ignore_errors=True)
            t0 = time.perf_counter()
            report = run_local(spec_for(model_dir, calib, method), target, options=options)
            runs[label] = (digests(target), time.perf_counter() - t0, report.module_errors)
        (on, t_on, err_on), (off, t_off, err_off) = runs["on"], runs["off"]
        deviation = max(
            (abs(a.error / b.error - 1) for a, b in zip(err_on, err_off, strict=True) if b.error > 0), default=0.0
        )
        out[method] = {
            "files": len(on),
            "identical": on == off,
            "seconds_on": round(t_on, 2),
            "seconds_off": round(t_off, 2),
            "max_module_error_deviation": deviation,
        }
        print(f"switches {method}: {out[method]}", flush=True)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Sink:
    def __init__(self) -> None:
        self.quantized: dict[str, QuantizedTensor] = {}

    def add_dense(self, name: str, tensor: torch.Tensor) -> None:
        pass

    def add_quantized(self, module_name: str, qt: QuantizedTensor) -> None:
        self.quantized[module_name] = qt


def check_two_devices(model_dir: Path, calib: Path) -> dict[str, Any]:
    """[cuda, cuda] (and every visible GPU, when more than two) vs [cuda]; and, for scale, [cuda] with another
    calibration seed (the run-to-run noise)."""
    cuda = torch.device(DEVICE)
    second = torch.device("cuda", 1) if cuda.type == "cuda" and torch.cuda.device_count() > 1 else cuda
    out: dict[str, Any] = {"second_device": str(second)}
    visible = torch.cuda.device_count() if cuda.type == "cuda" else 4  # the CPU smoke test: 4 logical devices
    every = [torch.device("cuda", i) for i in range(visible)] if cuda.type == "cuda" else [cuda] * visible
    cases = [("one", [cuda], 0), ("two", [cuda, second], 0), ("one_seed1", [cuda], 1)]
    if visible > 2:  # issue 13: every visible device too
        cases.append(("all", every, 0))
        out["all_devices"] = [str(d) for d in every]
    for method in ("gptq", "awq"):
        runs: dict[str, tuple[Sink, float, float]] = {}
        for label, devices, seed in cases:
            spec = spec_for(model_dir, calib, method)
            spec = replace(spec, calibration=replace(spec.calibration, seed=seed))
            calibration = calibration_windows(spec.calibration, load_tokenizer(model_dir))
            model = LayerwiseModel(model_dir, cuda)
            sink = Sink()
            sync()
            t0 = time.perf_counter()
            result = quantize_model(
                model, CheckpointWeights(TensorSource(model_dir)), spec, [sink], calibration, devices=devices
            )
            sync()
            mean_error = sum(e.relative_error for e in result.module_errors) / len(result.module_errors)
            runs[label] = (sink, time.perf_counter() - t0, mean_error)
        one = runs["one"][0]
        total = sum(qt.q.numel() for qt in one.quantized.values())

        def differ(other: Sink, one: Sink = one, total: int = total) -> float:
            changed = sum(int((one.quantized[n].q.cpu() != other.quantized[n].q.cpu()).sum()) for n in one.quantized)
            return changed / total

        out[method] = {
            "codes": total,
            "fraction_differ_two_devices": differ(runs["two"][0]),
            "fraction_differ_other_seed": differ(runs["one_seed1"][0]),
            **({"fraction_differ_all_devices": differ(runs["all"][0])} if "all" in runs else {}),
            **{f"seconds_{k}": round(v[1], 2) for k, v in runs.items()},
            **{f"mean_relative_module_error_{k}": v[2] for k, v in runs.items()},
        }
        print(f"two devices {method}: {out[method]}", flush=True)
    return out


AWQ_SHAPES = {"q_proj": (4096, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}


def timed(fn: Any) -> tuple[Any, float]:
    fn()  # warm-up
    sync()
    t0 = time.perf_counter()
    value = fn()
    sync()
    return value, time.perf_counter() - t0


def check_awq_searches() -> dict[str, Any]:
    """The statistics-based AWQ searches against token-based searches over the same (all) tokens."""
    from tests.workers.test_awq import _token_search_clip, _token_search_scales
    from workers.quant.awq import search_clip, search_scales

    scheme = QuantScheme(4, 128, True)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    out: dict[str, Any] = {}
    shrink = 8 if DEVICE == "cpu" else 1  # the CPU smoke test uses 1/8 of each dimension
    for name, (rows, cols) in AWQ_SHAPES.items():
        rows, cols = rows // shrink, cols // shrink
        channel_scale = torch.exp(torch.randn(cols, generator=g, device=DEVICE))
        x = torch.randn(4096 // shrink, cols, generator=g, device=DEVICE) * channel_scale
        w = torch.randn(rows, cols, generator=g, device=DEVICE) * 0.02
        sigma, mean_abs = x.T @ x / x.shape[0], x.abs().mean(dim=0)
        new_clip, t_new = timed(lambda sigma=sigma, w=w: search_clip(sigma, w, scheme))
        old_clip, t_old = timed(lambda x=x, w=w: _token_search_clip(x, w, scheme)[0].to(DEVICE))
        (new_s, new_a, new_l), t_snew = timed(lambda sigma=sigma, mean_abs=mean_abs, w=w: search_scales(sigma, mean_abs, [w], scheme))
        (old_s, old_a, old_l), t_sold = timed(lambda x=x, w=w: _token_search_scales(x, [w], scheme))
        out[name] = {
            "clip_equal_fraction": float((new_clip == old_clip).all(dim=-1).float().mean()),
            "clip_s_tokens": round(t_old, 4), "clip_s_statistics": round(t_new, 4),
            "scales_alpha_equal": new_a == old_a,
            "scales_loss_rel_diff": abs(new_l / old_l - 1) if old_l else 0.0,
            "scales_s_tokens": round(t_sold, 4), "scales_s_statistics": round(t_snew, 4),
        }
        print(f"awq {name}: {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/qfpc")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--results", default=None)
    p.add_argument("--only", default="", help="comma list of switches, two_devices, awq_searches")
    p.add_argument("--cpu", action="store_true", help="smoke-test the script itself on the CPU")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        p.error("these checks need a CUDA GPU (or --cpu for a smoke test)")
    work = Path(args.work)
    model_dir = make_tiny_llama(work / "model", args.layers, dtype=torch.bfloat16, tie_word_embeddings=False, **SHAPE)
    calib = write_text_corpus(work / "calib.txt", 40_000)
    results: dict[str, Any] = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(), "shape": SHAPE, "layers": args.layers}
    for name, fn in (("switches", lambda: check_switches(model_dir, calib, work)),
                     ("two_devices", lambda: check_two_devices(model_dir, calib)),
                     ("awq_searches", check_awq_searches)):
        if args.only and name not in args.only.split(","):
            continue
        try:
            results[name] = fn()
        except Exception as exc:  # keep the other check's numbers
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"!!! check {name} failed: {exc!r}", flush=True)
        if args.results:
            Path(args.results).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
