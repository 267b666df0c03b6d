"""The engine's own view of a model, for tests that compare it with transformers: logits computed one decoder
layer at a time (as the pipeline and evaluation run), relative errors, and which Linears a checkpoint quantized."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from workers.loading import LayerwiseModel, WeightSource, run_decoder_layer


def layerwise_logits(model: LayerwiseModel, weights: WeightSource, ids: torch.Tensor) -> torch.Tensor:
    hidden = model.embed(ids, weights)
    calls = model.layer_calls(ids.shape[1], weights)
    with torch.no_grad():
        for index in range(model.num_layers):
            hidden = run_decoder_layer(model.decoder_layer(index, weights), hidden, calls[index])
        head = model.head(weights)
        return torch.stack([head(h) for h in hidden]).float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def stored(out: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of a single-file checkpoint and its shape."""
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


def quantized_modules(out: Path) -> set[str]:
    """The Linears a compressed-tensors pack-quantized checkpoint holds quantized."""
    return {name.removesuffix(".weight_packed") for name in stored(out) if name.endswith(".weight_packed")}
