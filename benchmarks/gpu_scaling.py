"""One QuantFleet job on 1, 2, 4, … GPUs of one machine, in one call: the speed-up table (issue 13).

For every GPU count (default: 1, 2, 4, … up to all visible GPUs, and all of them) it runs
`benchmarks/gpu_speed.py --tools quantfleet --devices N` (each method in its own child process, same
checkpoint and calibration ids for every count, page cache dropped before each load) and prints, per shape
and method: median seconds per decoder layer, the layer loop, the whole job (measured when every layer was
run, else extrapolated by gpu_speed.py to the model's layer count: the projected whole-model time) and the
speed-ups against one GPU.

8B shape, the whole 32-layer job, GPTQ and AWQ (the issue's ≥ 1.8× on 2 / ≥ 3.2× on 4 check):
    python3 benchmarks/gpu_scaling.py --work /tmp/qfs --shape llama3-8b --layers 32 --methods gptq,awq \\
        --results $OUT/scaling-8b.json
70B-shaped layers (hidden 8192, intermediate 28672, 64 heads, 8 KV heads): a 3-layer prefix, time per layer
on 1 and N GPUs and the projected 80-layer time:
    python3 benchmarks/gpu_scaling.py --work /tmp/qfs70 --shape llama3-70b --layers 3 --methods gptq \\
        --results $OUT/scaling-70b.json
CPU smoke test (logical CPU devices, the code path only; the times say nothing about GPUs):
    python benchmarks/gpu_scaling.py --work /tmp/qfs-cpu --shape tiny --layers 2 --samples 8 --seq-len 64 \\
        --counts 1,2 --cpu-devices
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEED = REPO_ROOT / "benchmarks" / "gpu_speed.py"


def default_counts(visible: int) -> list[int]:
    """1, 2, 4, … up to `visible`, and `visible` itself."""
    counts, c = [], 1
    while c <= max(visible, 1):
        counts.append(c)
        c *= 2
    if visible > 1 and counts[-1] != visible:
        counts.append(visible)
    return counts


def run_count(args: argparse.Namespace, count: int) -> dict[str, Any]:
    results = Path(args.work) / f"scaling-{args.shape}-{args.layers}L-{count}dev.json"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, str(SPEED), "--work", args.work, "--shape", args.shape, "--layers", str(args.layers),
           "--tools", "quantfleet", "--methods", args.methods, "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--devices", str(count), "--child-timeout", str(args.child_timeout),
           "--results", str(results)]
    env = dict(os.environ)
    if args.cpu_devices:
        env["QF_BENCH_CPU_DEVICES"] = "1"
    print(f"=== {count} device(s): {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    summary: dict[str, Any] = json.loads(results.read_text()) if results.exists() else {}
    summary["rc"] = rc
    return summary


def rows_of(summaries: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for count, summary in summaries.items():
        for r in summary.get("results", []):
            rows.append({
                "devices": count, "method": r["method"], "layers": r["layers"], "total_layers": r["total_layers"],
                "per_layer_s": r["per_layer_s"], "layer_loop_s": r["stages"].get("quantize", float("nan")),
                "total_s": r["total_s"], "whole_model_s": r["extrapolated_s"], "peak_gpu_gib": r["peak_gpu_gib"],
            })
        for failure in summary.get("failures", []):
            rows.append({"devices": count, "method": failure["method"], "failed": failure})
    return rows


def format_table(rows: list[dict[str, Any]], shape: str) -> str:
    head = (f"{'shape':12} {'method':6} {'GPUs':>4} {'layers':>6} {'s/layer':>8} {'loop s':>8} {'total s':>8} "
            f"{'model s':>8} {'×/layer':>8} {'×loop':>7} {'×model':>7} {'peakGiB':>8}")
    lines = [head, "-" * len(head)]
    base = {r["method"]: r for r in rows if r["devices"] == 1 and "failed" not in r}
    for r in sorted(rows, key=lambda r: (r["method"], r["devices"])):
        if "failed" in r:
            lines.append(f"{shape:12} {r['method']:6} {r['devices']:>4} FAILED rc={r['failed'].get('rc')}")
            continue
        one = base.get(r["method"])
        speed = {key: f"{one[key] / r[key]:.2f}x" if one else "n/a" for key in ("per_layer_s", "layer_loop_s", "whole_model_s")}
        model = "measured" if r["layers"] == r["total_layers"] else f"@{r['total_layers']}"
        lines.append(
            f"{shape:12} {r['method']:6} {r['devices']:>4} {r['layers']:>6} {r['per_layer_s']:8.3f} "
            f"{r['layer_loop_s']:8.1f} {r['total_s']:8.1f} {r['whole_model_s']:8.1f} {speed['per_layer_s']:>8} "
            f"{speed['layer_loop_s']:>7} {speed['whole_model_s']:>7} {r['peak_gpu_gib']:8.2f}"
        )
        lines[-1] += f"  (model s {model})"
    lines.append("× columns: 1-GPU time / this time, same machine and call. 'model s': the whole job, measured when "
                 "every layer ran, else gpu_speed.py's extrapolation to the model's layer count.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/qf-scaling")
    p.add_argument("--shape", default="llama3-8b", help="a gpu_speed.py shape: llama3-8b, llama3-70b, tiny, …")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--methods", default="gptq,awq")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--counts", default=None, help="comma list of GPU counts (default: 1, 2, 4, … all visible)")
    p.add_argument("--child-timeout", type=int, default=900)
    p.add_argument("--cpu-devices", action="store_true", help="without CUDA: counts are logical CPU devices")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    counts = [int(c) for c in args.counts.split(",")] if args.counts else default_counts(visible)
    if visible and max(counts) > visible:
        p.error(f"--counts {counts}: only {visible} GPU(s) visible")
    if not visible and max(counts) > 1 and not args.cpu_devices:
        p.error("no CUDA GPU: pass --cpu-devices to run the counts as logical CPU devices")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    summaries = {count: run_count(args, count) for count in counts}
    rows = rows_of(summaries)
    device = torch.cuda.get_device_name(0) if visible else "cpu (logical devices)"
    table = format_table(rows, args.shape)
    print(f"--- {device} × {visible or 1}; {args.samples} × {args.seq_len} calibration tokens\n{table}", flush=True)
    if args.results:
        Path(args.results).write_text(json.dumps({"device": device, "visible": visible, "counts": counts,
                                                  "rows": rows, "table": table, "runs": summaries}, indent=1, default=str))
    return 0 if all(s.get("rc") == 0 for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
