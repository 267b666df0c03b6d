"""A job whose output formats are GGUF (`gguf:Q4_K_M`, ...): the engine's `_build` for GGUF's own grids.

GGUF formats are solved on the file's own block types (workers/gguf_export.py), not on the job's integer
scheme, so they cannot share the compressed-tensors pipeline's solve; a job asks for GGUF formats only
(`JobSpec.validate`). Each format is one export into its own folder (the first at the output's root, the
others in `gguf-<TYPE>/`), all from one tokenization of the calibration text. The first format is evaluated
like every other checkpoint (workers/evaluate.py, on exactly the weights the file decodes to).
"""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

import torch
import transformers

from workers.calibration import calibration_windows, eval_windows, read_text
from workers.calibration_cache import CalibrationProvider
from workers.errors import JobCancelled
from workers.evaluate import compare_on_windows
from workers.formats.gguf import parse_format
from workers.gguf_export import export_gguf
from workers.loading import load_tokenizer
from workers.memory import PeakMemory
from workers.progress import CancelCheck, Progress, ProgressCallback
from workers.report import EngineReport, ModuleError
from workers.spec import JobSpec, Method, OutputFormat
from workers.validation import ModelInfo


def output_path(root: Path, index: int, fmt: OutputFormat) -> Path:
    """Where format number `index` of a job goes: `model-<TYPE>.gguf`, the first at the root."""
    file_type = parse_format(fmt.value)
    folder = root if index == 0 else root / f"gguf-{file_type}"
    return folder / f"model-{file_type}.gguf"


def _versions() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"quantfleet": version("quantfleet"), "torch": torch.__version__, "transformers": transformers.__version__,
            "gguf": version("gguf")}


def build_gguf(
    spec: JobSpec,
    info: ModelInfo,
    staging: Path,
    device: torch.device,
    on_progress: ProgressCallback,
    should_cancel: CancelCheck,
    calibration_provider: CalibrationProvider | None = None,
) -> EngineReport:
    """Write every GGUF format of `spec` under `staging` and evaluate the first; the job's EngineReport."""
    report = EngineReport(
        model=str(info.model_dir), architecture=info.architecture.name, method=spec.method.value,
        bits=spec.scheme.bits, group_size=spec.scheme.group_size, symmetric=spec.scheme.symmetric,
        formats=[f.value for f in spec.formats], num_layers=info.num_layers, bytes_original=info.weight_bytes,
        versions=_versions(),
    )
    timings = report.timings_s
    with PeakMemory(device) as memory:
        mark = time.perf_counter()
        tokenizer = load_tokenizer(info.model_dir) if spec.calibration.path or spec.eval else None
        calibration = None
        if spec.method is Method.GPTQ and tokenizer is not None:
            on_progress(Progress("calibrate", num_layers=info.num_layers, message="tokenizing calibration text"))
            calibration = (calibration_provider or calibration_windows)(spec.calibration, tokenizer)
        timings["calibrate"] = time.perf_counter() - mark

        def on_layer(index: int, total: int) -> None:
            if should_cancel():
                raise JobCancelled(f"cancelled after decoder layer {index} of {total}")
            on_progress(Progress("quantize", index + 1, total))

        mark = time.perf_counter()
        exports = []
        for index, fmt in enumerate(spec.formats):
            path = output_path(staging, index, fmt)
            path.parent.mkdir(parents=True, exist_ok=True)
            on_progress(Progress("quantize", 0, info.num_layers, message=f"{fmt.value} ({spec.method.value})"))
            exports.append(export_gguf(
                info.model_dir, path, parse_format(fmt.value), method="gptq" if spec.method is Method.GPTQ else "rtn",
                calibration=calibration, act_order=spec.act_order, dampening=spec.dampening, device=device,
                keep_dequantized=index == 0 and spec.eval is not None, on_layer=on_layer,
            ))
        timings["quantize"] = time.perf_counter() - mark
        primary = exports[0]
        report.bytes_quantized = primary.file_bytes
        report.bits_per_weight = primary.bits_per_weight
        report.fallback_modules = [note for e in exports for note in e.fallback_modules]
        report.module_errors = [_module_error(name, mse, rel) for name, (mse, rel) in primary.module_errors.items()]

        if spec.eval is not None and tokenizer is not None:
            mark = time.perf_counter()
            windows = eval_windows(read_text(spec.eval.path, "evaluation"), tokenizer, spec.eval.seq_len,
                                   spec.eval.max_windows)
            report.eval = compare_on_windows(info.model_dir, [primary.weights()], windows, device, on_progress,
                                             should_cancel=should_cancel)[0]
            timings["evaluate"] = time.perf_counter() - mark
    report.peak_memory_bytes = memory.result()
    return report


def _module_error(name: str, mse: float, relative: float) -> ModuleError:
    """"model.layers.3.mlp.down_proj" → ModuleError(3, "mlp.down_proj", ...)."""
    head, _, module = name.partition(".layers.")
    layer, _, rest = module.partition(".")
    return ModuleError(int(layer) if layer.isdigit() else -1, rest or head, mse, relative)
