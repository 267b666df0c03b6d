"""GGUF export: quantize a model onto GGUF's own grids, layer by layer, and write one llama.cpp file.

The sequential pipeline of workers/pipeline.py with GGUF grids in place of the integer scheme: each decoder
layer's Linear groups get their input Hessians from one forward of the (not yet quantized) layer over the
calibration windows; every Linear is solved on the block type the file type's recipe gives it
(`workers.formats.gguf.Recipe`): GPTQ sweeps its columns against the fixed GGUF grid
(`workers/quant/gguf_gptq.py`), RTN rounds to it (llama.cpp's own rules, no importance). The quantized
layer then produces the next layer's inputs. Embeddings and the output matrix are rounded on their recipe
types (RTN), norms stay float32. The result keeps the dequantized weights (float32, exactly what the file
decodes to) so the same evaluation as every other format can score them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from workers.formats.gguf import GGUFFile
from workers.loading import CheckpointWeights, LayerCall, LayerwiseModel, run_decoder_layer
from workers.model_graph import Group, LayerPlan, linear_names
from workers.quant import gguf_grid
from workers.quant.gguf_gptq import gguf_gptq_quantize_shared
from workers.quant.gguf_grid import GGUFTensor
from workers.quant.gptq import HessianAccumulator
from workers.tensor_source import TensorSource

BATCH_TOKENS = 8192  # tokens per forward chunk

GGUFMethod = Literal["rtn", "gptq"]


class Windows:
    """Hidden states `[samples, seq, hidden]` of the calibration windows, processed in chunks of samples."""

    def __init__(self, hidden: Tensor, device: torch.device) -> None:
        self.hidden, self.device = hidden, device
        self.rows = max(1, BATCH_TOKENS // hidden.shape[1])

    def chunks(self) -> list[Tensor]:
        return [self.hidden[a : a + self.rows].to(self.device) for a in range(0, self.hidden.shape[0], self.rows)]

    def forward(self, layer: nn.Module, call: LayerCall) -> None:
        """Replace the hidden states by the layer's outputs."""
        for a in range(0, self.hidden.shape[0], self.rows):
            out = run_decoder_layer(layer, self.hidden[a : a + self.rows].to(self.device), call)
            self.hidden[a : a + self.rows] = out.to(self.hidden.device, self.hidden.dtype)

    def hessians(self, layer: nn.Module, call: LayerCall, plan: LayerPlan) -> dict[Group, HessianAccumulator]:
        """H = 2/n Σ xᵀx of every Linear group's input over all windows (one forward of the layer)."""
        stats = {g: HessianAccumulator(_linear(layer, g[0]).in_features, self.device) for g in plan.groups}
        handles = [
            _linear(layer, g[0]).register_forward_pre_hook(lambda _m, args, g=g: stats[g].add(args[0]))
            for g in plan.groups
        ]
        try:
            for chunk in self.chunks():
                run_decoder_layer(layer, chunk, call)
        finally:
            for handle in handles:
                handle.remove()
        return stats


def output_error(reference: Tensor, quantized: Tensor, hessian: Tensor) -> tuple[float, float]:
    """(mean squared output error over the calibration inputs, that / the output's mean square), from
    H = 2 E[x xᵀ]: trace(ΔW E[xxᵀ] ΔWᵀ) / out, as the pipeline's error report."""
    ref = reference.to(torch.float32)
    delta = quantized.to(ref.device, torch.float32) - ref
    sigma = hessian.to(ref.device, torch.float32) / 2
    error = float(((delta @ sigma) * delta).sum()) / ref.shape[0]
    power = float(((ref @ sigma) * ref).sum()) / ref.shape[0]
    return error, (error / power if power > 0 else 0.0)


