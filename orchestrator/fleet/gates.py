"""Quality gates: the most a job's quantization may cost in quality before its artifact is promoted.

A job carries `gate: {max_delta_ppl_pct, max_kl}` (either or both); once it has succeeded, its engine
report (workers/report.py, `eval.delta_ppl_pct` and `eval.kl_mean`) is checked against it. The job itself
still succeeds: the gate result says whether its artifact may go to the registry (webhook `job.gate_failed`
otherwise). A gate that cannot be checked, because the job was not evaluated or a metric is missing or not
a number, fails: promoting an artifact nobody measured is the mistake a gate exists to prevent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from workers.errors import InvalidSpecError

# gate field -> (metric in report["eval"], what it means)
THRESHOLDS = {
    "max_delta_ppl_pct": ("delta_ppl_pct", "perplexity increase in %"),
    "max_kl": ("kl_mean", "mean KL divergence"),
}


class GateSpecError(InvalidSpecError):
    """A gate that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Gate:
    max_delta_ppl_pct: float | None = None
    max_kl: float | None = None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Gate:
        """The gate for `spec`; GateSpecError for unknown fields, non-numbers or no threshold at all."""
        if not isinstance(spec, Mapping):
            raise GateSpecError('gate must be an object such as {"max_delta_ppl_pct": 5, "max_kl": 0.05}')
        unknown = sorted(set(spec) - set(THRESHOLDS))
        if unknown:
            raise GateSpecError(f"gate field(s) {', '.join(unknown)} unknown; use {', '.join(THRESHOLDS)}")
        values: dict[str, float | None] = {}
        for name in THRESHOLDS:
            value = spec.get(name)
            if value is None:
                values[name] = None
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise GateSpecError(f"gate {name} must be a finite number, not {value!r}")
            values[name] = float(value)
        if all(v is None for v in values.values()):
            raise GateSpecError(f"gate sets no threshold; give at least one of {', '.join(THRESHOLDS)}")
        if values["max_kl"] is not None and values["max_kl"] < 0:
            raise GateSpecError(
                f"gate max_kl={values['max_kl']} can never pass: KL divergence is never negative"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class GateCheck:
    threshold: str  # e.g. "max_kl"
    metric: str  # e.g. "kl_mean"
    limit: float
    value: float | None
    passed: bool


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed; empty when passed
    checks: list[GateCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "checks": [asdict(c) for c in self.checks],
        }


def evaluate_gate(gate: Gate | Mapping[str, Any], report: Mapping[str, Any] | None) -> GateResult:
    """Check a succeeded job's engine report (as a dict) against its gate."""
    gate = gate if isinstance(gate, Gate) else Gate.from_dict(gate)
    metrics = (report or {}).get("eval")
    if not metrics:
        return GateResult(
            passed=False,
            reasons=[
                "the job has a quality gate but was not evaluated, so the gate cannot be checked: "
                'add eval {"uri": ...} to the job'
            ],
        )
    checks: list[GateCheck] = []
    reasons: list[str] = []
    for threshold, limit in gate.to_dict().items():
        metric, meaning = THRESHOLDS[threshold]
        raw = metrics.get(metric)
        value = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
        if value is None or not math.isfinite(value):
            checks.append(GateCheck(threshold, metric, limit, None, False))
            reasons.append(
                f"{meaning} ({metric}) is {raw!r} in the evaluation, so {threshold} cannot be checked"
            )
            continue
        passed = value <= limit
        checks.append(GateCheck(threshold, metric, limit, value, passed))
        if not passed:
            reasons.append(f"{meaning} {metric}={value:.6g} is above {threshold}={limit:.6g}")
    return GateResult(passed=not reasons, reasons=reasons, checks=checks)
