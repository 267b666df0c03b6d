"""Mixture-of-Experts models through the whole engine: every expert quantized and calibrated, routers dense.

Tiny random models of Mixtral, Qwen2-MoE (shared expert + its gate), Qwen3-MoE, DeepSeek-V3 (dense layer 0,
shared experts, latent attention) and gpt-oss (fused, transposed, interleaved experts with biases), saved by
transformers' own `save_pretrained` (tests/moe_families.py). For each, with GPTQ, AWQ and RTN:
- every expert of every MoE layer is quantized (counted against the config), under the per-expert names of the
  original checkpoints; routers and gates stay dense;
- transformers + compressed-tensors loads the checkpoint and its logits equal QuantFleet's fake-quantized model
  (the layerwise model over the checkpoint read back) within 1e-3 (gpt-oss: see its test);
- GPTQ's and AWQ's output errors beat RTN's;
- AWQ's smoothing alone (scales folded, nothing rounded) leaves the float model's logits unchanged: the norm's
  scales reach every expert, the shared experts, the routers and gates.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Llama4TextConfig
from transformers.utils.quantization_config import CompressedTensorsConfig

from tests.helpers import write_text_corpus
from tests.moe_families import MOE, MOE_LAYERS, NUM_EXPERTS, make_tiny_moe
from tests.workers.layerwise import layerwise_logits, quantized_modules, relative, stored
from workers import moe
from workers.awq_mappings import AWQ_MAPPINGS
from workers.engine import run_local
from workers.errors import InvalidSpecError
from workers.evaluate import QuantizedWeights
from workers.loading import CheckpointWeights, LayerwiseModel
from workers.methods import awq
from workers.model_graph import LayerPlan, build_skeleton, conversions
from workers.pipeline import quantize_model
from workers.preflight import plan_job, summary_lines
from workers.quant.grid import QuantizedTensor
from workers.report import EngineReport
from workers.spec import W8A8_INT8, CalibrationSpec, JobSpec, Method, QuantScheme
from workers.tensor_source import TensorSource
from workers.validation import check_against_model

CPU = torch.device("cpu")
SEQ_LEN = 32
EXPERT_LINEARS = {
    "mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
    "gpt_oss": ("gate_proj", "up_proj", "down_proj"),
}
BLOCK = {"mixtral": "block_sparse_moe"}  # the MoE block's name in the checkpoint (transformers names it `mlp`)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text") / "calibration.txt", 3000, seed=1)


def spec_for(model_dir: Path, method: str, text: Path, *, samples: int = 8, seq_len: int = SEQ_LEN) -> JobSpec:
    return JobSpec(
        model_dir=str(model_dir), method=Method(method), scheme=QuantScheme(bits=4, group_size=32, symmetric=True),
        calibration=CalibrationSpec(path=str(text), num_samples=samples, seq_len=seq_len),
    )


def expected_experts(family: str) -> set[str]:
    block = BLOCK.get(family, "mlp")
    return {f"model.layers.{layer}.{block}.experts.{e}.{linear}" for layer in MOE_LAYERS.get(family, [0, 1])
            for e in range(NUM_EXPERTS) for linear in EXPERT_LINEARS[family]}


def expert_records(report: EngineReport) -> list[str]:
    return [e.note or "" for e in report.module_errors if ".experts." in e.module]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_moe_family_quantizes_every_expert_loads_and_matches(family: str, text: Path, tmp_path: Path) -> None:
    model_dir = make_tiny_moe(family, tmp_path / "model")
    model = LayerwiseModel(model_dir, CPU)
    ids = torch.randint(4, 290, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    original = layerwise_logits(model, CheckpointWeights(TensorSource(model_dir)), ids)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert relative(original, reference(ids).logits) < 1e-5  # the unfused experts compute the fused ones
    routers = {n for n, s in stored(model_dir).items() if n.endswith((".gate.weight", ".shared_expert_gate.weight"))}
    assert routers

    errors = {}
    for method in ("rtn", "gptq", "awq"):
        out = tmp_path / method
        plan = plan_job(spec_for(model_dir, method, text))
        report = run_local(spec_for(model_dir, method, text), out)
        quantized = quantized_modules(out)
        assert plan.quantized_count == len(quantized) == sum(q.count for q in plan.quantized)
        written = (out / "model.safetensors").stat().st_size
        assert abs(plan.output_bytes["compressed-tensors"] - written) <= 0.25 * written
        (block,) = plan.experts
        assert (block.layers, block.experts, block.linears) == (len(MOE_LAYERS.get(family, [0, 1])), NUM_EXPERTS,
                                                                EXPERT_LINEARS[family])
        assert block.pattern == f"model.layers.*.{BLOCK.get(family, 'mlp')}.experts" and block.fused_in_model
        assert not block.fused_in_checkpoint and block.dense and all("gate" in d for d in block.dense)
        assert {d.kind for d in plan.dense if d.pattern.endswith(block.dense)} == {"router"}
        experts = {m for m in quantized if ".experts." in m}
        assert experts == expected_experts(family), method  # every expert of every MoE layer, original names
        assert len(experts) == len(MOE_LAYERS.get(family, [0, 1])) * NUM_EXPERTS * 3
        assert routers <= set(stored(out)), method  # routers and gates stay dense, unquantized
        assert not any(".gate." in m or m.endswith("gate") for m in quantized)
        assert any(".shared_expert" in m for m in quantized) == (family in ("qwen2_moe", "deepseek_v3"))
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        for router in block.dense:  # vLLM builds e.g. Qwen3-MoE's gate with the checkpoint's quant_config
            assert f"re:.*\\.{re.escape(router)}$" in config["ignore"], router
        assert len(expert_records(report)) == len(experts)
        assert all("calibrated on all 256" in note for note in expert_records(report))

        ours = layerwise_logits(model, QuantizedWeights(out, model.model_dtype), ids)
        loaded = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        ).float()  # transformers 5.17 leaves decompressed experts in the checkpoint's dtype
        with torch.no_grad():
            assert relative(loaded(ids).logits, ours) < 1e-3, method
        assert 1e-4 < relative(ours, original) < 1.0, method  # quantized, and still the model
        if family == "qwen2_moe" and method == "gptq":  # compressed-tensors' own modules: the ignored gate stays dense
            compressed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            with torch.no_grad():
                assert relative(compressed(ids).logits.float(), ours) < 1e-3
        errors[method] = sum(e.error for e in report.module_errors)
        if method == "awq":  # every mapping of the family, the experts' up → down once per expert
            assert len(plan.awq_mappings) == len(AWQ_MAPPINGS[family]), plan.awq_mappings
            assert any(".experts.*." in m for m in plan.awq_mappings), plan.awq_mappings
    assert errors["gptq"] < errors["rtn"], errors
    assert errors["awq"] < 0.95 * errors["rtn"], errors


def _transformers_gpt_oss(checkpoint: Path) -> torch.nn.Module:
    """transformers' own GptOss model with the checkpoint decompressed into it by compressed-tensors, as transformers'
    compressed-tensors quantizer loads a model (apply the config, compress the skeleton, load, decompress). transformers
    5 has no conversion for per-expert gpt-oss tensors, so its fused experts module is first replaced by per-expert
    Linears (workers.moe.unfuse_experts, equal to the fused module in float: the test above), as llm-compressor's
    own gpt-oss flow linearizes them."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(checkpoint), dtype=torch.float32)
    moe.unfuse_experts(model, conversions(model))
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor(quantization_config=QuantizationConfig.model_validate(config))
    apply_quantization_config(model, compressor.quantization_config)
    compressor.compress_model(model)
    loaded = model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    assert not loaded.missing_keys and not loaded.unexpected_keys, loaded
    compressor.decompress_model(model)
    return model.float()


