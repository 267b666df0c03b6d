"""AWQ's smoothing pairs per model family: the only per-family knowledge the engine keeps.

AWQ scales the input of a group of Linears (those that read one tensor) by s and folds 1/s into the op that
produced that tensor: a norm (norm → the Linears after it), or a Linear whose output feeds the group
through a linear map only (v → o through attention's weighted sum; up → down through the gate's product).
Which ops those are cannot be read from the module graph alone (it shows no data flow, and an MLP's
activation or a post-norm breaks linearity), so each family lists them here by module name. At run time
(`workers.model_graph.discover_plan`) the anchor's whole input group is scaled and a norm's output is
checked to be that group's input, so a wrong entry fails loudly instead of smoothing something else.

Fused projections: `parts` > 1 says the previous Linear's output is `parts` equal slices of which the
last feeds the group (Phi-3's gate_up_proj → down_proj: the `up` half; qkv_proj → o_proj: the `v` third,
only when q, k and v have one size). A family absent here is refused for AWQ at submit time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AwqMapping:
    """Scale the input group of `anchor` by s, fold 1/s into `prev` (into the last of its `parts` output
    slices when `prev` is a Linear). `linears` is the resolved group (filled in at run time)."""

    prev: str
    anchor: str
    parts: int = 1
    linears: tuple[str, ...] = ()


def _llama(mlp_norm: str = "post_attention_layernorm", attn_norm: str | None = "input_layernorm") -> tuple[AwqMapping, ...]:
    norms = (AwqMapping(attn_norm, "self_attn.q_proj"), AwqMapping(mlp_norm, "mlp.gate_proj")) if attn_norm else ()
    return (
        *norms[:1],
        AwqMapping("self_attn.v_proj", "self_attn.o_proj"),
        *norms[1:],
        AwqMapping("mlp.up_proj", "mlp.down_proj"),
    )


# config.model_type → the mappings, in the order the layer runs them.
AWQ_MAPPINGS: dict[str, tuple[AwqMapping, ...]] = {
    **{name: _llama() for name in ("llama", "mistral", "qwen2", "qwen3", "granite", "stablelm", "qwen2_5_vl_text")},
    # Gemma-2/3: post_attention_layernorm normalises the attention *output*; the MLP reads pre_feedforward_layernorm.
    **{name: _llama("pre_feedforward_layernorm") for name in ("gemma", "gemma2", "gemma3_text")},
    # OLMo-2 normalises after each block (post-norm): attention and MLP read the raw residual stream.
    "olmo2": (AwqMapping("self_attn.v_proj", "self_attn.o_proj"), AwqMapping("mlp.up_proj", "mlp.down_proj")),
    # Cohere: attention and MLP read one normed input (parallel block); the anchor's group holds all five.
    "cohere": (
        AwqMapping("input_layernorm", "self_attn.q_proj"),
        AwqMapping("self_attn.v_proj", "self_attn.o_proj"),
        AwqMapping("mlp.up_proj", "mlp.down_proj"),
    ),
    "phi3": (
        AwqMapping("input_layernorm", "self_attn.qkv_proj"),
        AwqMapping("self_attn.qkv_proj", "self_attn.o_proj", parts=3),
        AwqMapping("post_attention_layernorm", "mlp.gate_up_proj"),
        AwqMapping("mlp.gate_up_proj", "mlp.down_proj", parts=2),
    ),
    # GPT-NeoX: q/k/v interleaved per head in query_key_value (no v → dense); GELU between the MLP's Linears.
    "gpt_neox": (
        AwqMapping("input_layernorm", "attention.query_key_value"),
        AwqMapping("post_attention_layernorm", "mlp.dense_h_to_4h"),
    ),
}


def awq_candidates(model_type: str, module_names: set[str]) -> tuple[AwqMapping, ...]:
    """The family's mappings whose modules exist in a decoder layer (`module_names`); () when none resolves."""
    return tuple(m for m in AWQ_MAPPINGS.get(model_type, ()) if {m.prev, m.anchor} <= module_names)
