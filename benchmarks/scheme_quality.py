"""Quality of the W8A8 / FP8 / mixed-precision schemes (issue 12) on SmolLM2-135M, with the protocol of
benchmarks/quality.md: `--num-samples` × 512-token calibration windows of the Shakespeare calibration plays
(seeded), the first `--eval-windows` 512-token windows of the held-out plays, the engine's own evaluation
(Δppl, KL, top-1; W8A8 and FP8 rows are scored with the runtime's activation quantization,
workers/activation_quant.py), bits per weight from the written checkpoint (scales included). One `run_local`
job per row:

    python3 benchmarks/scheme_quality.py --assets .cache/assets --rows w8a8-gptq,w8a8-sq-gptq,fp8-dynamic

Rows: w8a8-gptq / w8a8-rtn (scheme w8a8-int8), w8a8-sq-gptq / w8a8-sq-rtn (w8a8-int8-smoothquant, α 0.8),
fp8-dynamic, fp8-static (method rtn), w4g32-gptq / w4g64-gptq (uniform W4A16 g32 / g64, 4.5 / 4.25 bits per
weight: g32 stands for g128, which SmolLM2's 576 inputs rule out), mixed4.5-gptq / mixed4.25-gptq (mixed precision
by measured sensitivity at 4.5 / 4.25 bits per weight, the default candidates), mixed-rule-gptq (w4 g32, the first/last 2 layers and down_proj at w8 g32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine import run_local  # noqa: E402
from workers.spec import (  # noqa: E402
    SMOOTHQUANT_ALPHA,
    CalibrationSpec,
    EvalSpec,
    JobSpec,
    Method,
    MixedPrecisionSpec,
    QuantScheme,
)

W4G32 = QuantScheme(4, 32, True)
ROWS: dict[str, dict[str, object]] = {
    "w8a8-gptq": {"method": Method.GPTQ, "scheme": QuantScheme.from_preset("w8a8-int8")},
    "w8a8-rtn": {"method": Method.RTN, "scheme": QuantScheme.from_preset("w8a8-int8")},
    "w8a8-sq-gptq": {"method": Method.GPTQ, "scheme": QuantScheme.from_preset("w8a8-int8"), "smoothquant": SMOOTHQUANT_ALPHA},
    "w8a8-sq-rtn": {"method": Method.RTN, "scheme": QuantScheme.from_preset("w8a8-int8"), "smoothquant": SMOOTHQUANT_ALPHA},
    "fp8-dynamic": {"method": Method.RTN, "scheme": QuantScheme.from_preset("fp8-dynamic")},
    "fp8-static": {"method": Method.RTN, "scheme": QuantScheme.from_preset("fp8-static")},
    "w4g32-gptq": {"method": Method.GPTQ, "scheme": W4G32},
    "w4g64-gptq": {"method": Method.GPTQ, "scheme": QuantScheme(4, 64, True)},
    "mixed4.5-gptq": {"method": Method.GPTQ, "scheme": W4G32,
                      "mixed_precision": MixedPrecisionSpec(target_bits_per_weight=4.5)},
    "mixed4.25-gptq": {"method": Method.GPTQ, "scheme": W4G32,
                       "mixed_precision": MixedPrecisionSpec(target_bits_per_weight=4.25)},
    "mixed-kl0.05-gptq": {"method": Method.GPTQ, "scheme": W4G32,
                          "mixed_precision": MixedPrecisionSpec(target_kl=0.05)},
    "mixed-rule-gptq": {"method": Method.GPTQ, "scheme": W4G32,
                        "mixed_precision": MixedPrecisionSpec(edge_layers=2, patterns=("down_proj",))},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=Path(".cache/assets"))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=Path("/tmp/qf-scheme-quality"))
    p.add_argument("--results", type=Path, default=None, help="JSON lines are also appended here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = JobSpec(
        model_dir=str(args.assets / "smollm2-135m"), method=Method.GPTQ,
        calibration=CalibrationSpec(str(args.assets / "shakespeare-calibration.txt"), args.num_samples, 512, args.seed),
        eval=EvalSpec(str(args.assets / "shakespeare-eval.txt"), 512, args.eval_windows), device=args.device,
    )
    for name in args.rows.split(","):
        spec = dataclasses.replace(base, **ROWS[name])  # type: ignore[arg-type]
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        report = run_local(spec, out)
        assert report.eval is not None
        mixed = report.mixed_precision or {}
        row = {"row": name, "seed": args.seed, "num_samples": args.num_samples, "eval_windows": args.eval_windows,
               "dppl": round(report.eval.delta_ppl_pct, 3), "kl": round(report.eval.kl_mean, 5),
               "top1": round(report.eval.top1_agreement, 4), "bpw": round(report.bits_per_weight or 0, 4),
               "ppl_original": round(report.eval.ppl_original, 4), "seconds": round(time.perf_counter() - started, 1),
               "grids": mixed.get("linears_per_grid"), "estimated_kl": mixed.get("estimated_kl")}
        print(json.dumps(row), flush=True)
        if args.results:
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
