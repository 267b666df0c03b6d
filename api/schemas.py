"""Request and response bodies of the /v1 API. Request models forbid unknown fields, so a typo is a 422
that names the field instead of a silently ignored setting. Engine rules (supported bits, group sizes,
calibration sizes, model compatibility) are checked after parsing, with the engine's own messages."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")

EXAMPLE_JOB: dict[str, Any] = {
    "model": "/srv/models/SmolLM2-135M-Instruct",
    "method": "gptq",
    "bits": 4,
    "group_size": 64,
    "symmetric": True,
    "calibration": {"uri": "/srv/data/shakespeare-calibration.txt", "num_samples": 128, "seq_len": 512},
    "eval": {"uri": "/srv/data/shakespeare-eval.txt", "seq_len": 512},
    "output": {"formats": ["compressed-tensors"]},
    "priority": 0,
    "labels": {"team": "nlp"},
}


MAX_GPUS_PER_JOB = 16  # the engine's limit on JobSpec.devices

FormatName = Literal[  # workers.spec.OutputFormat; gguf:<type> is a llama.cpp file, solved on its own grid
    "compressed-tensors", "gptq", "gguf:Q4_0", "gguf:Q4_1", "gguf:Q5_0", "gguf:Q5_1", "gguf:Q8_0", "gguf:Q4_K_S",
    "gguf:Q4_K_M", "gguf:Q5_K_S", "gguf:Q5_K_M", "gguf:Q6_K", "gguf:F16",
]
MethodName = Literal["gptq", "awq", "rtn", "awq-gptq", "auto"]
SchemeName = Literal[  # workers.spec.SCHEME_PRESETS
    "fp8-dynamic", "fp8-static", "fp8-block", "w8a8-int8", "w8a8-int8-smoothquant"
]


def default_formats() -> list[FormatName]:
    return ["compressed-tensors"]


MAX_INT64 = 2**63 - 1  # every integer a request carries fits a signed 64-bit column (and SQLite's INTEGER)
MAX_URI = 4096  # PATH_MAX


def unstorable(value: Any, where: str = "") -> str | None:
    """Why `value` (any JSON value) cannot be stored and used as given, or None: text with a NUL character
    or a lone surrogate (not valid Unicode), an integer beyond 64 bits, NaN or infinity. `where` locates
    the problem inside nested dicts and lists."""
    at = f" (at {where})" if where else ""
    if isinstance(value, str):
        if "\x00" in value:
            return f"must not contain a NUL character (\\x00){at}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"must be valid Unicode text: it has a lone surrogate such as \\ud800{at}"
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int):
        if not -MAX_INT64 - 1 <= value <= MAX_INT64:
            return f"integers must fit in 64 bits (-2**63 .. 2**63-1){at}"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return f"numbers must be finite (no NaN or Infinity){at}"
    elif isinstance(value, dict):
        for key, item in value.items():
            inside = f"{where}[{key!r}]".encode("utf-8", "backslashreplace").decode()
            problem = unstorable(key, inside + " (the key)") or unstorable(item, inside)
            if problem:
                return problem
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = unstorable(item, f"{where}[{i}]")
            if problem:
                return problem
    return None


class Strict(BaseModel):
    """Base of every request body: unknown fields are refused, and so is any text with a NUL character or
    a lone surrogate, any integer beyond 64 bits and NaN or infinity, in every field at any depth: a 422
    naming the field instead of a database error."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        if not isinstance(value, BaseModel):  # nested request models checked their own fields
            problem = unstorable(value)
            if problem:
                raise ValueError(problem)
        return value


class CalibrationIn(Strict):
    uri: str = Field(
        max_length=MAX_URI,
        description="Calibration text: .txt or .jsonl of {'text': ...}; local path or s3:// URI",
    )
    num_samples: int = Field(default=128, description="Number of calibration sequences (1..4096)")
    seq_len: int = Field(default=512, description="Tokens per calibration sequence (16..32768)")
    seed: int = Field(
        default=0, ge=0, le=MAX_INT64, description="Seed for picking the calibration windows (0..2**63-1)"
    )


