"""What the engine knows about a model's architecture: read from the model itself, not from a table.

`ArchitectureInfo.of(skeleton)` describes any decoder-only causal LM of transformers: where its pieces are
(`workers.model_graph.ModelGraph`), the Linears of a decoder layer (all of them are quantized) and the AWQ
mappings of its family that resolve in that layer (`workers.awq_mappings`). Which Linears share an input is
found at run time, on the layer itself (`workers.model_graph.discover_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from workers.awq_mappings import AWQ_MAPPINGS, AwqMapping, awq_candidates
from workers.errors import InvalidSpecError
from workers.model_graph import ModelGraph, linear_names
from workers.moe import ExpertLinears, dense_linears, expert_blocks


@dataclass(frozen=True)
class ExpertBlock:
    """The routed experts of one MoE block in one decoder layer (workers/moe.py)."""

    layer: int
    path: str  # inside the layer, under the checkpoint's names, e.g. "block_sparse_moe.experts"
    num_experts: int
    linears: tuple[str, ...]  # each expert's Linears, e.g. ("w1", "w3", "w2")
    hidden: int
    intermediate: int
    fused: bool  # transformers holds them as fused 3-D parameters (unfused into Linears by the engine)
    dense: tuple[str, ...]  # the block's routers and gates, kept dense (in the layer, e.g. "mlp.gate")


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str  # the transformers class, e.g. "LlamaForCausalLM"
    graph: ModelGraph
    linear_shapes: dict[str, tuple[int, int]]  # every quantized Linear of decoder layer 0 → (out, in), in order
    awq_mappings: tuple[AwqMapping, ...]  # the family's AWQ mappings whose modules exist in a decoder layer
    layer_linear_shapes: tuple[dict[str, tuple[int, int]], ...] = ()  # the same for every decoder layer
    experts: tuple[ExpertBlock, ...] = ()  # every MoE block of every layer
    dense_in_layers: tuple[str, ...] = ()  # Linears of decoder layers kept dense (routers, gates), module names

    @classmethod
    def of(cls, skeleton: PreTrainedModel) -> ArchitectureInfo:
        graph = ModelGraph.of(skeleton)
        layers = list(skeleton.get_submodule(graph.layers).children())
        per_layer = tuple({name: _shape(layer.get_submodule(name)) for name in linear_names(layer)} for layer in layers)
        if not per_layer[0]:
            raise InvalidSpecError(f"architecture {graph.architecture} is not supported: its decoder layers hold no Linear")
        names = {name for layer in layers for name, _ in layer.named_modules()}
        text_type = str(getattr(skeleton.config.get_text_config(), "model_type", graph.model_type))
        mappings = awq_candidates(graph.model_type, names) or awq_candidates(text_type, names)
        experts = tuple(_expert_block(i, path, block, layer) for i, layer in enumerate(layers)
                        for path, block in expert_blocks(layer).items())
        dense = tuple(sorted({f"{i}.{name}" for i, layer in enumerate(layers) for name in dense_linears(layer)}))
        return cls(graph.architecture, graph, per_layer[0], mappings, per_layer, experts, dense)

    def layer_prefix(self, index: int) -> str:
        """Checkpoint name prefix of decoder layer `index`, e.g. "model.layers.3."."""
        return self.graph.layer_prefix(index)

    def check_awq(self) -> None:
        """InvalidSpecError unless AWQ has smoothing pairs for this family (never smooth with nothing)."""
        moe = [m for m in self.awq_mappings if ".experts." in m.anchor]
        if self.experts and not moe:
            raise InvalidSpecError(
                f"method awq needs smoothing pairs for the Mixture-of-Experts layers of {self.name} (model type "
                f"{self.graph.model_type!r}: norm → every expert's gate/up, with the routers folded exactly), and none "
                "are known; use method gptq or rtn, or an MoE model type of: "
                + ", ".join(sorted(k for k, v in AWQ_MAPPINGS.items() if any(".experts." in m.anchor for m in v)))
            )
        if not self.awq_mappings:
            known = ", ".join(sorted(AWQ_MAPPINGS))
            raise InvalidSpecError(
                f"method awq needs smoothing pairs (norm → Linears, v → o, up → down) for {self.name} (model type "
                f"{self.graph.model_type!r}), and none are known; use method gptq or rtn, or a model type of: {known}"
            )


def _expert_block(index: int, path: str, block: ExpertLinears, layer: nn.Module) -> ExpertBlock:
    parent = path.rpartition(".")[0]
    dense = tuple(sorted(name for name in dense_linears(layer) if name.startswith(f"{parent}.")))
    routers = tuple(f"{parent}.{n}" for n, m in layer.get_submodule(parent).named_children()
                    if not isinstance(m, ExpertLinears) and not any(isinstance(c, nn.Linear) for c in m.modules())
                    and any(True for _ in m.parameters(recurse=False))) if parent else ()
    linears = tuple(name for name, m in block.experts()[0].named_children() if isinstance(m, nn.Linear))
    return ExpertBlock(index, path, block.layout.num_experts, linears, block.layout.hidden, block.layout.intermediate,
                       True, tuple(sorted({*dense, *routers})))


def _shape(linear: nn.Module) -> tuple[int, int]:
    assert isinstance(linear, nn.Linear)
    return linear.out_features, linear.in_features
