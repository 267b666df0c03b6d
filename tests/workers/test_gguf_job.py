"""GGUF formats through the job spec: `run_local` writes each GGUF format of a job (each evaluated like every
checkpoint; beside other formats: tests/workers/test_one_pass.py), the submit-time checks refuse what cannot be
written with a message saying what to change, the preflight estimates the file, and the API schema and CLI accept
`gguf:<type>`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from pydantic import ValidationError

from api.schemas import OutputIn
from tests.families import make_tiny_family
from tests.workers.test_gguf_export import TEXT, tiny_model, tiny_moe_model
from workers import statistics
from workers.engine import run_local
from workers.errors import InvalidSpecError
from workers.job import file_kind
from workers.preflight import plan_job
from workers.spec import CalibrationSpec, EvalSpec, JobSpec, Method, OutputFormat, QuantScheme
from workers.validation import check_against_model

Q4_K_M, Q8_0, Q4_0 = OutputFormat.GGUF_Q4_K_M, OutputFormat.GGUF_Q8_0, OutputFormat.GGUF_Q4_0


def _spec(model_dir: Path, text: Path, **changes: object) -> JobSpec:
    fields: dict[str, object] = dict(
        model_dir=str(model_dir), method=Method.GPTQ, formats=(Q4_K_M, Q8_0),
        calibration=CalibrationSpec(str(text), num_samples=8, seq_len=64),
        eval=EvalSpec(str(text), seq_len=64, max_windows=4),
    )
    fields.update(changes)
    return JobSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
def model_and_text(tmp_path: Path) -> tuple[Path, Path]:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return tiny_model(tmp_path / "model"), text


def test_run_local_writes_and_evaluates_every_gguf_format(tmp_path: Path, model_and_text: tuple[Path, Path]) -> None:
    model_dir, text = model_and_text
    spec = _spec(model_dir, text)
    plan = plan_job(spec)
    report = run_local(spec, tmp_path / "out")
    primary = tmp_path / "out" / "model-Q4_K_M.gguf"
    second = tmp_path / "out" / "gguf-Q8_0" / "model-Q8_0.gguf"
    assert primary.is_file() and second.is_file()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(second)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["formats"] == ["gguf:Q4_K_M", "gguf:Q8_0"]
    assert sorted(saved["files"]) == sorted(["model-Q4_K_M.gguf", "gguf-Q8_0/model-Q8_0.gguf", "eval.json"])
    assert report.eval is not None and report.eval.tokens > 0 and report.eval.kl_mean > 0
    assert [row["eval"]["kl_mean"] for row in saved["outputs"]][0] == report.eval.kl_mean
    assert 0 < saved["outputs"][1]["eval"]["kl_mean"] < report.eval.kl_mean  # Q8_0 beats Q4_K_M
    assert report.bytes_quantized == primary.stat().st_size
    assert report.bits_per_weight is not None and 4.5 < report.bits_per_weight < 6.0
    assert len(report.module_errors) == 14 and all(0 < m.relative_error < 1 for m in report.module_errors)
    # the preflight's estimate: the tensor data of each file (the metadata, mostly the vocabulary, on top)
    for fmt, path in ((Q4_K_M, primary), (Q8_0, second)):
        data = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
        assert plan.output_bytes[fmt.value] == data


def test_an_awq_job_of_one_gguf_type_runs_and_is_evaluated(tmp_path: Path, model_and_text: tuple[Path, Path]) -> None:
    """method awq with one GGUF type: scales searched on the GGUF grid and folded, every Linear rounded on it, the
    file scored like any other. (This random model has no outlier channels for AWQ to protect: it lands within
    a few percent of RTN; tests/workers/test_gguf_export.py measures the gain on one that has.)"""
    model_dir, text = model_and_text
    reports = {m: run_local(_spec(model_dir, text, method=m, formats=(Q4_0,)), tmp_path / m.value)
               for m in (Method.AWQ, Method.RTN)}
    awq = reports[Method.AWQ]
    assert (tmp_path / "awq" / "model-Q4_0.gguf").is_file()
    assert len(awq.module_errors) == 14 and all(0 < m.relative_error < 1 for m in awq.module_errors)
    assert awq.eval is not None and reports[Method.RTN].eval is not None
    assert awq.eval.tokens == reports[Method.RTN].eval.tokens > 0
    assert 0.5 < awq.eval.kl_mean / reports[Method.RTN].eval.kl_mean < 1.5
    saved = json.loads((tmp_path / "awq" / "eval.json").read_text())
    assert saved["formats"] == ["gguf:Q4_0"] and saved["method"] == "awq"


def test_awq_smooths_once_for_every_format_of_a_job(tmp_path: Path, model_and_text: tuple[Path, Path]) -> None:
    """method awq with compressed-tensors and a GGUF type: the layer is smoothed once, with the first format's scale
    search, and every format rounds that layer. So the first format's file is its job alone's, byte for byte (in
    either order), both files carry the same folded norms, and each layer has one statistics capture."""
    model_dir, text = model_and_text
    ct = OutputFormat.COMPRESSED_TENSORS
    jobs = {"ct": (ct,), "q4": (Q4_0,), "ct-q4": (ct, Q4_0), "q4-ct": (Q4_0, ct)}
    captures: dict[str, int] = dict.fromkeys(jobs, 0)
    running = [""]
    capture = statistics.capture_inputs

    def counted(*args: Any, **kwargs: Any) -> Any:
        captures[running[0]] += 1
        return capture(*args, **kwargs)

    reports = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(statistics, "capture_inputs", counted)
        for name, f in jobs.items():
            running[0] = name
            reports[name] = run_local(_spec(model_dir, text, method=Method.AWQ, formats=f), tmp_path / name)
    assert set(captures.values()) == {2}, captures  # 2 layers, one capture each, however many formats
    files = {"ct": "model.safetensors", "q4": "model-Q4_0.gguf"}
    assert (tmp_path / "ct-q4" / files["ct"]).read_bytes() == (tmp_path / "ct" / files["ct"]).read_bytes()
    assert (tmp_path / "q4-ct" / files["q4"]).read_bytes() == (tmp_path / "q4" / files["q4"]).read_bytes()
    from safetensors.torch import load_file

    ct_tensors = load_file(str(tmp_path / "ct-q4" / files["ct"]))
    gguf_tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ct-q4" / "gguf-Q4_0" / files["q4"])).tensors}
    norm = ct_tensors["model.layers.0.post_attention_layernorm.weight"].float().numpy()
    assert (gguf_tensors["blk.0.ffn_norm.weight"].data == norm).all()  # the fold AWQ made, in both files
    original = load_file(str(model_dir / "model.safetensors"))["model.layers.0.post_attention_layernorm.weight"]
    assert not (original.float().numpy() == norm).all()
    both = reports["ct-q4"]
    assert both.eval is not None and reports["ct"].eval is not None and both.eval == reports["ct"].eval
    saved = json.loads((tmp_path / "ct-q4" / "eval.json").read_text())
    assert [o["format"] for o in saved["outputs"]] == ["compressed-tensors", "gguf:Q4_0"]
    assert 0 < saved["outputs"][1]["eval"]["kl_mean"] < 1


def test_a_moe_gguf_job_quantizes_every_expert_and_is_evaluated(tmp_path: Path) -> None:
    """Qwen3-MoE to Q4_K_M through run_local: every expert of both layers solved by GPTQ on the GGUF grid, written
    stacked, read back per expert for the evaluation."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    model_dir = tiny_moe_model(tmp_path / "model", "qwen3_moe")
    spec = _spec(model_dir, text, formats=(Q4_K_M,))
    plan = plan_job(spec)
    report = run_local(spec, tmp_path / "out")
    data = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(tmp_path / "out" / "model-Q4_K_M.gguf")).tensors)
    assert plan.output_bytes[Q4_K_M.value] == data  # the preflight's estimate counts the stacked experts
    experts = {m.module for m in report.module_errors if ".experts." in m.module}
    assert len(experts) == 4 * 3  # per layer: 4 experts × gate, up, down (the module names repeat over the 2 layers)
    assert sum(".experts." in m.module for m in report.module_errors) == 2 * 4 * 3
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "out" / "model-Q4_K_M.gguf")).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert report.eval is not None and 0 < report.eval.kl_mean < 1 and report.eval.tokens > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"formats": (OutputFormat.COMPRESSED_TENSORS, Q4_K_M), "method": Method.RTN,
          "scheme": QuantScheme.from_preset("fp8-dynamic")}, "only with a weight-only integer scheme"),
        ({"formats": (OutputFormat.COMPRESSED_TENSORS, Q4_K_M), "scheme": QuantScheme.from_preset("w8a8-int8")},
         "only with a weight-only integer scheme"),
        ({"formats": (OutputFormat.COMPRESSED_TENSORS, Q4_K_M), "kv_cache_fp8": True}, "no FP8 KV-cache scales"),
        ({"method": Method.AWQ_GPTQ, "formats": (Q4_K_M,)}, "rtn, gptq or awq"),
    ],
)
def test_spec_refuses_what_gguf_cannot_do(model_and_text: tuple[Path, Path], changes: dict[str, object], message: str) -> None:
    model_dir, text = model_and_text
    with pytest.raises(InvalidSpecError, match=message):
        _spec(model_dir, text, **changes).validate()


