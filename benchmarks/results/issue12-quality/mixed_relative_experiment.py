"""One-off experiment behind a reading in benchmarks/quality.md (issue-12 section): mixed precision at 4.5 bits
per weight on SmolLM2 with each group's *relative* output error (error / output power) as the sensitivity
criterion, measured with min-max RTN, instead of the engine's absolute error with the job's observer. Same
protocol as benchmarks/scheme_quality.py (16 × 512 calibration, 8 eval windows, CPU). Run from the repo root:

    python3 benchmarks/results/issue12-quality/mixed_relative_experiment.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import scheme_quality  # noqa: E402

import workers.mixed_precision as mp  # noqa: E402
from workers.output_error import output_error  # noqa: E402

_rtn = mp.rtn_quantize


def relative(reference: Any, quantized: Any, sigma: Any) -> tuple[float, float]:
    _, rel = output_error(reference, quantized, sigma)
    return rel, rel


def minmax_rtn(weight: Any, grid: Any, **kwargs: Any) -> Any:
    return _rtn(weight, grid, **{**kwargs, "observer": "minmax", "importance": None})


if __name__ == "__main__":
    mp.output_error = relative  # type: ignore[assignment]
    mp.rtn_quantize = minmax_rtn  # type: ignore[assignment]
    raise SystemExit(scheme_quality.main([
        "--num-samples", "16", "--eval-windows", "8", "--device", "cpu", "--rows", "mixed4.5-gptq",
        "--work", "/tmp/qf-mixed-rel", "--results", "benchmarks/results/issue12-quality/mixed-relative-experiment.jsonl",
    ]))
