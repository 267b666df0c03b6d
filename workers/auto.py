"""Method "auto": quantize with every candidate the job allows, keep the one closest to the original model.

"Closest" is the lowest mean KL divergence of next-token distributions, original vs quantized, on
calibration windows that no candidate calibrated on: `holdout_count(n)` extra windows drawn from the same
calibration text with the same seed (one stream, so they never overlap a calibration window). Candidates
run in the order given; with a time budget, a candidate is started only if, at the pace of those before
it, it would end within the budget (the first always runs). Every candidate's KL, top-1 agreement and
seconds go into eval.json, with the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from workers.spec import CalibrationSpec, JobSpec, Method, Observer, parse_candidate

HOLDOUT_MAX = 16


def holdout_count(num_samples: int) -> int:
    """Held-out windows for a job calibrating on `num_samples`: an eighth of them, between 2 and 16."""
    return max(2, min(HOLDOUT_MAX, num_samples // 8))


def with_holdout(calibration: CalibrationSpec) -> CalibrationSpec:
    """The calibration request that also draws the held-out windows."""
    return replace(calibration, num_samples=calibration.num_samples + holdout_count(calibration.num_samples))


def split_holdout(windows: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """(calibration `[num_samples, seq]`, held out `[rest, seq]`): held-out windows evenly spread over the
    text (windows come in text order), so both parts cover all of it."""
    total = windows.shape[0]
    held = torch.linspace(0, total - 1, total - num_samples).round().long().unique()
    keep = torch.ones(total, dtype=torch.bool)
    keep[held] = False
    return windows[keep], windows[held]


@dataclass(frozen=True)
class Candidate:
    name: str
    method: Method
    observer: Observer

    def spec(self, job: JobSpec) -> JobSpec:
        return replace(job, method=self.method, observer=self.observer)


def candidates(job: JobSpec) -> list[Candidate]:
    return [Candidate(text, *parse_candidate(text)) for text in job.auto_candidates]


def fits_budget(elapsed: float, finished: int, budget: float | None) -> bool:
    """Start another candidate? Always the first; then only if the average pace says it ends in time."""
    if budget is None or finished == 0:
        return True
    return elapsed + elapsed / finished <= budget


def choose(kl: dict[str, float]) -> str:
    """The candidate with the lowest held-out KL (the earlier one on a tie)."""
    return min(kl, key=lambda name: (kl[name], list(kl).index(name)))
