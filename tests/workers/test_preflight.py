"""The preflight (workers/preflight.py): the plan of a job from config.json and the safetensors headers only.

For every family of tests/families.py: the decoder layers, every Linear of every decoder layer quantized
(counted on the transformers model itself), embeddings and lm_head dense, positive estimates, and a
JSON-serialisable plan. For the tiny Llama, the size estimate is within ±25% of the checkpoint `run_local`
writes. Models that are not decoder-only causal LMs, and combinations a format cannot store, are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig

from tests.families import FAMILIES, make_tiny_family
from tests.helpers import write_text_corpus
from workers.awq_mappings import AWQ_MAPPINGS
from workers.engine import run_local
from workers.errors import InvalidSpecError
from workers.preflight import plan_job, summary_lines
from workers.spec import CalibrationSpec, JobSpec, Method, OutputFormat, QuantScheme


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text") / "calibration.txt", 2000, seed=1)


def _spec(model_dir: Path, method: str = "rtn", *, text: Path | None = None, symmetric: bool = True,
          formats: tuple[OutputFormat, ...] = (OutputFormat.COMPRESSED_TENSORS,), group_size: int = 32) -> JobSpec:
    return JobSpec(
        model_dir=str(model_dir), method=Method(method),
        scheme=QuantScheme(bits=4, group_size=group_size, symmetric=symmetric),
        calibration=CalibrationSpec(path=str(text) if text else None, num_samples=8, seq_len=32),
        formats=formats, device="cpu",
    )


def _every_linear(model_dir: Path) -> set[str]:
    """Every Linear of every decoder layer, from the transformers model itself (on meta)."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.get_decoder().layers
    return {f"{i}.{name}" for i, layer in enumerate(layers) for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plan_of_each_family(family: str, text: Path, tmp_path: Path) -> None:
    model_dir = make_tiny_family(family, tmp_path / "model")
    method = "awq" if FAMILIES[family][0] and _has_awq(model_dir) else "gptq"
    spec = _spec(model_dir, method, text=text, formats=(OutputFormat.COMPRESSED_TENSORS, OutputFormat.GPTQ))
    plan = plan_job(spec)
    assert plan.num_layers == 2 and plan.architecture == type_name(model_dir)
    linears = _every_linear(model_dir)
    assert plan.quantized_count == len(linears) == sum(q.count for q in plan.quantized)
    assert {q.pattern.rsplit("*.", 1)[1] for q in plan.quantized} == {name.split(".", 1)[1] for name in linears}
    kinds = {d.kind for d in plan.dense}
    assert {"embeddings", "lm_head", "norm"} <= kinds
    assert not any(d.pattern == q.pattern and "weight" in d.tensors for d in plan.dense for q in plan.quantized)
    assert plan.memory.cpu > plan.memory.layer_cpu > 0 and plan.memory.gpu > plan.memory.layer_gpu > 0
    assert plan.memory.statistics > 0 and plan.memory.activations_cpu == 2 * 8 * 32 * 64 * 4
    assert set(plan.output_bytes) == {"compressed-tensors", "gptq"}
    assert all(0 < size < plan.weight_bytes for size in plan.output_bytes.values())
    assert bool(plan.awq_mappings) == (method == "awq")
    stored = json.loads(json.dumps(plan.to_dict()))
    assert stored == plan.to_dict()
    summary = "\n".join(summary_lines(stored))
    assert plan.architecture in summary and f"{plan.quantized_count} Linears" in summary


def _has_awq(model_dir: Path) -> bool:
    return json.loads((model_dir / "config.json").read_text())["model_type"] in AWQ_MAPPINGS


def type_name(model_dir: Path) -> str:
    return str(json.loads((model_dir / "config.json").read_text())["architectures"][0])


@pytest.mark.parametrize(
    ("symmetric", "formats"),
    [(True, (OutputFormat.COMPRESSED_TENSORS, OutputFormat.GPTQ)), (False, (OutputFormat.COMPRESSED_TENSORS,))],
)
def test_size_estimate_matches_the_written_checkpoint(
    symmetric: bool, formats: tuple[OutputFormat, ...], tmp_path: Path
) -> None:
    model_dir = make_tiny_family("llama", tmp_path / "model")
    spec = _spec(model_dir, symmetric=symmetric, formats=formats)
    plan = plan_job(spec)
    run_local(spec, tmp_path / "out")
    for i, fmt in enumerate(formats):
        folder = tmp_path / "out" / ("" if i == 0 else fmt.value)
        written = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        estimate = plan.output_bytes[fmt.value]
        assert abs(estimate - written) <= 0.25 * written, (fmt, estimate, written)


def test_memory_counts_statistics_and_activations(text: Path, tmp_path: Path) -> None:
    model_dir = make_tiny_family("llama", tmp_path / "model")
    rtn = plan_job(_spec(model_dir))
    gptq = plan_job(_spec(model_dir, "gptq", text=text))
    assert rtn.memory.statistics == rtn.memory.activations_cpu == 0 and rtn.memory.cpu == rtn.memory.layer_cpu
    # one Hessian (4·in² bytes) per Linear: q, k, v, o, gate, up read 64 features, down 128
    assert gptq.memory.statistics == 6 * 4 * 64 * 64 + 4 * 128 * 128
    assert gptq.memory.cpu == gptq.memory.layer_cpu + gptq.memory.statistics + gptq.memory.activations_cpu
    assert gptq.memory.layer_cpu == 2 * gptq.memory.layer_gpu  # float32 on CPU, float16 on a GPU


@pytest.mark.parametrize("architectures", [None, ["BertForMaskedLM"]])
def test_an_encoder_only_model_is_refused(architectures: list[str] | None, tmp_path: Path) -> None:
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, architectures=architectures)
    config.save_pretrained(tmp_path / "bert")
    with pytest.raises(InvalidSpecError, match="is not supported: .*decoder-only causal language models"):
        plan_job(_spec(tmp_path / "bert"))


def test_a_gptq_format_the_shapes_cannot_pack_is_refused(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=100, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    spec = _spec(tmp_path / "model", group_size=-1, formats=(OutputFormat.GPTQ,))
    with pytest.raises(InvalidSpecError, match=r"divisible by 8 for 4-bit.*compressed-tensors"):
        plan_job(spec)
    assert plan_job(_spec(tmp_path / "model", group_size=-1)).quantized_count == 7


def test_quantize_cli_prints_the_plan_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workers.cli import quantize_command

    model_dir = make_tiny_family("llama", tmp_path / "model")
    capsys.readouterr()
    code = quantize_command([str(model_dir), "--method", "rtn", "--group-size", "32", "--device", "cpu",
                             "--out", str(tmp_path / "out")])
    assert code == 0
    err = capsys.readouterr().err
    assert err.startswith("plan: LlamaForCausalLM (llama, float16), 2 decoder layers at model.layers.*; rtn w4 g32")
    assert "quantized: 14 Linears" in err and "output (est.): compressed-tensors" in err
    assert "\n  peak memory (est.): " in err  # one line each, never wrapped