def test_submit_check_refuses_an_architecture_gguf_export_does_not_cover(
    tmp_path: Path, model_and_text: tuple[Path, Path]
) -> None:
    _, text = model_and_text
    model_dir = make_tiny_family("olmo2", tmp_path / "olmo2")
    with pytest.raises(InvalidSpecError, match="GGUF export of llama.cpp architecture 'olmo2' is not implemented"):
        check_against_model(_spec(model_dir, text))
    # a Gemma-2 llama.cpp would run differently (queries scaled by 1/√256, not 1/√head_dim) is refused, saying so
    model_dir = make_tiny_family("gemma2", tmp_path / "gemma2")
    with pytest.raises(InvalidSpecError, match=r"1/√head_dim \(16\).*query_pre_attn_scalar"):
        check_against_model(_spec(model_dir, text))


def test_the_scheme_group_size_does_not_apply_to_gguf(tmp_path: Path, model_and_text: tuple[Path, Path]) -> None:
    """Hidden 96 is no multiple of the default group size 128; GGUF's 32-blocks tile it (K-quants fall back)."""
    _, text = model_and_text
    model_dir = tiny_model(tmp_path / "narrow", hidden=96)
    info = check_against_model(_spec(model_dir, text, method=Method.RTN, formats=(Q4_K_M,)))
    assert info.num_layers == 2


def test_api_schema_and_cli_accept_gguf_formats() -> None:
    assert OutputIn(formats=["gguf:Q4_K_M", "gguf:Q8_0"]).formats == ["gguf:Q4_K_M", "gguf:Q8_0"]
    with pytest.raises(ValidationError):
        OutputIn(formats=["gguf:Q3_Z"])  # type: ignore[list-item]
    from workers.formats.gguf import FILE_TYPES

    assert {f.value for f in OutputFormat if f.is_gguf} == {f"gguf:{t}" for t in FILE_TYPES}
    assert file_kind("gguf-Q8_0/model-Q8_0.gguf") == "weights"  # the artifact list and registry see the file