class DenseWeights:
    """A WeightSource over a dict of full tensor names (e.g. the dequantized GGUF weights)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self._tensors = tensors

    def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]:
        return {name[len(prefix) :]: t.to(device) for name, t in self._tensors.items() if name.startswith(prefix)}


@dataclass
class GGUFExport:
    path: Path
    file_type: str
    method: GGUFMethod
    tensor_types: dict[str, str]  # GGUF tensor name → type
    bits_per_weight: float  # over the 2-D tensors of the file
    file_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    fallback_modules: list[str] = field(default_factory=list)
    module_errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # Linear → (mse, relative), calibrated
    dequantized: dict[str, Tensor] = field(default_factory=dict)

    def weights(self) -> DenseWeights:
        return DenseWeights(self.dequantized)


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    module = layer.get_submodule(name)
    assert isinstance(module, nn.Linear)
    return module


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    file_type: str,
    *,
    method: GGUFMethod = "rtn",
    calibration: Tensor | None = None,
    act_order: bool = True,
    dampening: float = 0.01,
    device: torch.device | None = None,
    keep_dequantized: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> GGUFExport:
    """Quantize `model_dir` to GGUF `file_type` ("Q4_K_M", ...) with `method` and write `out_path`."""
    started = time.perf_counter()
    if method == "gptq" and calibration is None:
        raise ValueError("GPTQ on the GGUF grid needs calibration token windows")
    device = device or torch.device("cpu")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    sink = GGUFFile(out_path, model_dir, config, file_type)
    model = LayerwiseModel(model_dir, device)
    weights = CheckpointWeights(TensorSource(model_dir))
    result = GGUFExport(out_path, file_type, method, {}, 0.0, 0, 0.0)
    cpu = torch.device("cpu")

    def keep(name: str, value: Tensor) -> None:
        if keep_dequantized:
            result.dequantized[name] = value.detach().to(cpu, torch.float32 if value.is_floating_point() else value.dtype)

    def add(name: str, tensor: Tensor, quantized: GGUFTensor | None = None) -> None:
        target = sink.target(name, tuple(tensor.shape))
        if target is None:
            return
        if target.block is None:
            sink.add_dense(name, tensor)
            keep(name, tensor.float())
            return
        qt = quantized or gguf_grid.quantize(target.block, tensor)
        sink.add_quantized(name.removesuffix(".weight"), qt)
        keep(name, qt.dequantize())

    try:
        with torch.no_grad():
            for piece in model.dense_pieces():
                prefix, tensors = model.stored(piece, weights, cpu)
                for name, tensor in tensors.items():
                    add(prefix + name, tensor)
            windows, calls = None, None
            if calibration is not None and method == "gptq":
                windows = Windows(model.embed(calibration, weights, batch_tokens=BATCH_TOKENS), device)
                calls = model.layer_calls(calibration.shape[1], weights)
            for index in range(model.num_layers):
                prefix = model.graph.layer_prefix(index)
                layer = model.decoder_layer(index, weights)
                call = calls[index] if calls is not None else None
                solved = _solve_layer(layer, prefix, sink, windows, call, model, act_order, dampening, result)
                for name, qt in solved.items():
                    linear = _linear(layer, name)
                    linear.weight.data = qt.dequantize(model.compute_dtype).to(linear.weight.device)
                if windows is not None and call is not None:
                    windows.forward(layer, call)
                quantized = {f"{name}.weight" for name in solved}
                for name, tensor in layer.state_dict().items():
                    if name not in quantized:
                        add(prefix + name, tensor.to(cpu))
                for name, qt in solved.items():
                    add(f"{prefix}{name}.weight", _linear(layer, name).weight, qt)
                if on_layer is not None:
                    on_layer(index, model.num_layers)
        result.notes = sink.finalize()
    except BaseException:
        sink.abort()
        out_path.unlink(missing_ok=True)
        raise
    result.tensor_types = {t.name: t.type for t in sink.written}
    result.bits_per_weight = sink.bits_per_weight()
    result.file_bytes = out_path.stat().st_size
    result.seconds = time.perf_counter() - started
    return result


def _solve_layer(
    layer: nn.Module,
    prefix: str,
    sink: GGUFFile,
    windows: Windows | None,
    call: LayerCall | None,
    model: LayerwiseModel,
    act_order: bool,
    dampening: float,
    result: GGUFExport,
) -> dict[str, GGUFTensor]:
    def kind(name: str) -> gguf_grid.BlockType | None:
        weight = _linear(layer, name).weight
        target = sink.target(f"{prefix}{name}.weight", tuple(weight.shape))
        return target.block if target is not None else None

    names = [name for name in linear_names(layer) if kind(name) is not None]  # an F16 file quantizes none
    if windows is None or call is None or not names:  # RTN: llama.cpp's own rules, no importance
        return {name: gguf_grid.quantize(_block(kind(name)), _linear(layer, name).weight) for name in names}
    plan = model.layer_plan(layer, windows.hidden[:1].to(windows.device), call)
    statistics = windows.hessians(layer, call, plan)
    solved: dict[str, GGUFTensor] = {}
    for group, accumulator in statistics.items():
        group_weights = [_linear(layer, name).weight for name in group]
        outcomes = gguf_gptq_quantize_shared(
            group_weights, [_block(kind(name)) for name in group], accumulator.hessian, dampening=dampening, act_order=act_order
        )
        for name, weight, (qt, fell_back) in zip(group, group_weights, outcomes, strict=True):
            if fell_back:
                result.fallback_modules.append(f"{prefix}{name}: Cholesky failed, RTN on the GGUF grid")
            result.module_errors[f"{prefix}{name}"] = output_error(weight, qt.dequantize(), accumulator.hessian)
            solved[name] = qt
    return solved


def _block(kind: gguf_grid.BlockType | None) -> gguf_grid.BlockType:
    assert kind is not None
    return kind
