"""`quantfleet quantize`: quantize a local model directory from the command line.

    quantfleet quantize MODEL_DIR --method gptq --bits 4 --group-size 64 \\
        --calibration calib.txt --eval-text eval.txt --out OUT_DIR

The preflight plan (workers/preflight.py: what is quantized, what stays dense, estimated peak memory and
output size) goes to stderr before the job starts, then progress as rich progress bars; the summary table
goes to stdout. A bad input ends the
command with exit code 2 and one line "error: ..." (the message says what to fix), never a traceback.
`quantfleet/cli.py` calls `quantize_command` for its `quantize` subcommand; `python -m workers.cli quantize ...`
works too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgressBar
from rich.table import Table

from workers.engine import run_local
from workers.errors import QuantFleetError
from workers.preflight import plan_job, summary_lines
from workers.progress import Progress
from workers.report import EngineReport
from workers.spec import (
    OBSERVERS,
    SCHEME_PRESETS,
    SMOOTHQUANT_PRESETS,
    CalibrationSpec,
    EvalSpec,
    JobSpec,
    Method,
    MixedPrecisionSpec,
    OutputFormat,
    QuantScheme,
)

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    defaults, calibration = QuantScheme(), CalibrationSpec()
    parser = argparse.ArgumentParser(
        prog="quantfleet quantize", description="Quantize a Hugging Face causal LM directory (safetensors)."
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="directory with config.json, *.safetensors, tokenizer")
    parser.add_argument("--method", required=True, choices=[m.value for m in Method])
    parser.add_argument("--bits", type=int, default=defaults.bits, help="2, 3, 4 or 8 (default %(default)s)")
    parser.add_argument("--group-size", type=int, default=defaults.group_size, help="-1 (per channel), 32, 64 or 128")
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (zero points); default symmetric")
    parser.add_argument(
        "--scheme", choices=list(SCHEME_PRESETS),
        help="FP8 E4M3 (method rtn; fp8-static needs --calibration) or INT8 W8A8 (method gptq or rtn; "
        "w8a8-int8-smoothquant needs --calibration) instead of the integer grid (replaces --bits/--group-size/--asym)",
    )
    parser.add_argument("--smoothquant-alpha", type=float, default=None,
                        help="SmoothQuant migration strength for --scheme w8a8-int8-smoothquant (default 0.8)")
    parser.add_argument("--kv-cache-fp8", action="store_true",
                        help="record FP8 KV-cache scales (k_scale/v_scale) from calibration, as vLLM reads them")
    parser.add_argument("--mixed-edge-layers", type=int, default=0, metavar="N",
                        help="mixed precision: the first and last N decoder layers at 8 bits")
    parser.add_argument("--mixed-pattern", action="append", default=[], metavar="REGEX",
                        help="mixed precision: Linears whose full name matches at 8 bits (repeatable), e.g. down_proj")
    parser.add_argument("--target-bits-per-weight", type=float, default=None, metavar="BITS",
                        help="mixed precision by measured sensitivity: average stored bits per weight (w4 g32 = 4.5)")
    parser.add_argument("--target-kl", type=float, default=None, metavar="NATS",
                        help="mixed precision by measured sensitivity: the fewest bits whose estimated KL divergence"
                             " from the original (per token) is at most this")
    parser.add_argument(
        "--observer", choices=list(OBSERVERS), default="mse",
        help="group ranges: 'mse', the range with the least E[x²]-weighted rounding error (default), or min-max",
    )
    parser.add_argument(
        "--act-order", action=argparse.BooleanOptionalAction, default=True,
        help="GPTQ: visit columns by decreasing Hessian diagonal, static groups (default: on)",
    )
    parser.add_argument("--dampening", type=float, default=0.01, help="GPTQ relative dampening (default %(default)s)")
    parser.add_argument("--calibration", metavar="FILE", help=".txt or .jsonl ({\"text\": ...}); needed by gptq and awq")
    parser.add_argument("--num-samples", type=int, default=calibration.num_samples)
    parser.add_argument("--seq-len", type=int, default=calibration.seq_len)
    parser.add_argument("--seed", type=int, default=calibration.seed, help="seed of the calibration window offsets")
    parser.add_argument("--eval-text", metavar="FILE", help="held-out text for perplexity / KL evaluation")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-max-windows", type=int, default=None)
    parser.add_argument(
        "--format", dest="formats", action="append", choices=[f.value for f in OutputFormat],
        help="output format, repeatable; the first goes in OUT_DIR, others in OUT_DIR/<format>/ "
        "(default compressed-tensors)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT_DIR", help="new (or empty) output directory")
    return parser


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    return JobSpec(
        model_dir=args.model_dir,
        method=Method(args.method),
        scheme=QuantScheme.from_preset(args.scheme)
        if args.scheme
        else QuantScheme(bits=args.bits, group_size=args.group_size, symmetric=not args.asym),
        calibration=CalibrationSpec(
            path=args.calibration, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed
        ),
        eval=EvalSpec(args.eval_text, args.eval_seq_len, args.eval_max_windows) if args.eval_text else None,
        formats=tuple(OutputFormat(f) for f in (args.formats or [OutputFormat.COMPRESSED_TENSORS.value])),
        dampening=args.dampening,
        act_order=args.act_order,
        observer=args.observer,
        device=args.device,
        smoothquant=args.smoothquant_alpha if args.smoothquant_alpha is not None else SMOOTHQUANT_PRESETS.get(args.scheme or ""),
        kv_cache_fp8=args.kv_cache_fp8,
        mixed_precision=MixedPrecisionSpec(
            edge_layers=args.mixed_edge_layers, patterns=tuple(args.mixed_pattern),
            target_bits_per_weight=args.target_bits_per_weight, target_kl=args.target_kl,
        ) if (args.mixed_edge_layers or args.mixed_pattern or args.target_bits_per_weight is not None
              or args.target_kl is not None) else None,
    )


class ProgressBars:
    """Turns engine Progress events into one rich bar per stage that counts layers.

    The bars start with the first event, so a job rejected by validation prints nothing but its error.
    """

    def __init__(self, bars: RichProgressBar) -> None:
        self.bars = bars
        self.tasks: dict[str, TaskID] = {}
        self.started = False

    def close(self) -> None:
        if self.started:
            self.bars.stop()
            self.started = False

    def __call__(self, event: Progress) -> None:
        if not self.started:
            self.bars.start()
            self.started = True
        if event.stage not in self.tasks:
            self.tasks[event.stage] = self.bars.add_task(event.stage, total=event.num_layers)
        task = self.tasks[event.stage]
        detail = event.module or event.message or ""
        description = f"{event.stage:9} {detail}"[:60]
        if event.layer is not None:
            done = event.layer if event.module is None else event.layer + 0.5
            self.bars.update(task, completed=done, total=event.num_layers, description=description)
        else:
            self.bars.update(task, description=description)
        for stage, other in self.tasks.items():  # a new stage means the earlier ones are finished
            if stage != event.stage and self.bars.tasks[other].total is not None:
                self.bars.update(other, completed=self.bars.tasks[other].total)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary_table(report: EngineReport, out_dir: Path) -> Table:
    grid = (", ".join(report.formats) if any(f.startswith("gguf:") for f in report.formats)  # GGUF: the type is the grid
            else f"w{report.bits} g{report.group_size} {'sym' if report.symmetric else 'asym'}")
    table = Table(title=f"{report.method} {grid} → {out_dir}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if report.eval is not None:
        e = report.eval
        table.add_row("perplexity original", f"{e.ppl_original:.4f}")
        table.add_row("perplexity quantized", f"{e.ppl_quantized:.4f}")
        table.add_row("Δ perplexity", f"{e.delta_ppl_pct:+.2f} %")
        table.add_row("KL mean / p99", f"{e.kl_mean:.5f} / {e.kl_p99:.4f}")
        table.add_row("top-1 agreement", f"{100 * e.top1_agreement:.2f} %")
        table.add_row("eval tokens", f"{e.tokens} ({e.windows} × {e.seq_len})")
    table.add_row("weights before → after", f"{_mib(report.bytes_original)} → {_mib(report.bytes_quantized)}")
    for row in report.outputs[1:]:  # the job's other formats, from the same calibration pass
        score = row["eval"]
        scored = f", Δppl {score['delta_ppl_pct']:+.2f} %, KL {score['kl_mean']:.5f}" if score else ""
        table.add_row(row["format"], f"{_mib(row['bytes'])}{scored}")
    table.add_row("seconds", f"{report.timings_s.get('total', 0.0):.1f}")
    memory = ", ".join(f"{k} {_mib(v)}" for k, v in report.peak_memory_bytes.items() if k in ("rss", "cuda"))
    table.add_row("peak memory", memory)
    if report.fallback_modules:
        table.add_row("RTN fallbacks", str(len(report.fallback_modules)))
    return table


def quantize_command(argv: list[str] | None = None) -> int:
    """Run `quantfleet quantize` with `argv` (the arguments after "quantize"); returns the exit code."""
    args = build_parser().parse_args(argv)
    stderr = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bars = ProgressBars(RichProgressBar(*columns, console=stderr, transient=True))
    try:
        spec = spec_from_args(args)
        for line in summary_lines(plan_job(spec).to_dict()):  # the preflight: refuses bad input in seconds
            stderr.print(line, highlight=False, markup=False, soft_wrap=True)
        report = run_local(spec, args.out, on_progress=bars)
    except QuantFleetError as exc:
        bars.close()
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        bars.close()
    Console().print(summary_table(report, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "quantize":
        print("usage: python -m workers.cli quantize MODEL_DIR --method {rtn,gptq,awq} --out OUT_DIR [...]", file=sys.stderr)
        return EXIT_BAD_INPUT
    return quantize_command(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
