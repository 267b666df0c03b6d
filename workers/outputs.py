"""A job's output formats as the layer loop's outputs: one per grid, each format written from its grid's weights.

    compressed-tensors, gptq      the job scheme's grid (the job's method), one CheckpointWriter each
    gguf:<TYPE>                   that file type's own grid (workers/methods/gguf.py), one GGUFFile each

`JobOutputs.sinks()` hands them to `quantize_model` in the job's format order, so the first format's grid is
the primary one (the one whose quantized layers make the next layers' inputs, workers/pipeline.py). Layout: the
first format at the root of the output, every other in a folder of its own: `<format>/` for checkpoints,
`gguf-<TYPE>/model-<TYPE>.gguf` for GGUF files. Evaluation scores each grid once (`eval_sources`), as written to
disk: a checkpoint read back, a GGUF file decoded by the `gguf` package.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.bits_per_weight import bits_per_weight
from workers.formats.gguf import GGUFFile, parse_format
from workers.formats.writer import CheckpointWriter
from workers.loading import WeightSource
from workers.methods.base import PipelineResult
from workers.methods.gguf import GGUFGrid
from workers.methods.kv_cache import kv_cache_scheme
from workers.multimodal import complete_checkpoint
from workers.pipeline import CheckpointSink, Output
from workers.report import EvalMetrics, ModuleError
from workers.spec import JobSpec, OutputFormat
from workers.validation import ModelInfo

# Files a runtime needs besides the weights; copied into every checkpoint directory when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def output_path(root: Path, index: int, fmt: OutputFormat) -> Path:
    """Where format number `index` of a job goes: a checkpoint directory, or a GGUF file (see the docstring)."""
    if fmt.is_gguf:
        file_type = parse_format(fmt.value)
        return (root if index == 0 else root / f"gguf-{file_type}") / f"model-{file_type}.gguf"
    return root if index == 0 else root / fmt.value


def copy_tokenizer(model_dir: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@dataclass
class GGUFOutput:
    file: GGUFFile
    grid: GGUFGrid


@dataclass
class JobOutputs:
    """Every format of one job under `root`: its sinks, then its files, sizes and grids' results."""

    spec: JobSpec
    info: ModelInfo
    root: Path
    paths: list[Path] = field(init=False)
    writers: dict[OutputFormat, CheckpointWriter] = field(init=False, default_factory=dict)
    gguf: dict[OutputFormat, GGUFOutput] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = [output_path(self.root, i, fmt) for i, fmt in enumerate(self.spec.formats)]

    def open(self) -> JobOutputs:
        """Create every format's sink (before the layer loop); without it, the outputs are files already written."""
        spec, info = self.spec, self.info
        for fmt, path in zip(spec.formats, self.paths, strict=True):
            if fmt.is_gguf:
                file = GGUFFile(path, info.model_dir, info.config, parse_format(fmt.value))
                grid = GGUFGrid(fmt.value, file.block_of, spec.method)
                self.gguf[fmt] = GGUFOutput(file, grid)
            else:
                self.writers[fmt] = CheckpointWriter(
                    path, fmt, spec.scheme, info.dtype, act_order=spec.act_order and spec.method.sweeps,
                    mixed=spec.mixed_precision is not None,
                    kv_cache_scheme=kv_cache_scheme() if spec.kv_cache_fp8 else None,
                )
        return self

    def sinks(self) -> list[CheckpointSink[Any] | Output]:
        """quantize_model's `sinks`: the checkpoint writers (the scheme's grid) and one Output per GGUF type."""
        return [self.writers[f] if f in self.writers else Output([self.gguf[f].file], self.gguf[f].grid)
                for f in self.spec.formats]

    def finalize(self) -> None:
        """Write the configs, indexes and GGUF files, and copy the tokenizer beside each checkpoint."""
        info = self.info
        for fmt, writer in self.writers.items():
            writer.finalize(info.config)
            directory = self.path_of(fmt)
            copy_tokenizer(info.model_dir, directory)
            complete_checkpoint(info.model_dir, info.architecture, directory)  # processor files, dense towers/routers
        for out in self.gguf.values():
            out.file.finalize()

    def abort(self) -> None:
        for out in self.gguf.values():
            out.file.abort()

    def path_of(self, fmt: OutputFormat) -> Path:
        return self.paths[self.spec.formats.index(fmt)]

    @property
    def grids(self) -> list[OutputFormat]:
        """One format per grid, in format order: the first checkpoint format (the scheme's) and every GGUF type."""
        first = next((f for f in self.spec.formats if not f.is_gguf), None)
        return [f for f in self.spec.formats if f.is_gguf or f == first]

    def grid_of(self, fmt: OutputFormat) -> OutputFormat:
        """The format that stands for `fmt`'s grid: itself for GGUF, else the first checkpoint format."""
        return fmt if fmt.is_gguf else next(f for f in self.spec.formats if not f.is_gguf)

    def result_of(self, fmt: OutputFormat, scheme: PipelineResult) -> PipelineResult:
        """The errors and fallbacks of `fmt`'s grid (`scheme`: what quantize_model returned, the scheme grid's)."""
        return self.gguf[fmt].grid.result if fmt.is_gguf else scheme

    def module_errors(self, scheme: PipelineResult) -> list[ModuleError]:
        """The primary format's module errors."""
        return self.result_of(self.spec.formats[0], scheme).module_errors

    def fallback_modules(self, scheme: PipelineResult) -> list[str]:
        """Every grid's fallbacks, in format order."""
        return [note for fmt in self.grids for note in self.result_of(fmt, scheme).fallback_modules]

    def size(self, fmt: OutputFormat) -> tuple[int, float | None]:
        """(bytes of the weights, stored bits per quantized weight) of one format."""
        if fmt.is_gguf:
            file = self.gguf[fmt].file
            return file.path.stat().st_size, file.bits_per_weight()
        directory = self.path_of(fmt)
        return weights_bytes(directory), bits_per_weight(self.info.model_dir, directory)

    def eval_sources(self) -> list[Path | WeightSource]:
        """What each grid is scored on, in `grids` order: the files as written (a GGUF file read back by the
        `gguf` package's dequantizers, bit for bit what the layer loop kept: tests/workers/test_gguf_export.py)."""
        return [self.gguf[f].file.read_back() if f.is_gguf else self.path_of(f) for f in self.grids]

    def summary(self, metrics: list[EvalMetrics] | None) -> list[dict[str, Any]]:
        """eval.json's and the manifest's `outputs`: each format's path, grid, size and evaluation."""
        scores = dict(zip(self.grids, metrics, strict=True)) if metrics is not None else {}
        rows = []
        for fmt in self.spec.formats:
            size, bits = self.size(fmt)
            score = scores.get(self.grid_of(fmt))
            rows.append({
                "format": fmt.value, "path": str(self.path_of(fmt).relative_to(self.root)),
                "grid": fmt.value if fmt.is_gguf else "scheme", "bytes": size, "bits_per_weight": bits,
                "eval": asdict(score) if score is not None else None,
            })
        return rows
