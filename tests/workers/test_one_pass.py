"""Several formats from one job share one calibration pass (issue 12, item 5): compressed-tensors and GGUF types
are grids solved from the same layer statistics in the one layer loop, each format written from its own grid.

Propagation (workers/pipeline.py): the next layer's inputs come from the first format's quantized layer. So,
exactly: the first format's file equals that of a job asking for it alone; every other GGUF file equals its
solo job's in every tensor but the Linears of layers ≥ 1 (solved on the inputs the primary's model produces);
and a secondary file depends on the primary alone, not on which other grids the job solves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from rich.console import Console

from tests.workers.test_gguf_export import (
    LLAMA_CPP,
    TEXT,
    _logits,
    calibration,
    read_back,
    tiny_model,
    tiny_moe_model,
)
from workers import moe, statistics
from workers.activations import ShardedActivations
from workers.cli import summary_table
from workers.engine import run_local
from workers.formats.gguf import GGUFFile
from workers.formats.writer import CheckpointWriter
from workers.job import build_manifest
from workers.loading import CheckpointWeights, LayerwiseModel
from workers.methods.gguf import GGUFGrid
from workers.pipeline import Output, quantize_model
from workers.quant.gptq import HessianAccumulator
from workers.report import EngineReport
from workers.spec import CalibrationSpec, EvalSpec, JobSpec, Method, OutputFormat
from workers.tensor_source import TensorSource
from workers.validation import check_against_model

CT, Q4_K_M, Q8_0 = OutputFormat.COMPRESSED_TENSORS, OutputFormat.GGUF_Q4_K_M, OutputFormat.GGUF_Q8_0
JOBS: dict[str, tuple[OutputFormat, ...]] = {
    "mixed": (CT, Q4_K_M, Q8_0),
    "ct": (CT,),
    "q4": (Q4_K_M,),
    "q8": (Q8_0,),
    "q4-first": (Q4_K_M, CT, Q8_0),
    "q4-q8": (Q4_K_M, Q8_0),
}
EVALUATED = ("mixed", "ct", "q4")
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _counting(calls: Counter[str], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return function(*args, **kwargs)

    return counted


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, EngineReport, Counter[str]]]]:
    """Every job of JOBS (gptq, 8 windows of 64 tokens) with its counts of statistics captures, Hessian batches
    and propagating forwards."""
    root = tmp_path_factory.mktemp("one-pass")
    text = root / "text.txt"
    text.write_text(TEXT)
    model = tiny_model(root / "model")
    done = {}
    for name, formats in JOBS.items():
        spec = JobSpec(
            model_dir=str(model), method=Method.GPTQ, formats=formats,
            calibration=CalibrationSpec(str(text), num_samples=8, seq_len=64),
            eval=EvalSpec(str(text), seq_len=64, max_windows=4) if name in EVALUATED else None,
        )
        calls: Counter[str] = Counter()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(statistics, "capture_inputs", _counting(calls, "capture", statistics.capture_inputs))
            patch.setattr(HessianAccumulator, "add", _counting(calls, "hessian_batch", HessianAccumulator.add))
            patch.setattr(ShardedActivations, "forward", _counting(calls, "propagate", ShardedActivations.forward))
            report = run_local(spec, root / name)
        done[name] = (root / name, report, calls)
    yield done


def _tensors(path: Path) -> dict[str, bytes]:
    return {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(str(path)).tensors}


def _dequantized(path: Path) -> dict[str, np.ndarray]:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            for t in gguf.GGUFReader(str(path)).tensors}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_calibration_pass_for_every_format(jobs: dict[str, tuple[Path, EngineReport, Counter[str]]]) -> None:
    # 2 layers: one capture forward each, 4 Linear groups (qkv, o, gate/up, down) × 1 chunk of 512 tokens, and
    # one propagating forward each: the same as a job of one format
    for name in JOBS:
        assert jobs[name][2] == {"capture": 2, "hessian_batch": 8, "propagate": 2}, name


def test_the_first_format_is_the_file_of_its_job_alone(jobs: dict[str, tuple[Path, EngineReport, Counter[str]]]) -> None:
    mixed, ct, q4, q4_first = (jobs[n][0] for n in ("mixed", "ct", "q4", "q4-first"))
    assert _sha(mixed / "model.safetensors") == _sha(ct / "model.safetensors")
    assert _sha(q4_first / "model-Q4_K_M.gguf") == _sha(q4 / "model-Q4_K_M.gguf")
    assert jobs["mixed"][1].eval == jobs["ct"][1].eval  # the primary's evaluation too
    assert [e.error for e in jobs["mixed"][1].module_errors] == [e.error for e in jobs["ct"][1].module_errors]


@pytest.mark.parametrize(("alone", "fmt"), [("q4", "Q4_K_M"), ("q8", "Q8_0")])
def test_other_gguf_files_differ_from_their_job_alone_in_the_linears_after_layer_0_only(
    jobs: dict[str, tuple[Path, EngineReport, Counter[str]]], alone: str, fmt: str
) -> None:
    mixed = _tensors(jobs["mixed"][0] / f"gguf-{fmt}" / f"model-{fmt}.gguf")
    solo = _tensors(jobs[alone][0] / f"model-{fmt}.gguf")
    assert mixed.keys() == solo.keys() and len(solo) == 2 * 9 + 2  # 7 Linears + 2 norms a layer, embedding, norm
    differing = {name for name in solo if mixed[name] != solo[name]}
    # embeddings, norms and layer 0 (same inputs) are identical; layer 1's Linears are solved on the inputs the
    # compressed-tensors model produces, not the Q4_K_M/Q8_0 model's
    assert differing == {f"blk.1.{linear}.weight" for linear in LINEARS}


def test_a_secondary_file_depends_on_the_primary_alone(jobs: dict[str, tuple[Path, EngineReport, Counter[str]]]) -> None:
    q8 = [jobs[name][0] / "gguf-Q8_0" / "model-Q8_0.gguf" for name in ("q4-first", "q4-q8")]
    assert _sha(q8[0]) == _sha(q8[1])  # with compressed-tensors solved beside them or not


def test_every_format_is_evaluated_and_listed(jobs: dict[str, tuple[Path, EngineReport, Counter[str]]]) -> None:
    out, report, _ = jobs["mixed"]
    saved = json.loads((out / "eval.json").read_text())
    rows = {row["format"]: row for row in saved["outputs"]}
    assert [row["format"] for row in saved["outputs"]] == ["compressed-tensors", "gguf:Q4_K_M", "gguf:Q8_0"]
    assert rows["compressed-tensors"]["path"] == "." and rows["compressed-tensors"]["grid"] == "scheme"
    assert rows["gguf:Q8_0"]["path"] == "gguf-Q8_0/model-Q8_0.gguf" and rows["gguf:Q8_0"]["grid"] == "gguf:Q8_0"
    assert rows["compressed-tensors"]["bytes"] == (out / "model.safetensors").stat().st_size == report.bytes_quantized
    for fmt in ("Q4_K_M", "Q8_0"):
        assert rows[f"gguf:{fmt}"]["bytes"] == (out / f"gguf-{fmt}" / f"model-{fmt}.gguf").stat().st_size
    assert rows["compressed-tensors"]["eval"] == saved["eval"]
    kl = {f: rows[f]["eval"]["kl_mean"] for f in rows}
    assert all(rows[f]["eval"]["tokens"] == saved["eval"]["tokens"] > 0 for f in rows)
    assert 0 < kl["gguf:Q8_0"] < kl["gguf:Q4_K_M"]  # 8.5 bits a weight beat 4.5-6
    assert rows["gguf:Q8_0"]["bits_per_weight"] == 8.5 and 4.5 < rows["gguf:Q4_K_M"]["bits_per_weight"] < 6.0
    # the Q4_K_M file evaluated alone (its own propagation) scores within 10 % of the one solved beside
    alone = jobs["q4"][1]
    assert alone.eval is not None and abs(kl["gguf:Q4_K_M"] / alone.eval.kl_mean - 1) < 0.1
    assert json.loads(build_manifest(report, []))["outputs"] == saved["outputs"]
    console = Console(width=200, record=True)  # `quantfleet quantize` prints every format's numbers
    console.print(summary_table(report, out))
    assert f"KL {kl['gguf:Q8_0']:.5f}" in console.export_text()


def test_gguf_grids_on_several_devices(tmp_path: Path) -> None:
    """Two CPU "devices" (calibration split, statistics merged on the primary, where the GGUF grid is solved):
    the GGUF file, first format of a job beside compressed-tensors, has the tensors of the one-device job up to
    codes on a rounding boundary (the merged Hessian is summed in another order; workers/statistics.py)."""
    model_dir = tiny_model(tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    ids = calibration(model_dir)
    cpu = torch.device("cpu")
    spec = JobSpec(model_dir=str(model_dir), method=Method.GPTQ, formats=(Q8_0, CT))
    info = check_against_model(spec)
    files = []
    for devices in (1, 2):
        path = tmp_path / str(devices) / "model-Q8_0.gguf"
        file = GGUFFile(path, model_dir, config, "Q8_0")
        writer = CheckpointWriter(tmp_path / str(devices) / "ct", CT, spec.scheme, info.dtype, act_order=True)
        grid = GGUFGrid("gguf:Q8_0", file.block_of, Method.GPTQ)
        quantize_model(LayerwiseModel(model_dir, cpu), CheckpointWeights(TensorSource(model_dir)),
                       dataclasses.replace(spec, devices=devices), [Output([file], grid), writer], ids,
                       devices=[cpu] * devices)
        file.finalize()
        writer.finalize(info.config)
        files.append(path)
        assert len(grid.result.module_errors) == 14
    one, two = _dequantized(files[0]), _dequantized(files[1])
    assert one.keys() == two.keys()
    for name, weight in one.items():  # a flipped code moves its row's later columns by GPTQ's compensation
        assert weight.shape == two[name].shape
        bound = 1e-3 if name.startswith("blk.0.") else 1e-2  # layer 0: same inputs; later: inputs moved too
        assert np.linalg.norm(weight - two[name]) <= bound * np.linalg.norm(weight), name


def test_with_rtn_every_gguf_file_is_the_file_of_its_job_alone(tmp_path: Path) -> None:
    """RTN on a GGUF grid reads no inputs (llama.cpp's own rules), so nothing of the propagation reaches it: beside
    a calibrated compressed-tensors RTN (which weighs its ranges by E[x²]), the file is the one of its job alone."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    model = tiny_model(tmp_path / "model")
    calibration_spec = CalibrationSpec(str(text), num_samples=8, seq_len=64)
    for name, formats in (("mixed", (CT, Q4_K_M)), ("alone", (Q4_K_M,))):
        run_local(JobSpec(model_dir=str(model), method=Method.RTN, formats=formats, calibration=calibration_spec),
                  tmp_path / name)
    assert _sha(tmp_path / "mixed" / "gguf-Q4_K_M" / "model-Q4_K_M.gguf") == _sha(tmp_path / "alone" / "model-Q4_K_M.gguf")
    saved = json.loads((tmp_path / "mixed" / "eval.json").read_text())
    assert len(saved["module_errors"]) == 14  # the calibrated compressed-tensors RTN reports its errors


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (`make llama-cpp` builds it)")
def test_llama_cpp_reads_a_file_solved_beside_another_format(
    jobs: dict[str, tuple[Path, EngineReport, Counter[str]]],
) -> None:
    from benchmarks.gguf_quality import llama_cpp_perplexity

    path = jobs["mixed"][0] / "gguf-Q4_K_M" / "model-Q4_K_M.gguf"
    model_dir = Path(jobs["mixed"][1].model)
    ids = calibration(model_dir, samples=12)[8:]
    logits = _logits(read_back(path), model_dir, ids)
    nll = -torch.log_softmax(logits[:, :-1].double(), -1).gather(2, ids[:, 1:].unsqueeze(2)).mean()
    ours = math.exp(float(nll))
    theirs = llama_cpp_perplexity(path, ids, threads=2)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


def test_gguf_grids_solve_moe_layers_in_the_expert_passes(tmp_path: Path) -> None:
    """A GGUF grid goes through an MoE layer's solve passes (workers/moe.py `solve_layer`) as the scheme does: with a
    one-expert statistics budget its file is byte-identical to the one-pass job's, each pass is one capture shared by
    every format of the job, and eval.json notes each expert's routed tokens."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    model = tiny_moe_model(tmp_path / "model", "qwen3_moe", experts=4)

    def job(name: str, formats: tuple[OutputFormat, ...], budget: int | None = None) -> tuple[Path, int]:
        spec = JobSpec(model_dir=str(model), method=Method.GPTQ, formats=formats,
                       calibration=CalibrationSpec(str(text), num_samples=8, seq_len=64))
        calls: Counter[str] = Counter()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(statistics, "capture_inputs", _counting(calls, "capture", statistics.capture_inputs))
            if budget is not None:
                patch.setattr(moe, "STATISTICS_BUDGET_BYTES", budget)
            run_local(spec, tmp_path / name)
        return tmp_path / name, calls["capture"]

    one, one_captures = job("one", (Q4_K_M,))
    split, split_captures = job("split", (Q4_K_M,), budget=1)
    both, both_captures = job("both", (CT, Q4_K_M), budget=1)
    assert one_captures == 2  # 2 layers, everything in one pass
    assert split_captures == both_captures == 2 * 4  # the dense groups with expert 0, then experts 1, 2, 3 alone
    assert _sha(split / "model-Q4_K_M.gguf") == _sha(one / "model-Q4_K_M.gguf")
    for out in (split, both):
        notes = [e["note"] or "" for e in json.loads((out / "eval.json").read_text())["module_errors"]
                 if ".experts." in e["module"]]
        assert len(notes) == 2 * 4 * 3 and all("calibrated on all 512" in n for n in notes), notes