class MixedPrecisionIn(Strict):
    """W4A16 mixed precision: a grid per group of Linears, by rule or by measured sensitivity (not both)."""

    edge_layers: int = Field(default=0, ge=0, le=1024, description="Rule: the first and last N decoder layers at `high_bits`")
    patterns: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=list, max_length=64,
        description="Rule: Linears whose full name matches one of these regular expressions (e.g. 'down_proj') at "
        "`high_bits`",
    )
    high_bits: Literal[4, 8] = Field(default=8, description="Rule: the bits of the favoured Linears")
    high_group_size: int | None = Field(
        default=None, description="Rule: their group size (default: the job's group_size; -1 one scale per row)"
    )
    target_bits_per_weight: float | None = Field(
        default=None, ge=2, le=16, allow_inf_nan=False,
        description="By sensitivity: the average stored bits per weight (scales included; w4 g32 is 4.5) to meet; "
        "each group's error at w4/w8 grids is measured from its Hessian and bits go where they cut it most",
    )
    target_kl: float | None = Field(
        default=None, gt=0, le=10, allow_inf_nan=False,
        description="By sensitivity, instead of target_bits_per_weight: the KL divergence from the original model (nats"
        " per token, estimated from the measured errors) to stay within, with the fewest bits",
    )


class EvalIn(Strict):
    uri: str = Field(
        max_length=MAX_URI,
        description="Held-out text scored for perplexity, KL divergence and top-1 agreement",
    )
    seq_len: int = Field(default=512, description="Tokens per evaluation window (16..32768)")
    max_windows: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Evaluate at most this many windows (default: all)"
    )


class OutputIn(Strict):
    uri: str | None = Field(
        default=None,
        max_length=1024,
        description="A folder of your owner's own, under which the job writes to {uri}/{job id}/: "
        "s3://bucket/{owner}/... in an allowed bucket, or {allowed output root}/{owner}/... (never inside "
        "the service's object store). Default: jobs/{job id}/ in the service's object store.",
    )
    formats: list[FormatName] = Field(
        default_factory=default_formats,
        max_length=len(get_args(FormatName)),
        description="Checkpoint formats to write, each once (a repeated one is written once)",
    )

    @field_validator("formats")
    @classmethod
    def _each_format_once(cls, formats: list[FormatName]) -> list[FormatName]:
        return list(dict.fromkeys(formats))


class GateIn(Strict):
    """Quality gate: the artifact is promoted (registry, `candidate` alias) only if every given limit holds."""

    max_delta_ppl_pct: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Most perplexity increase allowed, in percent of the original's",
    )
    max_kl: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Most mean KL divergence (original → quantized) allowed",
    )

    @model_validator(mode="after")
    def _some_limit(self) -> GateIn:
        if self.max_delta_ppl_pct is None and self.max_kl is None:
            raise ValueError("a gate needs at least one of max_delta_ppl_pct, max_kl")
        return self


