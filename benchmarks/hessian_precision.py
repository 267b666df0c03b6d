"""Does accumulating GPTQ's Hessian from bf16 operands (fp32 accumulation) change quality? SmolLM2-135M, CPU.

On a GPU the calibration activations are bf16, and `HessianAccumulator(precision="half-operands")` feeds them
to a tensor-core GEMM unscaled (every product exact in float32, only the summation order differs) instead
of llm-compressor's scale-first float32 GEMM ("fp32"), ~15× faster on an H100. This script measures what
that changes, against the run-to-run noise of the job itself (another calibration sample):

* same bf16-rounded inputs, Hessian "fp32" vs "half-operands" → packed-integer mismatch rate, Δppl, KL;
* "fp32" with calibration seeds 0, 1, 2 → the spread of ppl a user sees anyway.

Why the CPU and bf16 rounding by hand: the device machine cannot hold SmolLM2's 269 MB (64 MiB per call), and
bf16 matmuls are ~50× slower than float32 on this CPU. So the model runs in float32 and each Linear-group
input is rounded to bf16 right before the Hessian, which is exactly what the accumulator sees on a GPU.

    QF_ASSETS_DIR=.cache/assets python benchmarks/hessian_precision.py --work /tmp/qf-hp --out benchmarks/results/hessian-precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from workers import statistics as pipeline  # noqa: E402  (where the layer loop builds its accumulators)
from workers.assets import calibration_text, eval_text, smollm2_dir  # noqa: E402
from workers.engine import run_local  # noqa: E402
from workers.evaluate import evaluate_many  # noqa: E402
from workers.formats.reader import QuantizedCheckpoint  # noqa: E402
from workers.loading import load_tokenizer  # noqa: E402
from workers.quant.gptq import HessianAccumulator, HessianPrecision  # noqa: E402
from workers.spec import CalibrationSpec, EvalSpec, JobSpec, Method, QuantScheme  # noqa: E402


def accumulator_class(precision: HessianPrecision, round_to_bf16: bool) -> type[HessianAccumulator]:
    """A HessianAccumulator with fixed numerics that optionally sees bf16-rounded inputs, as on a GPU."""

    class Accumulator(HessianAccumulator):
        def __init__(self, in_features: int, device: str | torch.device = "cpu", **_: Any) -> None:
            super().__init__(in_features, device, precision=precision)

        def add(self, x: torch.Tensor) -> None:
            super().add(x.to(torch.bfloat16) if round_to_bf16 else x)

    return Accumulator


def quantize(model_dir: Path, out: Path, calib: Path, scheme: QuantScheme, samples: int, seq_len: int, seed: int,
             precision: HessianPrecision, round_to_bf16: bool) -> float:
    """One GPTQ job with the pipeline's Hessian accumulator swapped for the given numerics; returns seconds."""
    spec = JobSpec(
        model_dir=str(model_dir), method=Method.GPTQ, scheme=scheme,
        calibration=CalibrationSpec(path=str(calib), num_samples=samples, seq_len=seq_len, seed=seed), device="cpu",
    )
    original = pipeline.HessianAccumulator
    pipeline.HessianAccumulator = accumulator_class(precision, round_to_bf16)  # type: ignore[misc]
    try:
        started = time.perf_counter()
        run_local(spec, out)
        return time.perf_counter() - started
    finally:
        pipeline.HessianAccumulator = original  # type: ignore[misc]


def packed_codes(path: Path) -> dict[str, torch.Tensor]:
    """Integer codes of every quantized Linear of a checkpoint (read back through the format reader)."""
    ckpt = QuantizedCheckpoint(path)
    codes: dict[str, torch.Tensor] = {}
    stored = ckpt.source.get_prefix("", "cpu")
    for name in stored:
        if name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            parts = {s: stored[f"{module}.{s}"] for s in ckpt._module.SUFFIXES if f"{module}.{s}" in stored}
            codes[module] = ckpt._module.from_linear_tensors(parts, ckpt.scheme).q
    return codes


