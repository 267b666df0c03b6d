"""What the engine needs to know about each model family, in one small table.

The pipeline never hard-codes module names: it asks this table where the decoder layers live, which
Linears read the same input (one Hessian / one activation capture serves the whole group) and which
operation feeds each group (AWQ folds its scales into that operation). Adding a family whose decoder
layer looks like Llama's is one more line in `ARCHITECTURES`; a different layout is one more
`ArchitectureInfo(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.errors import InvalidSpecError


@dataclass(frozen=True)
class AwqMapping:
    """AWQ scales the inputs of `linears` by s and folds 1/s into `prev` (an RMSNorm or a Linear).

    When `prev` is a Linear its output rows are divided by s, which is only possible when its output width
    equals the linears' input width (e.g. v_proj → o_proj needs num_heads == num_key_value_heads); the
    pipeline checks the shapes at run time and skips the mapping otherwise.
    """

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str
    layers: str  # module path of the decoder layer list, e.g. "model.layers"
    embed_tokens: str
    final_norm: str
    lm_head: str
    rotary_emb: str
    # Linears of one decoder layer, grouped by shared input, in execution order.
    linear_groups: tuple[tuple[str, ...], ...]
    awq_mappings: tuple[AwqMapping, ...]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized Linear of a decoder layer, in execution order."""
        return tuple(name for group in self.linear_groups for name in group)

    def group_of(self, linear: str) -> tuple[str, ...]:
        for group in self.linear_groups:
            if linear in group:
                return group
        raise KeyError(f"{linear} is not a quantized Linear of {self.name}")

    def layer_prefix(self, index: int) -> str:
        """Checkpoint name prefix of decoder layer `index`, e.g. "model.layers.3."."""
        return f"{self.layers}.{index}."


def _llama_like(name: str) -> ArchitectureInfo:
    """Llama's layout: pre-norm attention (q/k/v/o) then pre-norm gated MLP (gate/up/down)."""
    return ArchitectureInfo(
        name=name,
        layers="model.layers",
        embed_tokens="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        rotary_emb="model.rotary_emb",
        linear_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        ),
        awq_mappings=(
            AwqMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            AwqMapping("self_attn.v_proj", ("self_attn.o_proj",)),
            AwqMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            AwqMapping("mlp.up_proj", ("mlp.down_proj",)),
        ),
    )


# config.json "architectures"[0] → layout. SmolLM2 is a LlamaForCausalLM.
ARCHITECTURES: dict[str, ArchitectureInfo] = {
    name: _llama_like(name) for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
}


def architecture_info(architectures: list[str] | None) -> ArchitectureInfo:
    """The table entry for a config's `architectures` list, or an error naming the supported ones."""
    supported = ", ".join(sorted(ARCHITECTURES))
    if not architectures:
        raise InvalidSpecError(f"config.json names no architecture; supported architectures: {supported}")
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise InvalidSpecError(
        f"architecture {', '.join(architectures)} is not supported; supported architectures: {supported}"
    )
