"""Method auto (candidates, held-out KL, the choice in eval.json), AWQ followed by GPTQ, and the range
search ("mse" observer) through the whole engine on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from workers import auto
from workers.engine import run_local
from workers.errors import InvalidSpecError
from workers.spec import JobSpec, Method, parse_candidate


def test_holdout_windows_are_spread_and_disjoint() -> None:
    windows = torch.arange(20).reshape(20, 1)
    calibration, held = auto.split_holdout(windows, 16)
    assert calibration.shape == (16, 1) and held.shape == (4, 1)
    assert set(held[:, 0].tolist()).isdisjoint(calibration[:, 0].tolist())
    assert held[0, 0] == 0 and held[-1, 0] == 19  # from both ends of the text
    assert [auto.holdout_count(n) for n in (1, 16, 128, 4096)] == [2, 2, 16, 16]


def test_candidates_parse_and_bad_ones_say_what_to_fix(make_spec: Callable[..., JobSpec]) -> None:
    assert parse_candidate("gptq:mse") == (Method.GPTQ, "mse")
    assert parse_candidate("awq-gptq") == (Method.AWQ_GPTQ, "minmax")
    with pytest.raises(InvalidSpecError, match="method 'squeeze' is not one of"):
        make_spec("auto", auto_candidates=("squeeze",)).validate()
    with pytest.raises(InvalidSpecError, match="observer 'l1' is not one of"):
        make_spec("auto", auto_candidates=("gptq:l1",)).validate()
    with pytest.raises(InvalidSpecError, match="auto_budget_s"):
        make_spec("auto", auto_budget_s=0.0).validate()
    assert auto.fits_budget(100.0, 0, 1.0)  # the first candidate always runs
    assert not auto.fits_budget(60.0, 1, 100.0) and auto.fits_budget(40.0, 1, 100.0)


def test_auto_keeps_the_candidate_with_the_lowest_held_out_kl(make_spec: Callable[..., JobSpec], tmp_path: Path) -> None:
    spec = make_spec("auto", auto_candidates=("rtn", "gptq", "awq-gptq"))
    report = run_local(spec, tmp_path / "out")
    assert report.auto is not None
    cands = report.auto["candidates"]
    assert [c["name"] for c in cands] == ["rtn", "gptq", "awq-gptq"] and report.auto["skipped"] == []
    best = min(cands, key=lambda c: c["kl_mean"])
    assert report.auto["chosen"] == best["name"] and report.method == best["method"]
    assert best["name"] != "rtn"  # calibrated methods beat RTN on held-out text
    assert report.auto["holdout_windows"] == auto.holdout_count(spec.calibration.num_samples)
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["auto"] == json.loads(json.dumps(report.auto))
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []  # candidates gone
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", quantization_config=CompressedTensorsConfig(dequantize=True))
    assert model is not None


def test_auto_respects_its_time_budget(make_spec: Callable[..., JobSpec], tmp_path: Path) -> None:
    report = run_local(make_spec("auto", auto_candidates=("gptq", "awq", "rtn"), auto_budget_s=1e-6), tmp_path / "out")
    assert report.auto is not None
    assert [c["name"] for c in report.auto["candidates"]] == ["gptq"]
    assert report.auto["skipped"] == ["awq", "rtn"] and report.method == "gptq"


@pytest.mark.parametrize(("method", "observer"), [("awq-gptq", "minmax"), ("gptq", "mse"), ("rtn", "mse")])
def test_composite_methods_and_the_range_search_beat_plain_rtn(
    make_spec: Callable[..., JobSpec], tmp_path: Path, method: str, observer: str
) -> None:
    baseline = run_local(make_spec("rtn", bits=3, observer="minmax"), tmp_path / "rtn")
    report = run_local(make_spec(method, bits=3, observer=observer), tmp_path / "out")
    assert report.eval is not None and baseline.eval is not None
    assert report.eval.kl_mean < baseline.eval.kl_mean
    assert len(report.module_errors) == 14
