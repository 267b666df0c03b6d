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


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str  # the transformers class, e.g. "LlamaForCausalLM"
    graph: ModelGraph
    linear_shapes: dict[str, tuple[int, int]]  # every Linear of decoder layer 0 → (out, in), registration order
    awq_mappings: tuple[AwqMapping, ...]  # the family's AWQ mappings whose modules exist in a decoder layer

    @classmethod
    def of(cls, skeleton: PreTrainedModel) -> ArchitectureInfo:
        graph = ModelGraph.of(skeleton)
        layer = skeleton.get_submodule(f"{graph.layers}.0")
        names = {name for name, _ in layer.named_modules()}
        shapes = {name: _shape(layer.get_submodule(name)) for name in linear_names(layer)}
        if not shapes:
            raise InvalidSpecError(f"architecture {graph.architecture} is not supported: its decoder layers hold no Linear")
        return cls(graph.architecture, graph, shapes, awq_candidates(graph.model_type, names))

    def layer_prefix(self, index: int) -> str:
        """Checkpoint name prefix of decoder layer `index`, e.g. "model.layers.3."."""
        return self.graph.layer_prefix(index)

    def check_awq(self) -> None:
        """InvalidSpecError unless AWQ has smoothing pairs for this family (never smooth with nothing)."""
        if not self.awq_mappings:
            known = ", ".join(sorted(AWQ_MAPPINGS))
            raise InvalidSpecError(
                f"method awq needs smoothing pairs (norm → Linears, v → o, up → down) for {self.name} (model type "
                f"{self.graph.model_type!r}), and none are known; use method gptq or rtn, or a model type of: {known}"
            )


def _shape(linear: nn.Module) -> tuple[int, int]:
    assert isinstance(linear, nn.Linear)
    return linear.out_features, linear.in_features
