"""How the layer loop runs (never what it computes: every switch here keeps the checkpoint bytes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PipelineOptions:
    batch_tokens: int = 8192  # tokens per forward chunk: bounds the attention/MLP intermediates
    awq_grid: int = 20
    gptq_block_size: int = 128
    device_activation_fraction: float = 0.5  # keep activations on the GPU if they fit in this share of free memory
    prefetch_weights: bool = True  # read layer i+1 from disk on a thread while layer i is solved (prefetch.py)
    background_writes: bool = True  # write finished layers on a thread (background_writer.py)
    max_pending_writes: int = 2  # layers queued or being written at once: bounds the memory they hold
    fast_error_report: bool = True  # per-module output errors (a report metric) from bf16 GEMM operands on CUDA
    resume_dir: Path | None = None  # keep finished layers and the next inputs here; a rerun resumes (resume.py)
    checkpoint_every: int = 1  # save the next layer's inputs after every this many layers (with resume_dir)

    RESUME_FIELDS = ("resume_dir", "checkpoint_every")  # where and how often: they change no output byte
