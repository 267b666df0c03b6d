"""GPTQ v1 checkpoints name the modules they keep dense in `quantization_config.dynamic` (negative rules
"-:<regex>", as vLLM's gptq / gptq_marlin and GPTQModel read them: `re.match` on the module name).

For an MoE model (Qwen2-MoE: routers and the shared expert's gate) and a multimodal one (Qwen2.5-VL: the vision
tower), every Linear written dense is matched by a rule and no quantized Linear is; a dense model gets no
`dynamic` (`"lm_head": false` already says it), so its bytes are those of before.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.helpers import make_tiny_llama
from tests.moe_families import make_tiny_moe, make_tiny_multimodal
from tests.workers.test_moe import spec_for
from workers.engine import run_local
from workers.formats import gptq_v1
from workers.spec import OutputFormat


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import write_text_corpus

    return write_text_corpus(tmp_path_factory.mktemp("text") / "calibration.txt", 3000, seed=1)


def linears(out: Path) -> tuple[set[str], set[str]]:
    """(quantized modules, dense Linears: 2-D `.weight` tensors other than the input embeddings) of a checkpoint."""
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
    quantized = {n.removesuffix(".qweight") for n in shapes if n.endswith(".qweight")}
    dense = {n.removesuffix(".weight") for n, s in shapes.items()
             if n.endswith(".weight") and len(s) == 2 and "embed_tokens" not in n and "patch_embed" not in n}
    return quantized, dense


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen2_5_vl", "llama"])
def test_gptq_dynamic_rules_match_exactly_the_dense_linears(family: str, text: Path, tmp_path: Path) -> None:
    if family == "llama":
        model_dir = make_tiny_llama(tmp_path / "model", num_layers=2, seed=0)
    elif family == "qwen2_5_vl":
        model_dir = make_tiny_multimodal(family, tmp_path / "model")
    else:
        model_dir = make_tiny_moe(family, tmp_path / "model")
    spec = spec_for(model_dir, "rtn", text, samples=2)
    spec = type(spec)(**{**spec.__dict__, "formats": (OutputFormat.GPTQ,)})
    run_local(spec, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    quantized, dense = linears(tmp_path / "out")
    assert quantized and config["lm_head"] is False
    if family == "llama":
        assert "dynamic" not in config and dense <= {"lm_head"}  # tied embeddings: no head tensor
        return
    assert all(value == {} for value in config["dynamic"].values())  # negative rules carry no overrides
    rules = [re.compile(r) for r in gptq_v1.dense_rules(config)]
    assert len(rules) == len(config["dynamic"])

    def skipped(name: str) -> bool:
        return any(rule.match(name) for rule in rules)  # vLLM's get_dynamic_override: re.match

    assert {n for n in dense if not skipped(n)} == set(), "a dense Linear vLLM would build quantized"
    assert {n for n in quantized if skipped(n)} == set(), "a quantized Linear vLLM would build dense"
    if family == "qwen2_moe":
        assert {"model.layers.0.mlp.gate", "model.layers.1.mlp.shared_expert_gate", "lm_head"} <= dense
        assert len([n for n in quantized if ".experts." in n]) == 2 * 4 * 3
    else:  # every tower Linear, and vLLM's own names for them ("visual." stays, the LM moves under language_model.)
        assert any(n.startswith("visual.") for n in dense)
        assert skipped("visual.blocks.0.attn.qkv") and not skipped("language_model.model.layers.0.self_attn.q_proj")
