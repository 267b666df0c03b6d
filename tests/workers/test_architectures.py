"""The architecture is read from the model: layers, embeddings, head and Linears found by identity, AWQ's
smoothing pairs the only per-family table, unsupported models refused with a reason."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import BertConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

from workers.architectures import ArchitectureInfo
from workers.errors import InvalidSpecError
from workers.model_graph import build_skeleton

SMALL: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


@pytest.mark.parametrize("config", [LlamaConfig(**SMALL), MistralConfig(**SMALL), Qwen2Config(**SMALL)])
def test_llama_layout_is_found_in_the_module_graph(config: Any) -> None:
    info = ArchitectureInfo.of(build_skeleton(config))
    assert (info.graph.layers, info.graph.embed_tokens, info.graph.lm_head) == ("model.layers", "model.embed_tokens", "lm_head")
    assert set(info.graph.others) == {"model.norm", "model.rotary_emb"}
    assert list(info.linear_shapes) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    assert info.linear_shapes["self_attn.k_proj"] == (16, 32)
    assert [(m.prev, m.anchor) for m in info.awq_mappings] == [
        ("input_layernorm", "self_attn.q_proj"), ("self_attn.v_proj", "self_attn.o_proj"),
        ("post_attention_layernorm", "mlp.gate_proj"), ("mlp.up_proj", "mlp.down_proj"),
    ]
    assert info.layer_prefix(7) == "model.layers.7."
    skeleton = build_skeleton(config)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers())  # rotary frequencies are computed, not loaded


def test_other_names_are_found_too() -> None:
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    info = ArchitectureInfo.of(build_skeleton(config))
    assert (info.graph.layers, info.graph.embed_tokens) == ("gpt_neox.layers", "gpt_neox.embed_in")
    assert list(info.linear_shapes) == ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, architectures=["BertForMaskedLM"]),
         "BertForMaskedLM is not supported"),
        (LlamaConfig(**SMALL, architectures=["FalconForCausalLM"]), "FalconForCausalLM is not supported"),
    ],
)
def test_unsupported_models_are_refused(config: Any, message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message):
        ArchitectureInfo.of(build_skeleton(config))


def test_awq_is_refused_for_a_family_without_smoothing_pairs() -> None:
    config = LlamaConfig(**SMALL)
    info = ArchitectureInfo.of(build_skeleton(config))
    info.check_awq()
    bare = ArchitectureInfo(info.name, info.graph, info.linear_shapes, ())
    with pytest.raises(InvalidSpecError, match="method awq needs smoothing pairs.*use method gptq or rtn"):
        bare.check_awq()
