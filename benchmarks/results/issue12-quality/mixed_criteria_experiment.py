"""Diagnostic rows behind the mixed-precision causes table of benchmarks/quality.md (issue 12.3): the engine's
allocation at 4.5 bits per weight on SmolLM2 with its Fisher weighting (workers/fisher.py) replaced, all else as
the engine does it (GPTQ-solved errors tr(ΔW H ΔWᵀ), the same allocator and uniform floor). Same protocol as
benchmarks/scheme_quality.py (16 × 512 calibration, 8 eval windows, CPU). Run from the repo root:

    python3 benchmarks/results/issue12-quality/mixed_criteria_experiment.py absolute
    python3 benchmarks/results/issue12-quality/mixed_criteria_experiment.py relative

absolute: every output channel weighs 1 (the summed squared output error of each group);
relative: each group's error divided by its output energy tr(W H Wᵀ) (its noise-to-signal ratio).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import scheme_quality  # noqa: E402

import workers.mixed_precision as mp  # noqa: E402
from workers.tensor_source import TensorSource  # noqa: E402

_measure_group = mp.measure_group


def unit_fisher(model: Any, *_args: Any, **_kwargs: Any) -> dict[str, torch.Tensor]:
    shapes = TensorSource(model.model_dir).headers()
    return {name[: -len(".weight")]: torch.ones(shape[0]) for name, (_, shape) in shapes.items()
            if name.endswith(".weight") and len(shape) == 2}


def relative_group(work: Any, names: Any, linears: Any, hessian: torch.Tensor, rows: torch.Tensor) -> mp.GroupChoice:
    choice = _measure_group(work, names, linears, hessian, rows)
    weight = torch.cat([m.weight for m in linears]).to(torch.float32)
    power = float(((weight @ hessian.to(torch.float32)) * weight).sum())
    choice.errors = {grid: error / power for grid, error in choice.errors.items()}
    return choice


if __name__ == "__main__":
    criterion = sys.argv[1]
    mp.output_fisher = unit_fisher  # type: ignore[assignment]
    if criterion == "relative":
        mp.measure_group = relative_group  # type: ignore[assignment]
    raise SystemExit(scheme_quality.main([
        "--num-samples", "16", "--eval-windows", "8", "--device", "cpu", "--threads", "1", "--rows", "mixed4.5-gptq",
        "--work", f"/tmp/qf-mixed-{criterion}",
        "--results", f"benchmarks/results/issue12-quality/mixed-{criterion}-gptq-experiment.jsonl",
    ]))