def test_gpt_oss_fused_experts_are_split_quantized_and_read_back(text: Path, tmp_path: Path) -> None:
    """gpt-oss stores its experts fused ([E, H, 2I], gate/up columns interleaved, biases): they are split into
    per-expert Linears, all quantized (biases dense), read back by QuantFleet's reader to the fake-quantized
    model, and by transformers + compressed-tensors with the experts linearized (`_transformers_gpt_oss`) to the
    same logits within 1e-3. vLLM 0.26 reads gpt-oss experts only fused (bf16 or MXFP4), so it cannot serve these."""
    model_dir = make_tiny_moe("gpt_oss", tmp_path / "model")
    assert "model.layers.0.mlp.experts.gate_up_proj" in stored(model_dir)  # fused in the source checkpoint
    model = LayerwiseModel(model_dir, CPU)
    ids = torch.randint(4, 290, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    original = layerwise_logits(model, CheckpointWeights(TensorSource(model_dir)), ids)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
    assert relative(original, reference) < 1e-5
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        out = tmp_path / method
        report = run_local(spec_for(model_dir, method, text), out)
        assert {m for m in quantized_modules(out) if ".experts." in m} == expected_experts("gpt_oss")
        names = stored(out)
        assert names["model.layers.1.mlp.experts.3.down_proj.bias"] == (64,)  # the expert biases, dense
        assert "model.layers.1.mlp.router.weight" in names and "model.layers.1.mlp.router.bias" in names
        ours = layerwise_logits(model, QuantizedWeights(out, model.model_dtype), ids)
        assert 1e-4 < relative(ours, original) < 1.0
        with torch.no_grad():
            assert relative(_transformers_gpt_oss(out)(ids).logits, ours) < 1e-3, method
        errors[method] = sum(e.error for e in report.module_errors)
    assert errors["gptq"] < errors["rtn"], errors
    assert errors["awq"] < 0.95 * errors["rtn"], errors


def test_an_expert_the_router_never_picks_is_still_calibrated(text: Path, tmp_path: Path) -> None:
    """Expert 3's router row scores below the others for every token: 0 routed tokens, yet GPTQ solves it with
    the Hessian of all calibration tokens (a real solve: its output error beats RTN's), never an RTN fallback."""
    model_dir = make_tiny_moe("mixtral", tmp_path / "model", biased_expert=3)
    reports = {m: run_local(spec_for(model_dir, m, text), tmp_path / m) for m in ("rtn", "gptq")}
    gptq = reports["gptq"]
    biased = [e for e in gptq.module_errors if ".experts.3." in e.module]
    assert len(biased) == 2 * 3  # both layers, w1 w3 w2
    for record in biased:
        assert record.note is not None and record.note.startswith("expert 3: routed 0 of 256 tokens, calibrated on all 256")
        assert not record.fell_back_to_rtn and record.error > 0
    others = [e.note for e in gptq.module_errors if ".experts.0." in e.module]
    assert all(note and "routed 0 " not in note for note in others)
    rtn = {(e.layer, e.module): e.error for e in reports["rtn"].module_errors}
    assert sum(e.error for e in biased) < sum(rtn[(e.layer, e.module)] for e in biased)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in stored(tmp_path / "gptq")


def test_experts_with_too_few_tokens_are_dampened_more_and_listed(text: Path, tmp_path: Path) -> None:
    """16 calibration tokens, fewer than an expert's 64 gate/up and 32 down_proj inputs: every expert group is
    solved with 10× the dampening, listed in eval.json's fallbacks with its token count; attention keeps the job's."""
    model_dir = make_tiny_moe("qwen3_moe", tmp_path / "model")
    out = tmp_path / "out"
    report = run_local(spec_for(model_dir, "gptq", text, samples=1, seq_len=16), out)
    saved = json.loads((out / "eval.json").read_text())
    starved = [f for f in saved["fallback_modules"] if ".experts." in f]
    assert len(starved) == 2 * NUM_EXPERTS * 3  # each expert's three Linears in both layers
    assert all("routed" in f and "of 16 tokens" in f and "dampening 0.1" in f for f in starved)
    assert sum("fewer tokens than its 32 inputs" in f for f in starved) == 2 * NUM_EXPERTS  # the down_proj
    assert not any("self_attn" in f for f in report.fallback_modules)


def test_expert_passes_fit_the_budget_and_give_the_same_checkpoint(
    text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = make_tiny_moe("qwen2_moe", tmp_path / "model")
    layer = LayerwiseModel(model_dir, CPU).decoder_layer(0, CheckpointWeights(TensorSource(model_dir)))
    names = [n for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.shared_expert.gate_proj")]
    expert_down = [f"mlp.experts.{e}.down_proj" for e in range(NUM_EXPERTS)]
    plan = LayerPlan(tuple((n,) for n in names[:2]) + ((names[2], "mlp.experts.0.gate_proj"),)
                     + tuple((n,) for n in expert_down))
    down_bytes = 4 * 32 * 32
    passes = moe.plan_passes(layer, plan, budget=3 * 4 * 64 * 64 + 2 * down_bytes)
    assert [len(p.groups) for p in passes] == [5, 2]  # the dense groups + 2 experts, then the other 2
    assert moe.plan_passes(layer, plan, budget=1) == [LayerPlan(plan.groups[:4]), *(LayerPlan((g,)) for g in plan.groups[4:])]

    one = run_local(spec_for(model_dir, "gptq", text), tmp_path / "one")
    monkeypatch.setattr(moe, "STATISTICS_BUDGET_BYTES", 2 * down_bytes)  # experts in passes of two
    split = run_local(spec_for(model_dir, "gptq", text), tmp_path / "split")
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "split" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())  # noqa: SIM118
        for name in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    assert [e.module for e in one.module_errors] == [e.module for e in split.module_errors]


def test_awq_expert_passes_come_first_with_their_own_mappings(text: Path, tmp_path: Path) -> None:
    """AWQ over the budget: chunks of experts first, each holding its experts' down_proj statistics twice (their
    routed statistics too) and only their own up → down mappings; then every other group with the other mappings."""
    model_dir = make_tiny_moe("qwen3_moe", tmp_path / "model")
    model, weights = LayerwiseModel(model_dir, CPU), CheckpointWeights(TensorSource(model_dir))
    layer = model.decoder_layer(0, weights)
    hidden = model.embed(torch.randint(4, 290, (1, 8)), weights)
    plan = model.layer_plan(layer, hidden, model.layer_calls(8, weights)[0])
    down_bytes = 4 * 32 * 32
    assert moe.plan_passes(layer, plan, budget=10**9, smoothing=True) == [plan]
    passes = moe.plan_passes(layer, plan, budget=2 * 2 * down_bytes, smoothing=True)
    assert [p.linears for p in passes[:2]] == [
        ("mlp.experts.0.down_proj", "mlp.experts.1.down_proj"), ("mlp.experts.2.down_proj", "mlp.experts.3.down_proj")]
    assert [[(m.prev, m.linears) for m in p.awq_mappings] for p in passes[:2]] == [
        [(f"mlp.experts.{e}.up_proj", (f"mlp.experts.{e}.down_proj",)) for e in (0, 1)],
        [(f"mlp.experts.{e}.up_proj", (f"mlp.experts.{e}.down_proj",)) for e in (2, 3)]]
    last = passes[2]
    assert set(last.linears) | {n for p in passes[:2] for n in p.linears} == set(plan.linears)
    assert {m.prev for m in last.awq_mappings} == {m.prev for m in plan.awq_mappings} - {
        f"mlp.experts.{e}.up_proj" for e in range(NUM_EXPERTS)}
    assert len(moe.plan_passes(layer, plan, budget=1, smoothing=True)) == NUM_EXPERTS + 1  # one expert a pass


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_awq_in_expert_passes_quantizes_every_expert_within_the_budget(
    method: str, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a budget of one expert's statistics, AWQ solves each expert's down_proj in its own pass, holding only that
    expert's routed statistics, and the whole layer after: every expert quantized, each down_proj's error within
    a few percent of the one-pass job's (the same scales, searched on the same statistics), the whole model's close."""
    model_dir = make_tiny_moe("qwen3_moe", tmp_path / "model")
    one = run_local(spec_for(model_dir, method, text), tmp_path / "one")
    held: list[int] = []
    capture = awq.awq_moe.capture

    def counting(work: object, mappings: object) -> awq.awq_moe.MoeCapture:
        found = capture(work, mappings)  # type: ignore[arg-type]
        held.append(sum(r.weighted.numel() * 4 for r in found.routed.values()))
        return found

    monkeypatch.setattr(awq.awq_moe, "capture", counting)
    monkeypatch.setattr(moe, "STATISTICS_BUDGET_BYTES", 1)
    split = run_local(spec_for(model_dir, method, text), tmp_path / "split")
    assert quantized_modules(tmp_path / "split") == quantized_modules(tmp_path / "one")
    assert {m for m in quantized_modules(tmp_path / "split") if ".experts." in m} == expected_experts("qwen3_moe")
    assert held.count(4 * 32 * 32) == 2 * NUM_EXPERTS and max(held) == 4 * 32 * 32  # one expert's routed Σ a pass
    errors = {(e.layer, e.module): e.error for e in one.module_errors}
    for record in split.module_errors:
        if record.module.endswith("down_proj") and ".experts." in record.module:
            assert record.error == pytest.approx(errors[(record.layer, record.module)], rel=0.05), record.module
    assert sum(e.error for e in split.module_errors) == pytest.approx(sum(errors.values()), rel=0.1)


def test_preflight_counts_expert_statistics_within_the_budget(
    text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen3-MoE layer: q k v o read 64 features (4·64² bytes each, an upper bound), all experts' gate/up one
    shared 64-feature input, each expert's down_proj 32 features."""
    model_dir = make_tiny_moe("qwen3_moe", tmp_path / "model")
    dense, shared, down = 4 * 4 * 64 * 64, 4 * 64 * 64, 4 * 32 * 32
    plan = plan_job(spec_for(model_dir, "gptq", text))
    assert plan.memory.statistics == plan.experts[0].statistics_bytes == dense + shared + NUM_EXPERTS * down
    monkeypatch.setattr(moe, "STATISTICS_BUDGET_BYTES", dense + shared + 2 * down)  # two experts per pass
    assert plan_job(spec_for(model_dir, "gptq", text)).memory.statistics == dense + shared + 2 * down
    monkeypatch.setattr(moe, "STATISTICS_BUDGET_BYTES", 1)  # one expert per pass, the rest in the first
    assert plan_job(spec_for(model_dir, "gptq", text)).memory.statistics == dense + shared + down
    # AWQ: each expert's routed statistics too, and the block's input and output (float32) beside the other groups:
    # in one pass when it fits, else expert passes first and the rest after (workers/moe.py plan_passes)
    block_io = 2 * 4 * 8 * SEQ_LEN * 64
    monkeypatch.setattr(moe, "STATISTICS_BUDGET_BYTES", 4 * 2**30)
    awq_plan = plan_job(spec_for(model_dir, "awq", text))
    assert awq_plan.memory.statistics == dense + shared + 2 * NUM_EXPERTS * down + block_io
    monkeypatch.setattr(moe, "STATISTICS_BUDGET_BYTES", 1)
    assert plan_job(spec_for(model_dir, "awq", text)).memory.statistics == dense + shared + block_io
    assert "mlp.experts.*.up_proj → mlp.experts.*.down_proj" in awq_plan.awq_mappings
    summary = "\n".join(summary_lines(plan.to_dict()))
    assert "experts: model.layers.*.mlp.experts ×2 layers, 4 experts each, all quantized" in summary
    assert "dense: mlp.gate" in summary and "mlp.experts.*.down_proj ×8 [64×32]" in summary


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("budget", [None, 1], ids=["one-pass", "expert-passes"])
def test_awq_smoothing_alone_leaves_the_float_moe_model_unchanged(
    family: str, budget: int | None, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWQ with its scales searched and folded but nothing rounded, on a float32 model: the checkpoint's logits equal
    the original's within 1e-4, though the norms before the MoE blocks, every expert's gate/up, the shared experts
    and the routers and gates (dense, never quantized) all changed."""
    model_dir = make_tiny_moe(family, tmp_path / "model", dtype=torch.float32)
    monkeypatch.setattr(awq.Awq, "solve", lambda self, work: (awq.smooth(work), {})[1])
    if budget is not None:  # each expert's up → down in its own pass, then the rest (workers/moe.py plan_passes)
        monkeypatch.setattr(moe, "STATISTICS_BUDGET_BYTES", budget)
    out = tmp_path / "smoothed"
    run_local(spec_for(model_dir, "awq", text, samples=2), out)
    model = LayerwiseModel(model_dir, CPU)
    ids = torch.randint(4, 290, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    original = layerwise_logits(model, CheckpointWeights(TensorSource(model_dir)), ids)
    smoothed = layerwise_logits(model, QuantizedWeights(out, model.model_dtype), ids)
    assert relative(smoothed, original) < 1e-4
    with safe_open(str(model_dir / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        changed = {n for n in a.keys() if n in b.keys() and not torch.equal(a.get_tensor(n), b.get_tensor(n))}  # noqa: SIM118
    block, layers = BLOCK.get(family, "mlp"), MOE_LAYERS.get(family, [0, 1])
    readers = {"mixtral": ["gate"], "qwen2_moe": ["gate", "shared_expert_gate", "shared_expert.gate_proj"],
               "qwen3_moe": ["gate"], "deepseek_v3": ["gate", "shared_experts.up_proj"], "gpt_oss": ["router"]}[family]
    for layer in layers:
        prefix = f"model.layers.{layer}."
        assert f"{prefix}post_attention_layernorm.weight" in changed
        assert {f"{prefix}{block}.{r}.weight" for r in readers} <= changed, sorted(changed)
        if family != "gpt_oss":  # (its experts are stored fused: compared through the logits only)
            gate = EXPERT_LINEARS[family][0]
            assert {f"{prefix}{block}.experts.{e}.{gate}.weight" for e in range(NUM_EXPERTS)} <= changed


def test_awq_scores_an_expert_on_the_tokens_routed_to_it(
    text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expert 3 of Mixtral is never routed to: its up → down scale search sees no token (the block's output does not
    depend on its w2), so s = 1 and its w2 stays as stored, while the routed experts' w2 are scaled; every expert's
    w1/w3 get the norm's scales (searched on the block's routed output), and the model's logits are unchanged."""
    model_dir = make_tiny_moe("mixtral", tmp_path / "model", biased_expert=3, dtype=torch.float32)
    monkeypatch.setattr(awq.Awq, "solve", lambda self, work: (awq.smooth(work), {})[1])
    out = tmp_path / "smoothed"
    run_local(spec_for(model_dir, "awq", text, samples=2), out)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        def ratio(name: str) -> torch.Tensor:  # per input column: stored after / before
            return (b.get_tensor(name) / a.get_tensor(name)).mean(dim=0)

        for layer in (0, 1):
            experts = f"model.layers.{layer}.block_sparse_moe.experts"
            assert torch.equal(ratio(f"{experts}.3.w2.weight"), torch.ones(32))
            assert all((ratio(f"{experts}.{e}.w2.weight") - 1).abs().max() > 0.05 for e in (0, 1, 2))
            norm_scale = ratio(f"{experts}.3.w1.weight")
            assert (norm_scale - 1).abs().max() > 0.05 and torch.allclose(ratio(f"{experts}.0.w1.weight"), norm_scale)
            assert torch.allclose(ratio(f"{experts}.3.w3.weight"), norm_scale)  # its rows: not divided (s = 1)
    model = LayerwiseModel(model_dir, CPU)
    ids = torch.randint(4, 290, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    original = layerwise_logits(model, CheckpointWeights(TensorSource(model_dir)), ids)
    assert relative(layerwise_logits(model, QuantizedWeights(out, model.model_dtype), ids), original) < 1e-4


def test_awq_is_refused_for_an_moe_family_without_mappings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          text: Path) -> None:
    model_dir = make_tiny_moe("qwen3_moe", tmp_path / "model")
    monkeypatch.setitem(AWQ_MAPPINGS, "qwen3_moe", AWQ_MAPPINGS["llama"][:2])  # attention only
    with pytest.raises(InvalidSpecError, match="method awq needs smoothing pairs for the Mixture-of-Experts layers of "
                                               "Qwen3MoeForCausalLM .* mixtral, qwen2_moe"):
        run_local(spec_for(model_dir, "awq", text), tmp_path / "out")


def test_smoothquant_is_refused_for_moe_with_the_reason(text: Path, tmp_path: Path) -> None:
    """SmoothQuant folds with AWQ's pairs but its fold reaches no router and its search no routed output."""
    model_dir = make_tiny_moe("qwen2_moe", tmp_path / "model")
    spec = dataclasses.replace(spec_for(model_dir, "gptq", text), scheme=W8A8_INT8, smoothquant=0.8)
    with pytest.raises(InvalidSpecError, match="SmoothQuant is not supported for the Mixture-of-Experts layers of "
                                               "Qwen2MoeForCausalLM"):
        check_against_model(spec)


def test_experts_in_a_layout_without_transformers_flags_are_refused() -> None:
    """Llama-4's text experts are fused 3-D tensors with no experts-layout flags (transposed? interleaved?):
    refused with the reason instead of being left unquantized."""
    config = Llama4TextConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                              num_local_experts=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              vocab_size=100)
    with pytest.raises(InvalidSpecError, match=r"Llama4TextExperts at model\.layers\.0\.feed_forward\.experts: "
                                                r"gate_up_proj, down_proj\) are stored in a layout"):
        build_skeleton(config)


def test_observed_experts_see_every_token_while_the_output_keeps_only_the_routed() -> None:
    """The calibration forward (pre-hooks on the experts' Linears) runs every token through every expert, and
    the MoE block's output is still the routed one: equal to the unobserved forward's."""
    class_name, overrides = MOE["qwen3_moe"]
    config = getattr(transformers, class_name)(
        vocab_size=300, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, **overrides
    )
    torch.manual_seed(0)
    block = AutoModelForCausalLM.from_config(config).model.layers[0].mlp
    fused = block.experts
    moe.unfuse_experts(block, [])
    experts = block.experts
    assert isinstance(experts, moe.ExpertLinears) and len(experts.experts()) == NUM_EXPERTS
    state = experts.split_fused({"gate_up_proj": fused.gate_up_proj.detach(), "down_proj": fused.down_proj.detach()}, "")
    experts.load_state_dict(state)
    hidden = torch.randn(1, 40, 64)
    with torch.no_grad():
        routed = block(hidden)
        seen: dict[str, int] = {}
        handles = [linear.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].shape[0]))
            for name, linear in experts.named_modules() if isinstance(linear, torch.nn.Linear)]
        observed = block(hidden)
    for handle in handles:
        handle.remove()
    assert seen == {f"{e}.{p}": 40 for e in range(NUM_EXPERTS) for p in ("gate_proj", "up_proj", "down_proj")}
    assert torch.allclose(observed, routed, atol=1e-6)
    assert int(experts.routed_tokens.sum()) == 2 * 2 * 40  # two forwards, two experts per token


