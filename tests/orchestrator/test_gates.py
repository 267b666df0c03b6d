"""Quality gates against engine reports: pass, fail with reasons, and gates that cannot be checked."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import pytest

from orchestrator.fleet.gates import Gate, GateSpecError, evaluate_gate
from workers.report import EngineReport, EvalMetrics


def report(delta_ppl_pct: float = 2.5, kl_mean: float = 0.02, *, evaluated: bool = True) -> dict[str, Any]:
    metrics = EvalMetrics(
        ppl_original=10.0,
        ppl_quantized=10.0 * (1 + delta_ppl_pct / 100),
        delta_ppl_pct=delta_ppl_pct,
        kl_mean=kl_mean,
        kl_p99=kl_mean * 8,
        top1_agreement=0.93,
        tokens=4096,
        windows=8,
        seq_len=512,
    )
    return EngineReport(
        model="tiny",
        architecture="llama",
        method="gptq",
        bits=4,
        group_size=32,
        symmetric=True,
        formats=["compressed-tensors"],
        num_layers=2,
        eval=metrics if evaluated else None,
    ).to_dict()


def test_within_both_limits_passes() -> None:
    result = evaluate_gate({"max_delta_ppl_pct": 3, "max_kl": 0.05}, report(2.5, 0.02))
    assert result.passed and result.reasons == []
    assert [(c.metric, c.value, c.limit, c.passed) for c in result.checks] == [
        ("delta_ppl_pct", 2.5, 3.0, True),
        ("kl_mean", 0.02, 0.05, True),
    ]


def test_a_value_equal_to_the_limit_passes() -> None:
    assert evaluate_gate({"max_kl": 0.02}, report(kl_mean=0.02)).passed


def test_each_exceeded_limit_is_a_reason() -> None:
    result = evaluate_gate(Gate(max_delta_ppl_pct=1.0, max_kl=0.01), report(2.5, 0.02))
    assert not result.passed
    assert result.reasons == [
        "perplexity increase in % delta_ppl_pct=2.5 is above max_delta_ppl_pct=1",
        "mean KL divergence kl_mean=0.02 is above max_kl=0.01",
    ]


def test_only_the_thresholds_given_are_checked() -> None:
    result = evaluate_gate({"max_kl": 0.05}, report(delta_ppl_pct=500.0, kl_mean=0.01))
    assert result.passed and [c.threshold for c in result.checks] == ["max_kl"]


def test_a_negative_delta_limit_demands_an_improvement() -> None:
    assert not evaluate_gate({"max_delta_ppl_pct": -1}, report(delta_ppl_pct=0.5)).passed
    assert evaluate_gate({"max_delta_ppl_pct": -1}, report(delta_ppl_pct=-2.0)).passed


def test_a_job_without_evaluation_fails_its_gate_with_a_clear_reason() -> None:
    result = evaluate_gate({"max_kl": 0.05}, report(evaluated=False))
    assert not result.passed and result.checks == []
    assert "not evaluated" in result.reasons[0] and "add eval" in result.reasons[0]
    assert not evaluate_gate({"max_kl": 0.05}, None).passed


def test_a_missing_or_nan_metric_fails_rather_than_passes() -> None:
    nan = report()
    nan["eval"]["kl_mean"] = math.nan
    missing = report()
    del missing["eval"]["delta_ppl_pct"]
    r1 = evaluate_gate({"max_kl": 1.0}, nan)
    r2 = evaluate_gate({"max_delta_ppl_pct": 100.0}, missing)
    assert not r1.passed and "kl_mean) is nan" in r1.reasons[0]
    assert not r2.passed and "delta_ppl_pct) is None" in r2.reasons[0]


def test_result_serialises_for_the_job_row() -> None:
    d = evaluate_gate({"max_kl": 0.01}, report(kl_mean=0.02)).to_dict()
    assert d["passed"] is False and d["checks"][0] == asdict(
        evaluate_gate({"max_kl": 0.01}, report(kl_mean=0.02)).checks[0]
    )
    assert Gate.from_dict({"max_kl": 0.05}).to_dict() == {"max_kl": 0.05}


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({}, "sets no threshold"),
        ({"max_ppl": 3}, r"max_ppl unknown; use max_delta_ppl_pct, max_kl"),
        ({"max_kl": "0.1"}, "finite number, not '0.1'"),
        ({"max_kl": math.inf}, "finite number"),
        ({"max_kl": True}, "finite number"),
        ({"max_kl": -0.1}, "can never pass"),
        ([0.1], "must be an object"),
    ],
)
def test_bad_gate_spec_says_what_to_fix(spec: Any, words: str) -> None:
    with pytest.raises(GateSpecError, match=words):
        Gate.from_dict(spec)
