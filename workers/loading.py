"""Load a causal LM one piece at a time, so peak memory is about one decoder layer.

The full model exists only as a skeleton with `meta` parameters (shapes, no storage; buffers such as rotary
frequencies are real: `workers.model_graph.build_skeleton`). A decoder layer or the model-level pieces are
materialised on the compute device when asked for, from a `WeightSource` (the original safetensors, or a
quantized checkpoint read back dense), and dropped by the caller when done.

Decoder layers run as the model's own modules with the exact arguments the model's own forward gives them
(position embeddings, masks, sliding windows, local/global rotary…): the model's forward runs once with
every decoder layer replaced by a stand-in that records its arguments (`LayerwiseModel.layer_calls`), the
way llm-compressor's sequential pipeline captures them. The same stand-ins give the inputs of layer 0
(`embed`: embedding scales and multipliers included) and, at the end, the model's own head (`head`: final
norm, lm_head, logit scaling or soft-capping).

Compute dtype: the model's dtype on an accelerator; float32 on CPU, where half-precision matmuls are slow
and inaccurate. Quantization scales are still written in the model's dtype (see the pipeline).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from workers.architectures import ArchitectureInfo
from workers.errors import InputError, InvalidSpecError
from workers.model_graph import LayerPlan, build_skeleton, discover_plan, stored_prefixes
from workers.moe import expert_blocks
from workers.tensor_source import TensorSource
from workers.validation import config_dtype, load_config, read_config


class WeightSource(Protocol):
    """Tensors by name prefix, the prefix stripped from the returned names."""

    def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]: ...


class CheckpointWeights:
    """The original model's weights, straight from its safetensors shards."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source

    def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]:
        return self.source.get_prefix(prefix, device=device)


def resolve_device(name: str) -> torch.device:
    """"auto" → cuda if available else cpu; an explicit cuda device must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSpecError(f"device {name!r} was requested but CUDA is not available on this worker")
    return device


def compute_dtype_for(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Half precision on accelerators, float32 on CPU (CPU fp16/bf16 matmuls are slow and less accurate)."""
    return torch.float32 if device.type == "cpu" else model_dtype


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types here; the user needs the reason, not the type
        raise InputError(f"cannot load the tokenizer from {model_dir}: {exc}") from exc


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class LayerCall:
    """The arguments (besides the hidden states) the model's forward gives one decoder layer, captured on one
    window; their tensors (positions, rotary cos/sin, masks) have batch size 1 and broadcast over a chunk."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def to(self, device: torch.device) -> LayerCall:
        return LayerCall(_to_device(self.args, device), _to_device(self.kwargs, device))

    def __call__(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def run_decoder_layer(layer: nn.Module, hidden: Tensor, call: LayerCall) -> Tensor:
    """One decoder layer on full windows `[batch, seq, hidden]`, as the model's own forward calls it."""
    return call(layer, hidden)


OnCall = Callable[[int, Tensor, tuple[Any, ...], dict[str, Any]], Tensor]


class _StandIn(nn.Module):
    """Takes the place of decoder layer `index` in the model's forward: `on_call` sees what the layer would
    have been given. Attributes the forward reads off the layer (e.g. `attention_type`) come from the layer."""

    def __init__(self, layer: nn.Module, index: int, on_call: OnCall) -> None:
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: the stand-in holds no weights
        self.index, self.on_call = index, on_call

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.on_call(self.index, hidden, args, kwargs)


class _Stop(Exception):
    """Ends the model's forward early, carrying what was wanted (layer 0's input)."""

    def __init__(self, hidden: Tensor | None = None) -> None:
        super().__init__()
        self.hidden = hidden


