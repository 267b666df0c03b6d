"""Load a causal LM one piece at a time, so peak memory is about one decoder layer.

The full model exists only as a skeleton on the `meta` device (shapes, no storage). A decoder layer, the
embeddings, the final norm or the lm_head are materialised on the compute device when asked for, from a
`WeightSource` (the original safetensors, or a quantized checkpoint read back dense), and dropped by the
caller when done. The rotary embedding is built fresh on the device: buffers of a meta module hold no data.

Compute dtype: the model's dtype on an accelerator; float32 on CPU, where half-precision matmuls are slow
and inaccurate. Quantization scales are still written in the model's dtype (see the pipeline).
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from workers.architectures import ArchitectureInfo, architecture_info
from workers.errors import InputError, InvalidSpecError
from workers.tensor_source import TensorSource
from workers.validation import config_dtype, read_config


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


def load_config(model_dir: str | Path) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"cannot read the model config in {model_dir}: {exc}") from exc
    config.use_cache = False
    return config


_SKELETON_LOCK = threading.Lock()


class LayerwiseModel:
    """A causal LM kept on `meta`, with its pieces materialised on `device` on demand."""

    def __init__(self, model_dir: str | Path, device: torch.device, *, compute_dtype: torch.dtype | None = None) -> None:
        self.model_dir = Path(model_dir)
        raw_config = read_config(self.model_dir)
        self.arch: ArchitectureInfo = architecture_info(raw_config.get("architectures"))
        self.model_dtype = config_dtype(raw_config)
        self.device = device
        self.compute_dtype = compute_dtype or compute_dtype_for(self.model_dtype, device)
        self.config = load_config(self.model_dir)
        # from_config switches torch's process-wide default dtype while it builds; threads running jobs side
        # by side (the thread executor) could otherwise leave it at fp16 for the whole process. Building in
        # float32 under one lock keeps the default intact; the dtype is moot on `meta` (weights are assigned).
        with _SKELETON_LOCK, torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(
                copy.deepcopy(self.config), attn_implementation="sdpa", dtype=torch.float32
            )
        self.num_layers = len(self._layers())

    def _layers(self) -> nn.ModuleList:
        layers = self.skeleton.get_submodule(self.arch.layers)
        assert isinstance(layers, nn.ModuleList)
        return layers

    def _materialize(self, template: nn.Module, state: dict[str, Tensor], what: str) -> nn.Module:
        """A copy of the meta `template` holding `state` on the device in the compute dtype."""
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
            {name: t.to(self.device, self.compute_dtype) for name, t in state.items()}, strict=True, assign=True
        )
        leftovers = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if leftovers:
            raise InputError(f"{what} has tensors that no checkpoint provides: {leftovers}")
        return module.eval().requires_grad_(False)

    def decoder_layer(self, index: int, weights: WeightSource) -> nn.Module:
        prefix = self.arch.layer_prefix(index)
        return self._materialize(self._layers()[index], weights.tensors(prefix, self.device), f"decoder layer {index}")

    def final_norm(self, weights: WeightSource) -> nn.Module:
        prefix = f"{self.arch.final_norm}."
        template = self.skeleton.get_submodule(self.arch.final_norm)
        return self._materialize(template, weights.tensors(prefix, self.device), self.arch.final_norm)

    def _stored_embedding(self, weights: WeightSource) -> Tensor:
        found = weights.tensors(f"{self.arch.embed_tokens}.", self.device)
        if "weight" not in found:
            raise InputError(f"{self.arch.embed_tokens}.weight is missing")
        return found["weight"]

    def embed_weight(self, weights: WeightSource) -> Tensor:
        """The embedding matrix in the compute dtype (also the lm_head of tied models)."""
        return self._stored_embedding(weights).to(self.compute_dtype)

    def embed(self, ids: Tensor, weights: WeightSource) -> Tensor:
        """Hidden states `[..., hidden]` of token ids, in the compute dtype.

        Looked up in the stored dtype and cast afterwards (exactly the same values), so a large vocabulary
        is never held in float32 on CPU just to embed a few windows.
        """
        return F.embedding(ids.to(self.device), self._stored_embedding(weights)).to(self.compute_dtype)

    def lm_head_weight(self, weights: WeightSource, embed_weight: Tensor | None = None) -> Tensor:
        """The output projection; tied models reuse the embedding matrix."""
        found = weights.tensors(f"{self.arch.lm_head}.", self.device)
        if "weight" in found:
            return found["weight"].to(self.compute_dtype)
        if not getattr(self.config, "tie_word_embeddings", False):
            raise InputError(f"{self.arch.lm_head}.weight is missing and the embeddings are not tied")
        return embed_weight if embed_weight is not None else self.embed_weight(weights)

    def position_embeddings(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) of shape [1, seq_len, head_dim] from a rotary module built on the device."""
        template = self.skeleton.get_submodule(self.arch.rotary_emb)
        with torch.device(self.device):
            rotary = type(template)(config=self.config)
        positions = torch.arange(seq_len, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, seq_len, 1, device=self.device, dtype=self.compute_dtype)
        cos, sin = rotary(probe, positions)
        return cos, sin


def run_decoder_layer(layer: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """One decoder layer on full causal windows: sdpa with no mask is causal attention (`is_causal=True`)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out
