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

Mixture-of-Experts (llm-compressor's MoE mappings): the norm before the MoE block → every routed expert's
gate/up Linears (and a shared expert's: they read the same tensor), and per expert up → down (`*` stands for
the expert index, expanded for each expert). Every module reading the norm's output gets the exact fold, found at
run time: all quantized Linears reading it (one group, or several when a shared expert reads the tensor before
the block reshapes it: DeepSeek-V3) and the dense modules reading it (routers, Qwen2-MoE's `shared_expert_gate`:
`AwqMapping.dense`, scaled by s but never quantized), so the float model is unchanged. gpt-oss has no up → down
pair: its gating clamps `up` and adds 1 (not linear in `up`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AwqMapping:
    """Scale the input group of `anchor` by s, fold 1/s into `prev` (into the last of its `parts` output
    slices when `prev` is a Linear). `linears` is the resolved group (filled in at run time), `dense` the unquantized
    modules reading the same tensor (MoE routers and gates)."""

    prev: str
    anchor: str
    parts: int = 1
    linears: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()  # modules kept dense that read the norm's output (routers): their columns × s


def _llama(mlp_norm: str = "post_attention_layernorm", attn_norm: str | None = "input_layernorm") -> tuple[AwqMapping, ...]:
    norms = (AwqMapping(attn_norm, "self_attn.q_proj"), AwqMapping(mlp_norm, "mlp.gate_proj")) if attn_norm else ()
    return (
        *norms[:1],
        AwqMapping("self_attn.v_proj", "self_attn.o_proj"),
        *norms[1:],
        AwqMapping("mlp.up_proj", "mlp.down_proj"),
    )


def _moe(block: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
         shared: str | None = None) -> tuple[AwqMapping, ...]:
    gate, up, down = names
    return (
        AwqMapping("post_attention_layernorm", f"{block}.experts.0.{gate}"),
        AwqMapping(f"{block}.experts.*.{up}", f"{block}.experts.*.{down}"),
        *((AwqMapping(f"{block}.{shared}.up_proj", f"{block}.{shared}.down_proj"),) if shared else ()),
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
    # Mixture-of-Experts (see the module docstring)
    "mixtral": (*_llama()[:2], *_moe("block_sparse_moe", ("w1", "w3", "w2"))),
    "qwen2_moe": (*_llama()[:2], *_moe("mlp", shared="shared_expert")),
    "qwen3_moe": (*_llama()[:2], *_moe("mlp")),
    "gpt_oss": (*_llama()[:2], *_moe("mlp")[:1]),
    # multi-head latent attention: the norms inside attention feed q_b / kv_b; layers before
    # first_k_dense_replace have a dense MLP (the entries that do not resolve in a layer are skipped there)
    "deepseek_v3": (
        AwqMapping("input_layernorm", "self_attn.q_a_proj"),
        AwqMapping("self_attn.q_a_layernorm", "self_attn.q_b_proj"),
        AwqMapping("self_attn.kv_a_layernorm", "self_attn.kv_b_proj"),
        AwqMapping("post_attention_layernorm", "mlp.gate_proj"),
        AwqMapping("mlp.up_proj", "mlp.down_proj"),
        *_moe("mlp", shared="shared_experts"),
    ),
}


def awq_candidates(model_type: str, module_names: set[str]) -> tuple[AwqMapping, ...]:
    """The family's mappings whose modules exist in a decoder layer (`module_names`), each `*` (an expert index)
    expanded to every expert; () when none resolves."""
    found: list[AwqMapping] = []
    for m in AWQ_MAPPINGS.get(model_type, ()):
        expanded = [m]
        if "*" in m.prev:
            head = m.prev.split("*")[0]
            indices = {n[len(head):].split(".")[0] for n in module_names if n.startswith(head)}
            expanded = [replace(m, prev=m.prev.replace("*", e), anchor=m.anchor.replace("*", e))
                        for e in sorted((i for i in indices if i.isdigit()), key=int)]
        found += [c for c in expanded if {c.prev, c.anchor} <= module_names]
    return tuple(found)
