from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from workers.architectures import ARCHITECTURES, architecture_info
from workers.errors import InvalidSpecError

SMALL: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
)
CONFIGS = {
    "LlamaForCausalLM": LlamaConfig(**SMALL),
    "MistralForCausalLM": MistralConfig(**SMALL),
    "Qwen2ForCausalLM": Qwen2Config(**SMALL),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_name_in_the_table_exists_in_the_transformers_model(name: str) -> None:
    """The table is the only place module names live, so it must match transformers' real modules."""
    info = ARCHITECTURES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIGS[name])
    assert type(model).__name__ == name
    for path in (info.embed_tokens, info.final_norm, info.lm_head, info.rotary_emb, info.layers):
        model.get_submodule(path)
    layer = model.get_submodule(info.layers)[0]
    linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert set(info.linears) == linears  # every Linear of the layer is quantized, none is invented
    for mapping in info.awq_mappings:
        layer.get_submodule(mapping.prev)
        assert mapping.linears in info.linear_groups  # a mapping scales exactly one shared-input group


def test_llama_layout() -> None:
    info = architecture_info(["LlamaForCausalLM"])
    assert info.linear_groups == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    assert [(m.prev, m.linears[0]) for m in info.awq_mappings] == [
        ("input_layernorm", "self_attn.q_proj"),
        ("self_attn.v_proj", "self_attn.o_proj"),
        ("post_attention_layernorm", "mlp.gate_proj"),
        ("mlp.up_proj", "mlp.down_proj"),
    ]
    assert info.group_of("self_attn.k_proj") == info.linear_groups[0]
    assert info.layer_prefix(7) == "model.layers.7."
    with pytest.raises(KeyError):
        info.group_of("mlp.nonexistent")


def test_first_known_architecture_in_the_list_wins() -> None:
    assert architecture_info(["SomethingElse", "Qwen2ForCausalLM"]).name == "Qwen2ForCausalLM"


@pytest.mark.parametrize("architectures", [["GPT2LMHeadModel"], [], None])
def test_unknown_architecture_names_the_supported_ones(architectures: list[str] | None) -> None:
    with pytest.raises(InvalidSpecError) as err:
        architecture_info(architectures)
    message = str(err.value)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert name in message
    if architectures:
        assert "GPT2LMHeadModel is not supported" in message
