"""The engine's result: what was produced, how long it took, and how good it is. Serialised as eval.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EvalMetrics:
    """Paper-protocol perplexity plus llama.cpp-style distribution agreement, original vs quantized."""

    ppl_original: float
    ppl_quantized: float
    delta_ppl_pct: float
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    tokens: int
    windows: int
    seq_len: int


@dataclass
class ModuleError:
    layer: int
    module: str  # e.g. "self_attn.q_proj"
    error: float  # mean squared error of the module's output on calibration inputs, quantized vs original
    relative_error: float  # error / mean squared original output
    fell_back_to_rtn: bool = False
    note: str | None = None


@dataclass
class EngineReport:
    model: str
    architecture: str
    method: str
    bits: int
    group_size: int
    symmetric: bool
    formats: list[str]
    num_layers: int
    files: list[str] = field(default_factory=list)  # paths relative to the output directory
    timings_s: dict[str, float] = field(default_factory=dict)  # load, calibrate, quantize, write, evaluate, total
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)  # {"rss": ..., "cuda": ...}
    bytes_original: int = 0  # weights of the source checkpoint
    bytes_quantized: int = 0  # weights of the primary output checkpoint
    module_errors: list[ModuleError] = field(default_factory=list)
    fallback_modules: list[str] = field(default_factory=list)  # "layers.3.mlp.down_proj: cholesky failed ..."
    eval: EvalMetrics | None = None
    auto: dict[str, Any] | None = None  # method "auto": every candidate's held-out KL and time, and the choice
    bits_per_weight: float | None = None  # stored bits of the quantized Linears per weight (scales included)
    mixed_precision: dict[str, Any] | None = None  # the grid of each Linear group (workers/mixed_precision.py)
    # every format: path, grid ("scheme" or its GGUF type), bytes, bits_per_weight, eval (workers/outputs.py)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, compressed-tensors, quantfleet

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
