"""Read a quantized checkpoint back as dense weights, one prefix (decoder layer) at a time.

Evaluation streams the quantized model through this: `dense_prefix("model.layers.3.")` returns that
layer's weights dequantized and named like the original model, without reading any other layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workers.activation_quant import Quantizer, input_quantizer
from workers.errors import InputError
from workers.formats import compressed_tensors, mixed_precision
from workers.formats.base import for_reading
from workers.spec import OutputFormat, QuantScheme
from workers.tensor_source import TensorSource

KV_CACHE_SCALES = ("k_scale", "v_scale")


class QuantizedCheckpoint:
    """A compressed-tensors pack-quantized or float-quantized (FP8), or GPTQ v1 checkpoint directory, read lazily."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise InputError(f"{self.path} has no config.json; is it a quantized checkpoint directory?")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        quant_config = self.config.get("quantization_config")
        method = quant_config.get("quant_method") if isinstance(quant_config, dict) else None
        self.module_schemes: dict[str, QuantScheme] = {}  # mixed-precision: full Linear name → grid
        ct_format = quant_config.get("format") if method == "compressed-tensors" else None
        if ct_format == mixed_precision.FORMAT:  # a grid per Linear: pack-quantized tensors, grids by name
            self.format = OutputFormat.COMPRESSED_TENSORS
            self.module_schemes = mixed_precision.schemes_from_config(quant_config)
            self.scheme, self.act_order = next(iter(self.module_schemes.values())), False
            self._module: Any = compressed_tensors
            self._marker = compressed_tensors.MARKER
        elif isinstance(quant_config, dict) and (fmt := for_reading(quant_config)) is not None:
            self.format = fmt.OUTPUT  # the format module that reads it (workers/formats/base.py)
            self.scheme, self.act_order = fmt.read_scheme(quant_config)
            self._module, self._marker = fmt, fmt.MARKER
        else:
            fmt_name = quant_config.get("format") if isinstance(quant_config, dict) else None
            raise InputError(
                f"{config_path} has no quantization_config that QuantFleet reads (quant_method={method!r}, format="
                f"{fmt_name!r}): no format module of workers/formats reads it"
            )
        self.source = TensorSource(self.path)

    def dense_prefix(
        self, prefix: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> dict[str, Tensor]:
        """Tensors under `prefix`, keyed by the rest of the name, with every quantized Linear dequantized
        to `<module>.weight`; floating tensors are cast to `dtype`, others passed through."""
        stored = self.source.get_prefix(prefix, device)
        suffixes = self._module.SUFFIXES
        modules = [name[: -len(self._marker) - 1] for name in stored if name.endswith("." + self._marker)]
        dense: dict[str, Tensor] = {}
        for module in modules:
            parts = {s: stored.pop(f"{module}.{s}") for s in suffixes if f"{module}.{s}" in stored}
            try:
                qt = self._module.from_linear_tensors(parts, self.module_schemes.get(prefix + module, self.scheme))
            except InputError as e:
                raise InputError(f"{prefix}{module}: {e}") from e
            dense[f"{module}.weight"] = qt.dequantize(dtype)
        for name, tensor in stored.items():
            if name.rsplit(".", 1)[-1] in KV_CACHE_SCALES:  # runtime metadata, no weight of the model
                continue
            dense[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return dense

    def input_quantizers(self, prefix: str) -> dict[str, Quantizer]:
        """The runtime's input quantization of each quantized Linear under `prefix` (name relative to it), for
        schemes that quantize activations (W8A8 int8, FP8); empty for weight-only checkpoints."""
        if input_quantizer(self.scheme, torch.ones(1)) is None:
            return {}
        names = [n for n in self.source.names if n.startswith(prefix) and n.endswith("." + self._marker)]
        quantizers: dict[str, Quantizer] = {}
        for name in names:
            module = name[len(prefix) : -len(self._marker) - 1]
            scale_name = f"{prefix}{module}.input_scale"
            scale = self.source.get(scale_name, "cpu") if self.scheme.activations == "static" else None
            quantize = input_quantizer(self.scheme, scale)
            if quantize is not None:
                quantizers[module] = quantize
        return quantizers
