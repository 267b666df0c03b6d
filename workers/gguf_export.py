"""One GGUF file from a model directory, outside a job (tests, benchmarks/gguf_quality.py): the layer loop of
workers/pipeline.py with a single output, the file type's grid (workers/methods/gguf.py) writing a `GGUFFile`.

A job writes GGUF through the same loop, beside its other formats (workers/engine.py); this is that path with
one GGUF format and no evaluation, returning what the file holds (and, with `keep_dequantized`, the float32
weights it decodes to, for scoring).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from workers.formats.gguf import DenseWeights, GGUFFile, GGUFWeights, Origin
from workers.loading import CheckpointWeights, LayerwiseModel
from workers.methods.gguf import GGUFGrid
from workers.pipeline import Output, quantize_model
from workers.spec import JobSpec, Method
from workers.tensor_source import TensorSource

__all__ = ["DenseWeights", "GGUFExport", "export_gguf"]

GGUFMethod = Literal["rtn", "gptq", "awq"]


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
    module_errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # "layers.i.module" → (mse, relative)
    dequantized: dict[str, Tensor] = field(default_factory=dict)
    origins: dict[str, Origin] = field(default_factory=dict)  # GGUF name → where it came from

    def weights(self) -> DenseWeights:
        return DenseWeights(self.dequantized)

    def read_back(self) -> GGUFWeights:
        """What the file decodes to, read from it (the `gguf` package's dequantizers)."""
        return GGUFWeights(self.path, self.origins)


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
) -> GGUFExport:
    """Quantize `model_dir` to GGUF `file_type` ("Q4_K_M", ...) with `method` and write `out_path`. RTN uses
    no calibration (llama.cpp's own rules), so `calibration` is read by GPTQ and AWQ only."""
    started = time.perf_counter()
    if method != "rtn" and calibration is None:
        raise ValueError(f"{method} on the GGUF grid needs calibration token windows")
    device = device or torch.device("cpu")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    sink = GGUFFile(out_path, model_dir, config, file_type, keep_dequantized=keep_dequantized)
    spec = JobSpec(model_dir=str(model_dir), method=Method(method), dampening=dampening, act_order=act_order)
    grid = GGUFGrid(f"gguf:{file_type}", sink.block_of, spec.method)
    try:
        quantize_model(
            LayerwiseModel(model_dir, device), CheckpointWeights(TensorSource(model_dir)), spec, [Output([sink], grid)],
            calibration if method != "rtn" else None,
        )
        notes = sink.finalize()
    except BaseException:
        sink.abort()
        out_path.unlink(missing_ok=True)
        raise
    return GGUFExport(
        out_path, file_type, method, {t.name: t.type for t in sink.written}, sink.bits_per_weight(),
        out_path.stat().st_size, time.perf_counter() - started, notes, grid.result.fallback_modules,
        {f"layers.{e.layer}.{e.module}": (e.error, e.relative_error) for e in grid.result.module_errors},
        sink.dequantized, sink.origins,
    )
