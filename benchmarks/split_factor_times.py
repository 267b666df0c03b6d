"""The inverse-Hessian factorisation of one big Hessian: one device's vs split over N devices (issue 13, item 1).

For each size n it times, one step after another on one device (so no step competes with another for the
same cores or SMs):
* `3-step`: cholesky → cholesky_inverse → cholesky, the factorisation one device ran before (≈ 4/3·n³);
* `one device`: `prepare_hessian` (workers/quant/inverse_hessian.py: the Cholesky of the reversed Hessian and
  its triangular inverse, ≈ 2/3·n³), what a single device runs now;
* the split path's steps (workers/quant/split_inverse.py): the Cholesky of the reversed Hessian (one device),
  each device's range of columns of the triangular inverse for N = 2, 3, 4, 8 (each range timed alone: what
  that device does while the others do theirs), and the assembly of U;
and prints the critical path of the split path, Cholesky + slowest range + assembly (+ on GPUs the copies
of L and of the blocks, which this does not time: ~n²·4 bytes each over NVLink), against one device's time.
It also checks U against the one-device factor.

CPU (measured in benchmarks/gpu.md): python benchmarks/split_factor_times.py --sizes 1792,3584 --reps 5
GPU: python3 benchmarks/split_factor_times.py --sizes 4096,14336,28672 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from workers.quant.inverse_hessian import (  # noqa: E402
    flipped_cholesky,
    flipped_upper,
    inverse_columns,
    prepare_hessian,
)
from workers.quant.split_inverse import column_ranges  # noqa: E402


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[float, Any]:
    """Median seconds of `reps` calls (after one warm-up call), and the last result."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def hessian(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(2 * n, n, generator=g) * torch.logspace(-1, 0.5, n)
    return (2 * x.T @ x / (2 * n)).to(device)


def three_step(h: torch.Tensor, dampening: float = 0.01) -> torch.Tensor:
    """The factorisation before workers/quant/inverse_hessian.py: cholesky(cholesky_inverse(cholesky(H)), upper)."""
    damped = h.clone()
    damped.diagonal().add_(dampening * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


def measure(n: int, device: torch.device, counts: list[int], reps: int) -> dict[str, Any]:
    h = hessian(n, device)
    three_s, before = timed(lambda: three_step(h), device, reps)
    one_s, one = timed(lambda: prepare_hessian(h), device, reps)
    chol_s, factor = timed(lambda: flipped_cholesky(h), device, reps)
    lower = factor.lower
    assert lower is not None and one.hinv is not None
    row: dict[str, Any] = {"n": n, "three_step_ms": 1e3 * three_s, "one_device_ms": 1e3 * one_s,
                           "cholesky_ms": 1e3 * chol_s, "split": {},
                           "max_rel_diff_one_device_vs_three_step": float((one.hinv - before).abs().max()
                                                                          / before.abs().max())}
    for count in counts:
        ranges = column_ranges(n, [1.0] * count)
        range_ms: list[float] = []
        blocks: list[torch.Tensor] = []
        for a, b in ranges:
            def solve(a: int = a, b: int = b) -> torch.Tensor:
                return inverse_columns(lower, a, b)

            seconds, block = timed(solve, device, reps)
            range_ms.append(1e3 * seconds)
            blocks.append(block)

        def assemble(ranges: list[tuple[int, int]] = ranges, blocks: list[torch.Tensor] = blocks) -> torch.Tensor:
            return flipped_upper(blocks, ranges, n, device)

        assemble_s, upper = timed(assemble, device, reps)
        error = float((upper - one.hinv).abs().max() / one.hinv.abs().max())
        critical = 1e3 * chol_s + max(range_ms) + 1e3 * assemble_s
        row["split"][str(count)] = {
            "ranges": ranges, "range_ms": range_ms, "assemble_ms": 1e3 * assemble_s, "critical_path_ms": critical,
            "speedup_vs_one_device": 1e3 * one_s / critical, "max_rel_diff_vs_one_device": error,
        }
    return row


def format_rows(rows: list[dict[str, Any]], device: str) -> str:
    lines = [f"device {device}; ms, median; critical path = Cholesky + slowest range + assembly (copies not timed)",
             f"{'n':>6} {'3-step':>9} {'one dev':>9} {'Cholesky':>9} {'N':>3} {'ranges (ms each)':>36} {'assemble':>9} {'critical':>9} {'speed-up':>8} {'|ΔU|/|U|':>9}"]
    for row in rows:
        for count, s in row["split"].items():
            ranges = " ".join(f"{ms:.1f}" for ms in s["range_ms"])
            lines.append(f"{row['n']:>6} {row['three_step_ms']:>9.1f} {row['one_device_ms']:>9.1f} {row['cholesky_ms']:>9.1f} {count:>3} {ranges:>36} "
                         f"{s['assemble_ms']:>9.1f} {s['critical_path_ms']:>9.1f} {s['speedup_vs_one_device']:>7.2f}x "
                         f"{s['max_rel_diff_vs_one_device']:>9.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1792,3584")
    p.add_argument("--counts", default="2,3,4,8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--results", default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (one per device; 1 keeps a busy shared "
                   "machine's timings stable)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # the engine's factorisation runs in float32
    counts = [int(c) for c in args.counts.split(",")]
    rows = [measure(int(n), device, counts, args.reps) for n in args.sizes.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    table = format_rows(rows, name)
    print(table, flush=True)
    if args.results:
        Path(args.results).write_text(json.dumps({"device": name, "rows": rows, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
