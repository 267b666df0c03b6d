"""FP8 KV-cache scales: per-tensor `k_scale` / `v_scale` of each attention module, as vLLM reads them from a
compressed-tensors checkpoint (`kv_cache_scheme`: 8-bit float, per tensor, static).

    k_scale = max|k_proj(x)| / 448      v_scale = max|v_proj(x)| / 448

over every calibration token of the layer's inputs (the same inputs its Linears are calibrated on: earlier
layers quantized, this one still original), stored as `<attention>.k_scale` / `<attention>.v_scale`
(shape [1], model dtype, the names compressed-tensors and vLLM use). The maxima are taken on the projections'
outputs, before rotary embeddings (a rotation of pairs, which can raise a key's largest coordinate by up to
√2; E4M3 saturates rather than overflows, and vLLM recomputes nothing from these).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from workers.errors import InputError
from workers.methods.base import LayerWork, QuantMethod
from workers.quant.fp8 import input_scale
from workers.quant.grid import QuantizedTensor

SCALE_NAMES = ("k_scale", "v_scale")
PROJECTIONS = {"k_scale": "k_proj", "v_scale": "v_proj"}


def kv_cache_scheme() -> dict[str, Any]:
    """config.json's `quantization_config.kv_cache_scheme` (llm-compressor's FP8 KV-cache recipe)."""
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None,
        "num_bits": 8,
        "observer": "minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": "tensor",
        "symmetric": True,
        "type": "float",
        "zp_dtype": None,
    }


def attention_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The layer's attention modules (name → module): those holding Linears `k_proj` and `v_proj`."""
    found = {
        name: module
        for name, module in layer.named_modules()
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in PROJECTIONS.values())
    }
    if not found:
        raise InputError(
            "FP8 KV-cache scales need separate k_proj and v_proj Linears in each decoder layer; this model has"
            " none (fused qkv_proj?): drop kv_cache_fp8"
        )
    return found


class KvCacheObserver:
    """Forward hooks recording max|output| of every k_proj / v_proj of the layer's replicas while attached."""

    def __init__(self, replicas: Sequence[nn.Module]) -> None:
        self.maxima: list[dict[tuple[str, str], Tensor]] = [{} for _ in replicas]  # one dict per device thread
        self.attention = list(attention_modules(replicas[0]))
        self._handles = []
        for maxima, replica in zip(self.maxima, replicas, strict=True):
            for name in self.attention:
                attention = replica.get_submodule(name)
                for scale, projection in PROJECTIONS.items():
                    self._handles.append(getattr(attention, projection).register_forward_hook(_recorder(maxima, (name, scale))))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def register_scales(self, layer: nn.Module, dtype: torch.dtype) -> None:
        """Store k_scale / v_scale `[1]` as buffers of each attention module of `layer` (written with it)."""
        for name in self.attention:
            for scale in SCALE_NAMES:
                seen = [m[(name, scale)].cpu() for m in self.maxima if (name, scale) in m]
                if not seen:
                    raise InputError(f"{name}.{PROJECTIONS[scale]} never ran during calibration")
                value = input_scale(torch.stack(seen).amax(), dtype).to(dtype)
                layer.get_submodule(name).register_buffer(scale, value)


def _recorder(maxima: dict[tuple[str, str], Tensor], key: tuple[str, str]) -> Callable[..., None]:
    def hook(_m: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
        amax = out.detach().abs().amax().to(torch.float32)
        maxima[key] = torch.maximum(maxima[key], amax) if key in maxima else amax

    return hook


class KvCacheScales(QuantMethod):
    """Any method, plus FP8 KV-cache scales observed during its calibration forwards (JobSpec.kv_cache_fp8)."""

    name = "kv-cache-fp8"

    def __init__(self, inner: QuantMethod) -> None:
        self.inner = inner
        self.statistics = inner.statistics  # type: ignore[misc]

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        if work.acts is None:
            raise ValueError("FP8 KV-cache scales need calibration tokens")
        observer = KvCacheObserver(work.replicas)
        try:
            solved = self.inner.solve(work)
        finally:
            observer.remove()
        observer.register_scales(work.layer, work.dtype)
        return solved