class JobCreate(Strict):
    """A quantization job."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [cast(JsonValue, EXAMPLE_JOB)]})

    model: str = Field(
        max_length=MAX_URI,
        description="Model directory (safetensors + config.json): local path or s3:// URI",
    )
    base_model: str | None = Field(
        default=None,
        max_length=200,
        description="Name recorded as base_model in the model card (default: the model's name)",
    )
    method: MethodName = Field(
        description="Quantization algorithm: gptq, awq, rtn, awq-gptq (AWQ's scales folded, then GPTQ), or "
        "auto (each of auto_candidates, keeping the one with the lowest KL on held-out calibration windows)"
    )
    bits: int = Field(default=4, description="Weight bits: 2, 3, 4 or 8")
    group_size: int = Field(
        default=128, description="Columns per scale: 32, 64, 128, or -1 for one scale per row"
    )
    symmetric: bool = Field(default=True, description="Symmetric grid (no zero point)")
    scheme: SchemeName | None = Field(
        default=None,
        description="A named FP8 (E4M3) scheme instead of the integer grid of bits/group_size, written as "
        "compressed-tensors float-quantized for vLLM: 'fp8-dynamic' (one weight scale per output channel, "
        "activations quantized per token at run time; no calibration), 'fp8-static' (per-tensor weight scale, "
        "per-tensor activation scale observed on the calibration data, which it needs) or 'fp8-block' (a scale "
        "per 128×128 weight block, DeepSeek-V3 style; every Linear's dimensions must divide by 128). Needs "
        "method rtn or gptq (GPTQ on the E4M3 grid, with calibration) and the compressed-tensors format only; bits, "
        "if given, must be 8 (stored as 8, group_size -1). "
        "Or INT8 W8A8 for vLLM (compressed-tensors int-quantized): 'w8a8-int8' (per-channel int8 weights, per-token "
        "dynamic int8 activations; method gptq or rtn) and 'w8a8-int8-smoothquant' (SmoothQuant first, migration "
        "strength `smoothquant_alpha`, default 0.8; needs calibration).",
    )
    smoothquant_alpha: float | None = Field(
        default=None, ge=0, le=1, allow_inf_nan=False,
        description="SmoothQuant's migration strength α for scheme w8a8-int8-smoothquant (default 0.8)",
    )
    kv_cache_fp8: bool = Field(
        default=False,
        description="Record FP8 KV-cache scales (k_scale, v_scale = max|k|, max|v| / 448 over the calibration "
        "tokens) in the checkpoint's kv_cache_scheme, as vLLM reads them; needs calibration",
    )
    mixed_precision: MixedPrecisionIn | None = Field(
        default=None,
        description="W4A16 mixed precision (compressed-tensors mixed-precision config groups; the allocation is "
        "in eval.json); method gptq or rtn",
    )
    calibration: CalibrationIn | None = Field(
        default=None, description="Calibration data; required for gptq and awq"
    )
    eval: EvalIn | None = Field(default=None, description="Evaluation data; omit to skip evaluation")
    output: OutputIn = Field(default_factory=lambda: OutputIn(), description="Where and in which formats")
    dampening: float = Field(
        default=0.01, description="GPTQ Hessian dampening, as a fraction of mean(diag H)"
    )
    act_order: bool = Field(
        default=True,
        description="GPTQ: quantize columns in order of decreasing activation (Hessian diagonal), with group "
        "scales fixed from the original weights (static groups: the checkpoint layout stays plain)",
    )
    observer: Literal["minmax", "mse"] = Field(
        default="mse",
        description="How each group's range is chosen (GPTQ and RTN): 'mse', the range with the least "
        "activation-weighted rounding error (default; with GPTQ each output row keeps whichever of those ranges "
        "and min-max gives the lower error after the solve; benchmarks/quality.md), or 'minmax'",
    )
    auto_candidates: list[Annotated[str, Field(max_length=32)]] = Field(
        default_factory=lambda: ["gptq:mse", "awq", "awq-gptq:mse"],
        min_length=1,
        max_length=8,
        description="Method auto: the candidates tried, each METHOD or METHOD:OBSERVER (e.g. gptq:mse)",
    )
    auto_budget_s: float | None = Field(
        default=None,
        gt=0,
        le=7 * 24 * 3600,
        description="Method auto: start no further candidate that would end after this many seconds",
    )
    gpus: int = Field(
        default=1,
        ge=1,
        le=MAX_GPUS_PER_JOB,
        description=f"GPUs for this one job (1..{MAX_GPUS_PER_JOB}); calibration is split across them "
        "(data parallel). A job runs on one node, so a node must have that many GPUs. On a cluster "
        "without GPUs only gpus=1 runs (on CPU); more fails the job with the reason.",
    )
    priority: int = Field(default=0, ge=-100, le=100, description="Higher runs first; ties run oldest first")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Free-form key/value labels to filter by"
    )
    gate: GateIn | None = Field(
        default=None,
        description="Quality gate checked on the evaluation (needs eval); only passing artifacts "
        "are promoted to the model registry",
    )

    @model_validator(mode="after")
    def _fp8_scheme_grid(self) -> JobCreate:
        """A named scheme fixes the grid: 8 bits, no groups, symmetric (stored so, for filters and cards)."""
        if self.smoothquant_alpha is not None and self.scheme != "w8a8-int8-smoothquant":
            raise ValueError("smoothquant_alpha belongs to scheme w8a8-int8-smoothquant: set that scheme or drop it")
        if self.scheme is None:
            return self
        given = self.model_fields_set
        if ("bits" in given and self.bits != 8) or ("group_size" in given and self.group_size != -1) or not self.symmetric:
            kind = "FP8" if self.scheme.startswith("fp8") else "int8 (W8A8)"
            raise ValueError(
                f"scheme {self.scheme} has 8-bit symmetric {kind} weights with its own scale layout: drop bits, "
                "group_size and symmetric (or set bits 8, group_size -1, symmetric true)"
            )
        self.bits, self.group_size = 8, -1
        return self

    @model_validator(mode="after")
    def _gate_needs_eval(self) -> JobCreate:
        if self.gate is not None and self.eval is None:
            raise ValueError(
                'a quality gate is checked on the evaluation: add eval {"uri": ...} or drop the gate'
            )
        return self

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        if len(labels) > 32:
            raise ValueError("at most 32 labels")
        for key, value in labels.items():
            if not LABEL_KEY.match(key):
                raise ValueError(f"label key {key!r} must be 1-63 chars of a-z, 0-9, '.', '_', '-'")
            if len(value) > 255:
                raise ValueError(f"label {key!r}: value longer than 255 characters")
        return labels


class ProgressOut(BaseModel):
    stage: str | None = Field(
        default=None, description="load, calibrate, quantize, write, evaluate, upload, done"
    )
    layer: int | None = Field(default=None, description="Current decoder layer, 1-based")
    num_layers: int | None = None
    module: str | None = None
    message: str | None = None
    summary: str = Field(default="", description="Human-readable, e.g. 'quantize layer 4/30'")

    @classmethod
    def from_row(cls, progress: dict[str, Any] | None) -> ProgressOut | None:
        if not progress:
            return None
        layer = progress.get("layer")
        shown = None if layer is None else layer + 1
        total = progress.get("num_layers")
        summary = str(progress.get("stage") or "")
        if shown is not None and total:
            summary += f" {'file' if summary == 'upload' else 'layer'} {shown}/{total}"
        return cls(
            stage=progress.get("stage"),
            layer=shown,
            num_layers=total,
            module=progress.get("module"),
            message=progress.get("message"),
            summary=summary.strip(),
        )


class ReportSummary(BaseModel):
    timings_s: dict[str, float] = Field(default_factory=dict)
    bytes_original: int = 0
    bytes_quantized: int = 0
    peak_memory_bytes: dict[str, int] = Field(default_factory=dict)
    fallback_modules: list[str] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)


class QuantizedModulesOut(BaseModel):
    pattern: str = Field(description="Checkpoint name with the layer index as *, e.g. model.layers.*.mlp.down_proj")
    count: int = Field(description="How many such Linears (one per decoder layer)")
    out_features: int
    in_features: int


class DenseModulesOut(BaseModel):
    pattern: str = Field(description="Module name, with the layer index as * inside decoder layers")
    kind: Literal["embeddings", "lm_head", "norm", "router", "bias", "tower", "other"] = Field(
        description="What it is; bias: the bias of a quantized Linear, kept dense; tower: a multimodal model's "
        "vision/audio tower or projector, written as it is"
    )
    count: int
    tensors: list[str] = Field(description="Its tensors, e.g. weight, bias")
    bytes: int = Field(description="Bytes written, in the model's dtype, all of them together")
    note: str = ""


class MemoryEstimateOut(BaseModel):
    cpu: int = Field(description="Peak host memory of a job on CPU (float32 compute), bytes")
    gpu: int = Field(description="Peak memory per GPU of a job on GPUs (the model's dtype), bytes")
    layer_cpu: int = Field(description="One decoder layer in float32, bytes")
    layer_gpu: int = Field(description="One decoder layer in the model's dtype, bytes")
    statistics: int = Field(
        description="Input statistics (Hessians, E[xxᵀ]: 4·in² bytes) of one layer's Linears, one per Linear "
        "(an upper bound: Linears that share an input share one)"
    )
    activations_cpu: int = Field(description="Calibration hidden states into and out of a layer, float32, bytes")
    activations_gpu: int = Field(description="The same in the model's dtype, per GPU, bytes")


class ExpertModulesOut(BaseModel):
    pattern: str = Field(description="The experts' checkpoint prefix, layer index as *, e.g. model.layers.*.mlp.experts")
    layers: int = Field(description="Decoder layers with this MoE block")
    experts: int = Field(description="Experts per layer; every one is quantized")
    linears: list[str] = Field(description="Each expert's Linears, e.g. gate_proj, up_proj, down_proj")
    hidden: int
    intermediate: int
    fused_in_model: bool = Field(description="transformers holds the experts as fused 3-D parameters")
    fused_in_checkpoint: bool = Field(description="The source checkpoint stores them fused (written per expert)")
    dense: list[str] = Field(description="The block's routers and gates, kept dense")
    statistics_bytes: int = Field(description="Input statistics of one layer's experts held at once, bytes")


class JobPlanOut(BaseModel):
    """The preflight plan, computed at submit time from config.json and the safetensors headers only."""

    architecture: str = Field(description="The transformers class, e.g. LlamaForCausalLM")
    model_type: str = Field(description="config.json's model_type, e.g. llama")
    dtype: str = Field(description="The checkpoint's dtype; scales and dense tensors are written in it")
    num_layers: int = Field(description="Decoder layers")
    layers: str = Field(description="Checkpoint prefix of the decoder layers, e.g. model.layers.*")
    method: str
    bits: int
    group_size: int
    symmetric: bool
    quantized: list[QuantizedModulesOut] = Field(description="Every Linear that will be quantized, by name")
    quantized_count: int = Field(description="Linears quantized: every Linear of every decoder layer")
    dense: list[DenseModulesOut] = Field(description="What stays dense: embeddings, lm_head, norms, biases…")
    tied_embeddings: bool = Field(description="lm_head reuses the input embeddings")
    awq_mappings: list[str] = Field(description="AWQ smoothing pairs (prev → anchor), for methods that smooth")
    weight_bytes: int = Field(description="Size of the original safetensors files")
    memory: MemoryEstimateOut = Field(description="Estimated peak memory of the layer loop")
    output_bytes: dict[str, int] = Field(description="Estimated checkpoint size per requested format, bytes")
    experts: list[ExpertModulesOut] = Field(default_factory=list, description="Mixture-of-Experts blocks")
    towers: list[str] = Field(
        default_factory=list, description="Multimodal towers and projectors kept dense (checkpoint names)"
    )


class JobOut(BaseModel):
    id: str
    url: str = Field(description="This job's URL")
    state: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    owner: str
    priority: int
    labels: dict[str, str]
    spec: dict[str, Any] = Field(description="The request as accepted, defaults filled in")
    attempts: int = Field(description="Attempts started so far")
    max_attempts: int
    progress: ProgressOut | None = None
    error: str | None = Field(default=None, description="Why the last attempt failed (kept while retrying)")
    metrics: dict[str, Any] | None = Field(default=None, description="Evaluation metrics, once succeeded")
    report: ReportSummary | None = Field(default=None, description="Timings and sizes, once succeeded")
    output_uri: str | None = Field(default=None, description="Where the artifacts are, once succeeded")
    gate: dict[str, Any] | None = Field(
        default=None, description="Quality gate verdict (passed, reasons, checks)"
    )
    plan: JobPlanOut | None = Field(
        default=None,
        description="The preflight plan computed at submit: architecture, layers, what is quantized and what "
        "stays dense, estimated peak memory and output size (null for a model read only by the worker, e.g. "
        "on S3, and for jobs submitted by batches and schedules)",
    )
    batch_id: str | None = Field(default=None, description="The batch this job belongs to, if any")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(
        default=None, description="Pass as ?cursor= to get the next page; null on the last"
    )


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: Literal["state", "attempt", "progress"]
    attempt: int
    state: str | None = None
    stage: str | None = None
    layer: int | None = None
    num_layers: int | None = None
    message: str | None = None
    data: dict[str, Any] | None = None


class ArtifactOut(BaseModel):
    path: str = Field(description="Path relative to the job's output location")
    uri: str
    kind: str
    sha256: str
    bytes: int


class Problem(BaseModel):
    detail: str = Field(description="What went wrong and what to change")