class _Collect:
    """A checkpoint sink that keeps what it is given."""

    def __init__(self) -> None:
        self.quantized: dict[str, QuantizedTensor] = {}

    def add_dense(self, name: str, tensor: torch.Tensor) -> None:
        pass

    def add_quantized(self, module_name: str, qt: QuantizedTensor) -> None:
        self.quantized[module_name] = qt


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_two_devices_calibrate_every_expert_like_one(method: str, text: Path, tmp_path: Path) -> None:
    """Calibration windows split over two devices: each replica routes its own tokens, the counts add up to the
    one-device counts, and the codes are those of one device (Hessian sums differ only in addition order; AWQ's MoE
    search reads every device's windows through the primary)."""
    model_dir = make_tiny_moe("qwen2_moe", tmp_path / "model")
    spec = spec_for(model_dir, method, text)
    ids = torch.randint(4, 290, (8, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    runs = {}
    for devices in ([CPU], [CPU, CPU]):
        model = LayerwiseModel(model_dir, CPU)
        sink = _Collect()
        result = quantize_model(model, CheckpointWeights(TensorSource(model_dir)), spec, [sink], ids, devices=devices)
        runs[len(devices)] = (sink.quantized, {(e.layer, e.module): e.note for e in result.module_errors})
    (one, one_notes), (two, two_notes) = runs[1], runs[2]
    assert one.keys() == two.keys() and len([n for n in one if ".experts." in n]) == 2 * NUM_EXPERTS * 3
    experts = {k: v for k, v in one_notes.items() if ".experts." in k[1]}
    assert experts and all(two_notes[k] == note for k, note in experts.items())  # same routed counts, summed
    codes = sum(int((one[n].q != two[n].q).sum()) for n in one)
    assert codes <= 1e-3 * sum(one[n].q.numel() for n in one)