def mismatch_rate(a: Path, b: Path) -> float:
    ca, cb = packed_codes(a), packed_codes(b)
    differ = sum(int((ca[m] != cb[m]).sum()) for m in ca)
    return differ / sum(t.numel() for t in ca.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/qf-hessian-precision")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seeds", type=int, default=3, help="calibration seeds for the noise estimate")
    p.add_argument("--half-seeds", type=int, default=1, help="calibration seeds quantized with half-operands")
    p.add_argument("--no-fp32-inputs", action="store_true", help="skip the run on unrounded float32 inputs")
    args = p.parse_args(argv)

    model_dir, calib, held_out = smollm2_dir(), calibration_text(), eval_text()
    if not (model_dir / "model.safetensors").is_file():
        p.error(f"SmolLM2 is missing at {model_dir}; run `make assets` or set QF_ASSETS_DIR")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size, symmetric=True)

    runs: list[tuple[str, int, HessianPrecision, bool]] = [("fp32-bf16in", s, "fp32", True) for s in range(args.seeds)]
    runs += [("half-bf16in", s, "half-operands", True) for s in range(args.half_seeds)]
    if not args.no_fp32_inputs:
        runs.append(("fp32-fp32in", 0, "fp32", False))
    outs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for label, seed, precision, rounded in runs:
        key = f"{label}-seed{seed}"
        out = work / key
        if not (out / "config.json").exists():
            seconds[key] = quantize(model_dir, out, calib, scheme, args.samples, args.seq_len, seed, precision, rounded)
            print(f"{key}: quantized in {seconds[key]:.0f} s", flush=True)
        outs[key] = out

    metrics = evaluate_many(
        model_dir, list(outs.values()), EvalSpec(path=str(held_out), seq_len=512, max_windows=args.eval_windows),
        load_tokenizer(model_dir), torch.device("cpu"),
    )
    table = {key: m for key, m in zip(outs, metrics, strict=True)}
    noise = [table[f"fp32-bf16in-seed{s}"].ppl_quantized for s in range(args.seeds)]
    half = [table[f"half-bf16in-seed{s}"].ppl_quantized for s in range(args.half_seeds)]
    result = {
        "scheme": f"w{args.bits} g{args.group_size} sym",
        "calibration": f"{args.samples}x{args.seq_len}",
        "eval_tokens": metrics[0].tokens,
        "ppl_original": metrics[0].ppl_original,
        "runs": {k: {"ppl": m.ppl_quantized, "delta_ppl_pct": m.delta_ppl_pct, "kl_mean": m.kl_mean,
                     "top1": m.top1_agreement} for k, m in table.items()},
        "seed_spread_ppl": {"min": min(noise), "max": max(noise), "stdev": statistics.stdev(noise) if len(noise) > 1 else 0.0},
        "half_vs_fp32_ppl": table["half-bf16in-seed0"].ppl_quantized - table["fp32-bf16in-seed0"].ppl_quantized,
        "mean_ppl_fp32_seeds": statistics.mean(noise),
        "mean_ppl_half_seeds": statistics.mean(half),
        "half_vs_fp32_ppl_per_seed": [
            table[f"half-bf16in-seed{s}"].ppl_quantized - table[f"fp32-bf16in-seed{s}"].ppl_quantized
            for s in range(min(args.seeds, args.half_seeds))
        ],
        "half_vs_fp32_code_mismatch": mismatch_rate(outs["half-bf16in-seed0"], outs["fp32-bf16in-seed0"]),
        "seed0_vs_seed1_code_mismatch": mismatch_rate(outs["fp32-bf16in-seed0"], outs["fp32-bf16in-seed1"]),
        "bf16in_vs_fp32in_code_mismatch": (
            None if args.no_fp32_inputs else mismatch_rate(outs["fp32-bf16in-seed0"], outs["fp32-fp32in-seed0"])
        ),
        "quantize_seconds": seconds,
    }
    print(f"{'run':24} {'ppl':>9} {'dppl%':>7} {'KL':>8} {'top1':>6}")
    for k, m in table.items():
        print(f"{k:24} {m.ppl_quantized:9.4f} {m.delta_ppl_pct:7.3f} {m.kl_mean:8.5f} {m.top1_agreement:6.3f}")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