def _replaced(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of `root` whose dotted `replacements` paths hold the given modules; the rest is shared."""
    nested: dict[str, dict[str, nn.Module]] = {}
    shell = copy.copy(root)
    shell._modules = dict(root._modules)
    for path, module in replacements.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = module
        else:
            shell._modules[head] = module
    for head, inner in nested.items():
        child = root._modules[head]
        assert child is not None
        shell._modules[head] = _replaced(child, inner)
    return shell


class LayerwiseModel:
    """A causal LM kept on `meta`, with its pieces materialised on `device` on demand."""

    def __init__(self, model_dir: str | Path, device: torch.device, *, compute_dtype: torch.dtype | None = None) -> None:
        self.model_dir = Path(model_dir)
        raw_config = read_config(self.model_dir)
        self.model_dtype = config_dtype(raw_config)
        self.device = device
        self.compute_dtype = compute_dtype or compute_dtype_for(self.model_dtype, device)
        self.config = load_config(self.model_dir)
        self.text_config = self.config.get_text_config()  # the language model's (multimodal models nest it)
        self.skeleton = build_skeleton(self.config)
        self.arch = ArchitectureInfo.of(self.skeleton)
        self.graph = self.arch.graph
        self.num_layers = len(self._layers())
        self._plans: dict[tuple[str, ...], LayerPlan] = {}

    def _layers(self) -> nn.ModuleList:
        layers = self.skeleton.get_submodule(self.graph.layers)
        assert isinstance(layers, nn.ModuleList)
        return layers

    def _materialize(
        self, template: nn.Module, state: dict[str, Tensor], what: str, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """A copy of the meta `template` holding `state` on the device in the compute dtype (or `dtype`)."""
        config = self.skeleton.config  # shared by every copy, not duplicated per layer
        module = copy.deepcopy(template, memo={id(config): config})
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise InputError(
                f"weights of {what} do not match the {self.arch.name} layout: missing {missing or 'none'}, "
                f"unexpected {unexpected or 'none'}"
            )
        module.load_state_dict(
            {name: t.to(self.device, dtype or self.compute_dtype) for name, t in state.items()}, strict=True, assign=True
        )
        module.to(self.device)  # the buffers no checkpoint holds (rotary frequencies, embedding scales)
        leftovers = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if leftovers:
            raise InputError(f"{what} has tensors that no checkpoint provides: {leftovers}")
        return module.eval().requires_grad_(False)

    def stored(self, path: str, weights: WeightSource, device: torch.device) -> tuple[str, dict[str, Tensor]]:
        """(checkpoint prefix, tensors) of the module at `path`, under its name or an older one it is saved under."""
        candidates = stored_prefixes(self.skeleton, path)
        for prefix in candidates:
            found = weights.tensors(prefix, device)
            if found:
                return prefix, found
        return candidates[0], {}

    def _piece(self, path: str, weights: WeightSource, dtype: torch.dtype | None = None) -> nn.Module:
        return self._materialize(self.skeleton.get_submodule(path), self.stored(path, weights, self.device)[1], path, dtype)

    def decoder_layer(self, index: int, weights: WeightSource) -> nn.Module:
        """Decoder layer `index` on the device, from the tensors under its checkpoint prefix (or its module path);
        fused expert tensors are split into the per-expert Linears (workers/moe.py)."""
        template = self._layers()[index]
        state = weights.tensors(self.graph.layer_prefix(index), self.device)
        if not state and self.graph.module_layer_prefix(index) != self.graph.layer_prefix(index):
            state = weights.tensors(self.graph.module_layer_prefix(index), self.device)
        for path, block in expert_blocks(template).items():
            if f"{path}.down_proj" in state:
                state = block.split_fused(state, f"{path}.")
        return self._materialize(template, state, f"decoder layer {index}")

    def dense_pieces(self) -> list[str]:
        """Module paths of every tensor outside the decoder layers (embeddings, norms, lm_head, vision towers…), in
        order; a module whose parent is already a piece is not listed again (its tensors come with the parent's)."""
        layers = f"{self.graph.layers}."
        paths = [name.rsplit(".", 1)[0] for name in self.skeleton.state_dict() if not name.startswith(layers)]
        pieces: list[str] = []
        for path in dict.fromkeys(paths):
            if not any(path.startswith(f"{piece}.") for piece in pieces):
                pieces.append(path)
        return pieces

    def _shell(self, weights: WeightSource, on_call: OnCall, *, embeddings: bool, head: nn.Module | None = None) -> nn.Module:
        """The causal LM with every decoder layer replaced by a stand-in and its other pieces materialised
        (the input embeddings in the stored dtype, their output cast to the compute dtype, only if asked)."""
        stand_ins = nn.ModuleList(_StandIn(layer, i, on_call) for i, layer in enumerate(self._layers()))
        pieces: dict[str, nn.Module] = {self.graph.layers: stand_ins}
        for path in self.graph.others:
            pieces[path] = self._piece(path, weights)
        if embeddings:
            embed = self._piece(self.graph.embed_tokens, weights, self._stored_embedding(weights).dtype)
            embed.register_forward_hook(lambda _m, _a, out: out.to(self.compute_dtype))
            pieces[self.graph.embed_tokens] = embed
        if head is not None:
            pieces[self.graph.lm_head] = head
        return _replaced(self.skeleton, pieces)

    def embed(self, ids: Tensor, weights: WeightSource, *, batch_tokens: int = 8192) -> Tensor:
        """Hidden states `[..., hidden]` entering decoder layer 0, in the compute dtype: the model's own
        embedding path (lookup in the stored dtype, then cast; scales and multipliers as the model applies them)."""

        def stop(_index: int, hidden: Tensor, _args: tuple[Any, ...], _kwargs: dict[str, Any]) -> Tensor:
            raise _Stop(hidden)

        shell = self._shell(weights, stop, embeddings=True)
        flat = ids.reshape(-1, ids.shape[-1]).to(self.device)
        out = torch.empty(*flat.shape, self.text_config.hidden_size, device=self.device, dtype=self.compute_dtype)
        rows = max(1, batch_tokens // flat.shape[1])
        with torch.no_grad():
            for a in range(0, flat.shape[0], rows):
                try:
                    shell(input_ids=flat[a : a + rows], use_cache=False)
                except _Stop as stopped:
                    assert stopped.hidden is not None
                    out[a : a + rows] = stopped.hidden
                else:
                    raise RuntimeError(f"{self.arch.name}'s forward never called its first decoder layer")
        return out.reshape(*ids.shape, -1)

    def layer_calls(self, seq_len: int, weights: WeightSource) -> list[LayerCall]:
        """Per decoder layer, the arguments the model's forward gives it for windows of `seq_len` tokens."""
        calls: list[LayerCall] = []

        def record(index: int, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
            calls.append(LayerCall(args, dict(kwargs)))
            if index == self.num_layers - 1:
                raise _Stop()
            return hidden

        shell = self._shell(weights, record, embeddings=False)
        probe = torch.zeros(1, seq_len, self.text_config.hidden_size, device=self.device, dtype=self.compute_dtype)
        with torch.no_grad(), contextlib.suppress(_Stop):
            shell(inputs_embeds=probe, use_cache=False)
        if len(calls) != self.num_layers:
            raise InputError(f"{self.arch.name}'s forward called {len(calls)} of its {self.num_layers} decoder layers")
        return calls

    def head(
        self, weights: WeightSource, embed_weight: Tensor | None = None, *, grad: bool = False
    ) -> Callable[[Tensor], Tensor]:
        """Logits `[tokens, vocab]` of the last decoder layer's outputs `[tokens, hidden]`, as the model computes
        them after its layers (final norm, lm_head, logit scaling or soft-capping); differentiable with `grad`."""
        template = self.skeleton.get_submodule(self.graph.lm_head)
        state = {"weight": self.lm_head_weight(weights, embed_weight)}
        state.update({k: v for k, v in self.stored(self.graph.lm_head, weights, self.device)[1].items() if k != "weight"})
        lm_head = self._materialize(template, state, self.graph.lm_head)
        injected: list[Tensor] = []

        def inject(index: int, hidden: Tensor, _args: tuple[Any, ...], _kwargs: dict[str, Any]) -> Tensor:
            return injected[0] if index == 0 else hidden

        shell = self._shell(weights, inject, embeddings=False, head=lm_head)

        def logits(hidden: Tensor) -> Tensor:
            injected[:] = [hidden.unsqueeze(0)]
            probe = torch.zeros_like(injected[0]).detach()
            with torch.set_grad_enabled(grad):
                return shell(inputs_embeds=probe, use_cache=False).logits[0]

        return logits

    def layer_plan(self, layer: nn.Module, probe: Tensor, call: LayerCall) -> LayerPlan:
        """The layer's Linears grouped by shared input and its AWQ mappings, found on one forward of `probe`
        (one window); layers of one class with the same Linears share a plan."""
        key = (type(layer).__name__, *(name for name, m in layer.named_modules() if isinstance(m, nn.Linear)))
        if key not in self._plans:
            self._plans[key] = discover_plan(layer, lambda: call(layer, probe), self.arch.awq_mappings)
        return self._plans[key]

    def _stored_embedding(self, weights: WeightSource) -> Tensor:
        found = self.stored(self.graph.embed_tokens, weights, self.device)[1]
        if "weight" not in found:
            raise InputError(f"{self.graph.embed_tokens}.weight is missing")
        return found["weight"]

    def embed_weight(self, weights: WeightSource) -> Tensor:
        """The embedding matrix in the compute dtype (also the lm_head of tied models)."""
        return self._stored_embedding(weights).to(self.compute_dtype)

    def lm_head_weight(self, weights: WeightSource, embed_weight: Tensor | None = None) -> Tensor:
        """The output projection; tied models reuse the embedding matrix."""
        found = self.stored(self.graph.lm_head, weights, self.device)[1]
        if "weight" in found:
            return found["weight"].to(self.compute_dtype)
        tied = getattr(self.config, "tie_word_embeddings", None)
        if not (tied if tied is not None else getattr(self.text_config, "tie_word_embeddings", False)):
            raise InputError(f"{self.graph.lm_head}.weight is missing and the embeddings are not tied")
        return embed_weight if embed_weight is not None else self.embed_weight(weights)
