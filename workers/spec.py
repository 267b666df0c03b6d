"""The job specification the engine runs: what to quantize, how, and how to evaluate it.

Everything here is checked without touching the model (`JobSpec.validate`); checks that need the
model's config live in `workers.validation.check_against_model`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from workers.errors import InvalidSpecError


class Method(StrEnum):
    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    AWQ_GPTQ = "awq-gptq"  # AWQ's scales folded first, then GPTQ on the scaled weights (no clip search)
    AUTO = "auto"  # try `JobSpec.auto_candidates`, keep the one with the lowest KL on held-out calibration windows

    @property
    def smooths(self) -> bool:
        """Runs AWQ's scale search and folds the scales."""
        return self in (Method.AWQ, Method.AWQ_GPTQ)

    @property
    def sweeps(self) -> bool:
        """Solves the Linears with GPTQ."""
        return self in (Method.GPTQ, Method.AWQ_GPTQ)


Observer = Literal["minmax", "mse"]
OBSERVERS: tuple[Observer, ...] = ("minmax", "mse")


AUTO_CANDIDATES: tuple[str, ...] = ("gptq:mse", "awq", "awq-gptq:mse")


def parse_candidate(text: str) -> tuple[Method, Observer]:
    """"gptq:mse" → (Method.GPTQ, "mse"); "awq" → (Method.AWQ, "minmax"). Raises InvalidSpecError."""
    name, _, observer = text.partition(":")
    methods = [m.value for m in Method if m is not Method.AUTO]
    if name not in methods:
        raise InvalidSpecError(f"auto candidate {text!r}: method {name!r} is not one of {methods}")
    observer = observer or "minmax"
    if observer not in OBSERVERS:
        raise InvalidSpecError(f"auto candidate {text!r}: observer {observer!r} is not one of {list(OBSERVERS)}")
    return Method(name), observer  # type: ignore[return-value]


class OutputFormat(StrEnum):
    COMPRESSED_TENSORS = "compressed-tensors"
    GPTQ = "gptq"
    # GGUF for llama.cpp, one file type each (workers/formats/gguf.py FILE_TYPES; its grid: workers/methods/gguf.py)
    GGUF_Q4_0 = "gguf:Q4_0"
    GGUF_Q4_1 = "gguf:Q4_1"
    GGUF_Q5_0 = "gguf:Q5_0"
    GGUF_Q5_1 = "gguf:Q5_1"
    GGUF_Q8_0 = "gguf:Q8_0"
    GGUF_Q4_K_S = "gguf:Q4_K_S"
    GGUF_Q4_K_M = "gguf:Q4_K_M"
    GGUF_Q5_K_S = "gguf:Q5_K_S"
    GGUF_Q5_K_M = "gguf:Q5_K_M"
    GGUF_Q6_K = "gguf:Q6_K"
    GGUF_F16 = "gguf:F16"

    @property
    def is_gguf(self) -> bool:
        return self.value.startswith("gguf:")


SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)


FloatStrategy = Literal["channel", "tensor", "block"]
Activations = Literal["none", "dynamic", "static"]
FP8_BLOCK = 128  # block FP8: 128×128 weight blocks (DeepSeek-V3), activations in groups of 128 per token


@dataclass(frozen=True)
class QuantScheme:
    """The weight grid. `type` "int" (default): integer weight-only, group_size -1 meaning one scale per
    output channel. `type` "float": FP8 E4M3 weights (bits 8, symmetric, group_size -1) with one scale per
    output channel, per tensor or per 128×128 block (`strategy`), and FP8 input activations quantized by the
    runtime per token (`activations` "dynamic"; per 128-column group for blocks) or with a scale observed in
    calibration (`activations` "static", per tensor); see workers/quant/fp8.py and `FP8_PRESETS`."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    type: Literal["int", "float"] = "int"
    strategy: FloatStrategy | None = None  # float only
    activations: Activations = "none"  # float only

    @property
    def is_float(self) -> bool:
        return self.type == "float"

    def validate(self) -> None:
        if self.type == "float":
            self._validate_float()
            return
        if self.type != "int":
            raise InvalidSpecError(f"scheme type {self.type!r} is not known; choose 'int' or 'float' (FP8)")
        if self.strategy is not None:
            raise InvalidSpecError("strategy belongs to FP8 schemes (type 'float'); integer grids use group_size")
        if self.activations != "none" and (
            self.activations != "dynamic" or (self.bits, self.group_size, self.symmetric) != (8, -1, True)
        ):
            raise InvalidSpecError(
                "integer schemes are weight-only, or W8A8 (scheme w8a8-int8: bits 8, group_size -1, symmetric,"
                f" activations 'dynamic', quantized per token at run time); got bits={self.bits},"
                f" group_size={self.group_size}, symmetric={self.symmetric}, activations {self.activations!r}"
            )
        if self.bits not in SUPPORTED_BITS:
            raise InvalidSpecError(f"bits={self.bits} is not supported; choose one of {list(SUPPORTED_BITS)}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise InvalidSpecError(
                f"group_size={self.group_size} is not supported; choose one of {list(SUPPORTED_GROUP_SIZES)}"
                " (-1 = one scale per output channel)"
            )

    def _validate_float(self) -> None:
        if self.bits != 8:
            raise InvalidSpecError(f"FP8 (scheme type 'float') has 8-bit weights, not bits={self.bits}; set bits 8")
        if not self.symmetric:
            raise InvalidSpecError("FP8 weights are symmetric (no zero point); set symmetric true")
        if self.group_size != -1:
            raise InvalidSpecError(
                f"FP8 weights take no group_size (got {self.group_size}); set -1 and choose the scale layout with"
                " strategy 'channel', 'tensor' or 'block' (128×128)"
            )
        if self.strategy not in ("channel", "tensor", "block"):
            raise InvalidSpecError(f"FP8 strategy {self.strategy!r} is not one of 'channel', 'tensor', 'block'")
        if self.activations not in ("dynamic", "static"):
            raise InvalidSpecError(
                f"FP8 activations {self.activations!r}: choose 'dynamic' (per token, at run time) or 'static'"
                " (one scale per tensor from calibration)"
            )
        if self.strategy == "block" and self.activations != "dynamic":
            raise InvalidSpecError(
                "block FP8 quantizes activations dynamically (per token, 128 columns a group); use activations"
                " 'dynamic', or strategy 'tensor'/'channel' for static activation scales"
            )

    @property
    def is_w8a8_int(self) -> bool:
        """Integer W8A8: per-channel int8 weights, per-token dynamic int8 activations (compressed-tensors
        `int-quantized`)."""
        return self.type == "int" and self.activations == "dynamic"

    @property
    def preset(self) -> str | None:
        """The name of this scheme in SCHEME_PRESETS, if it is one."""
        return next((name for name, scheme in SCHEME_PRESETS.items() if scheme == self), None)

    @classmethod
    def from_preset(cls, name: str) -> QuantScheme:
        if name not in SCHEME_PRESETS:
            raise InvalidSpecError(f"scheme {name!r} is not known; choose one of {list(SCHEME_PRESETS)}")
        return SCHEME_PRESETS[name]


# The named FP8 schemes (llm-compressor's FP8_DYNAMIC, FP8 and FP8_BLOCK presets).
FP8_PRESETS: dict[str, QuantScheme] = {
    "fp8-dynamic": QuantScheme(8, -1, True, "float", "channel", "dynamic"),
    "fp8-static": QuantScheme(8, -1, True, "float", "tensor", "static"),
    "fp8-block": QuantScheme(8, -1, True, "float", "block", "dynamic"),
}

# Integer W8A8 (llm-compressor's W8A8 preset): per-channel symmetric int8 weights, per-token dynamic int8
# activations. The -smoothquant preset also sets JobSpec.smoothquant to SMOOTHQUANT_ALPHA.
W8A8_INT8 = QuantScheme(8, -1, True, "int", None, "dynamic")
INT8_PRESETS: dict[str, QuantScheme] = {"w8a8-int8": W8A8_INT8, "w8a8-int8-smoothquant": W8A8_INT8}
SMOOTHQUANT_ALPHA = 0.8  # SmoothQuant's migration strength α by default
SMOOTHQUANT_PRESETS: dict[str, float] = {"w8a8-int8-smoothquant": SMOOTHQUANT_ALPHA}
SCHEME_PRESETS: dict[str, QuantScheme] = {**FP8_PRESETS, **INT8_PRESETS}


@dataclass(frozen=True)
class MixedPrecisionSpec:
    """W4A16 mixed precision (workers/mixed_precision.py): each group of Linears sharing an input (q/k/v,
    gate/up, o, down) gets its own integer grid, chosen

    * by rule: `high` (default 8 bits, the job's group size) for the first and last `edge_layers` decoder
      layers and for every Linear whose name (e.g. "model.layers.3.mlp.down_proj") matches one of
      `patterns` (regular expressions, searched); the job's scheme elsewhere; or
    * by measured sensitivity, when `target_bits_per_weight` is set: each group's output error at each of
      `candidates` (default: 4 bits per channel and at group sizes 128, 64, 32, 8 bits per channel and at
      group size 128, the job's symmetry) is measured from its
      Hessian (solved by the job's method, each output channel weighted by its Fisher information), and precision
      is bought greedily where it cuts the error most per bit until the average bits per weight (scales and zero
      points included) would pass the target; never worse by that measure than the best uniform candidate; or,
      with `target_kl` instead, bought the same way until the estimated KL(original ‖ quantized) per token (the
      measured errors are its second-order estimate, workers/fisher.py) is at most the target: the fewest bits
      that meet that quality.
    Written as compressed-tensors config groups (format `mixed-precision`); the allocation is in eval.json."""

    edge_layers: int = 0
    patterns: tuple[str, ...] = ()
    high: QuantScheme | None = None  # default: 8 bits at the job's group size and symmetry
    target_bits_per_weight: float | None = None
    target_kl: float | None = None  # nats per token
    candidates: tuple[QuantScheme, ...] = ()
    allocation: tuple[tuple[str, QuantScheme], ...] = ()  # set by the engine after measuring: full name → grid

    def scheme_of(self, module: str) -> QuantScheme | None:
        """The measured allocation's grid of a Linear (full name), if allocated."""
        return dict(self.allocation).get(module)

    @property
    def by_sensitivity(self) -> bool:
        return self.target_bits_per_weight is not None or self.target_kl is not None

    def validate(self) -> None:
        if self.target_bits_per_weight is not None and self.target_kl is not None:
            raise InvalidSpecError(
                "mixed precision by sensitivity meets one target, target_bits_per_weight (a size) or target_kl (a"
                " quality), not both; drop one"
            )
        if self.by_sensitivity and (self.edge_layers or self.patterns or self.high is not None):
            raise InvalidSpecError(
                "mixed precision is chosen either by rule (edge_layers, patterns, high) or by measured sensitivity"
                " (target_bits_per_weight or target_kl), not both; drop one"
            )
        if not self.by_sensitivity and not (self.edge_layers or self.patterns):
            raise InvalidSpecError(
                "mixed precision needs a rule (edge_layers > 0 or patterns), a target_bits_per_weight or a target_kl"
            )
        if self.target_kl is not None and not (math.isfinite(self.target_kl) and 0 < self.target_kl <= 10):
            raise InvalidSpecError(f"target_kl={self.target_kl} must be above 0 and at most 10 (nats per token)")
        if not 0 <= self.edge_layers <= 1024:
            raise InvalidSpecError(f"edge_layers={self.edge_layers} must be between 0 and 1024")
        if len(self.patterns) > 64:
            raise InvalidSpecError("at most 64 mixed-precision patterns")
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidSpecError(f"mixed-precision pattern {pattern!r} is not a regular expression: {e}") from e
        if self.target_bits_per_weight is not None and not 2 <= self.target_bits_per_weight <= 16:
            raise InvalidSpecError(
                f"target_bits_per_weight={self.target_bits_per_weight} must be between 2 and 16 (scales included)"
            )
        if len(self.candidates) > 12:
            raise InvalidSpecError("at most 12 mixed-precision candidates")
        for scheme in (*self.candidates, *([self.high] if self.high else [])):
            scheme.validate()
            if scheme.is_float or scheme.activations != "none" or scheme.bits not in (4, 8):
                raise InvalidSpecError(
                    f"mixed precision mixes integer weight-only grids of 4 or 8 bits (what vLLM's W4A16/W8A16"
                    f" kernels take), not {scheme}"
                )


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration text: a .txt file or a .jsonl file of {"text": ...} records."""

    path: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.num_samples <= 4096:
            raise InvalidSpecError(f"calibration num_samples={self.num_samples} must be between 1 and 4096")
        if not 16 <= self.seq_len <= 32768:
            raise InvalidSpecError(f"calibration seq_len={self.seq_len} must be between 16 and 32768")


@dataclass(frozen=True)
class EvalSpec:
    """Held-out text scored with the paper protocol: non-overlapping windows, BOS per window."""

    path: str
    seq_len: int = 512
    max_windows: int | None = None

    def validate(self) -> None:
        if not 16 <= self.seq_len <= 32768:
            raise InvalidSpecError(f"eval seq_len={self.seq_len} must be between 16 and 32768")
        if self.max_windows is not None and self.max_windows < 1:
            raise InvalidSpecError("eval max_windows must be at least 1")


@dataclass(frozen=True)
class JobSpec:
    """One quantization job, as the engine sees it. Paths are local: the service resolves URIs first."""

    model_dir: str
    method: Method
    scheme: QuantScheme = field(default_factory=QuantScheme)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    eval: EvalSpec | None = None
    formats: tuple[OutputFormat, ...] = (OutputFormat.COMPRESSED_TENSORS,)
    dampening: float = 0.01
    act_order: bool = True  # GPTQ: static-group act-order (llm-compressor's default; benchmarks/quality.md)
    observer: Observer = "mse"  # group ranges: the weighted range search (range_search.py; GPTQ: per row, the better of it and min-max) or min-max
    auto_candidates: tuple[str, ...] = AUTO_CANDIDATES  # method "auto": "method" or "method:observer" each
    auto_budget_s: float | None = None  # method "auto": start no candidate that would end past this many seconds
    allow_pickle: bool = False
    device: str = "auto"
    devices: int = 1  # accelerators for this one job: calibration split across them (data parallel)
    smoothquant: float | None = None  # SmoothQuant migration strength α (W8A8 int8 only); None: no smoothing
    kv_cache_fp8: bool = False  # record FP8 KV-cache scales k_scale / v_scale from calibration
    mixed_precision: MixedPrecisionSpec | None = None  # per-group integer grids (W4A16 mixed precision)

    def validate(self) -> None:
        """Checks that need no model; raises InvalidSpecError with a message that says what to fix."""
        self.scheme.validate()
        self.calibration.validate()
        if self.eval is not None:
            self.eval.validate()
        if self.method is not Method.RTN and not self.calibration.path:
            raise InvalidSpecError(f"method {self.method.value} needs calibration data (calibration.path)")
        if not self.formats:
            raise InvalidSpecError("at least one output format is required")
        if any(f.is_gguf for f in self.formats):
            self._validate_gguf()
        if self.scheme.is_float:
            self._validate_fp8()
        if OutputFormat.GPTQ in self.formats and self.scheme.bits not in (2, 4, 8):
            raise InvalidSpecError(f"the gptq output format supports bits 2, 4 and 8, not {self.scheme.bits}")
        if not 1 <= self.devices <= 16:
            raise InvalidSpecError(f"devices={self.devices} must be between 1 and 16 (GPUs given to this one job)")
        if self.devices > self.calibration.num_samples:
            raise InvalidSpecError(
                f"devices={self.devices} exceeds calibration num_samples={self.calibration.num_samples}: each device"
                " needs at least one calibration window; lower devices or raise num_samples"
            )
        if self.method is Method.AUTO:
            if not 1 <= len(self.auto_candidates) <= 8:
                raise InvalidSpecError("method auto needs between 1 and 8 auto_candidates")
            for candidate in self.auto_candidates:
                parse_candidate(candidate)
            if self.auto_budget_s is not None and self.auto_budget_s <= 0:
                raise InvalidSpecError(f"auto_budget_s={self.auto_budget_s} must be positive (seconds)")
        if self.observer not in OBSERVERS:
            raise InvalidSpecError(f"observer={self.observer!r} is not known; choose one of {list(OBSERVERS)}")
        if not 0 < self.dampening < 1:
            raise InvalidSpecError(f"dampening={self.dampening} must be in (0, 1)")
        if self.scheme.is_w8a8_int or self.smoothquant is not None:
            self._validate_w8a8()
        if self.kv_cache_fp8:
            self._validate_kv_cache()
        if self.mixed_precision is not None:
            self._validate_mixed_precision(self.mixed_precision)

    def _validate_gguf(self) -> None:
        """GGUF types are grids of their own, solved beside the scheme's from one calibration pass by rtn, gptq or
        awq (workers/methods/gguf.py; AWQ smooths the layer once, searching on the first format's grid): what
        changes a layer otherwise before its solve for several grids, or has no GGUF form, is refused."""
        if self.method not in (Method.RTN, Method.GPTQ, Method.AWQ):
            raise InvalidSpecError(
                f"GGUF export solves with rtn, gptq or awq on the GGUF grid, not {self.method.value}; set one of them"
            )
        if self.scheme.type != "int" or self.scheme.activations != "none" or self.mixed_precision is not None \
                or self.smoothquant is not None:
            raise InvalidSpecError(
                "GGUF formats share a job only with a weight-only integer scheme (the GGUF type is its own grid): drop"
                " the FP8/W8A8/mixed-precision setting, or ask for the GGUF formats in a job of their own"
            )
        if self.kv_cache_fp8:
            raise InvalidSpecError("GGUF files have no FP8 KV-cache scales; set kv_cache_fp8 false or ask for the GGUF"
                                   " formats in a job of their own")

    def _one_device_compressed_tensors(self, what: str) -> None:
        if self.formats != (OutputFormat.COMPRESSED_TENSORS,):
            raise InvalidSpecError(f"{what} is written only as compressed-tensors: set formats to ['compressed-tensors']")
        if self.devices != 1:
            raise InvalidSpecError(f"{what} runs on one device; set devices (gpus) 1")

    def _validate_w8a8(self) -> None:
        if self.smoothquant is not None and not self.scheme.is_w8a8_int:
            raise InvalidSpecError(
                "SmoothQuant moves activation outliers into int8 weights: it applies to scheme w8a8-int8 only"
                " (use awq for weight-only grids)"
            )
        if self.method not in (Method.GPTQ, Method.RTN):
            raise InvalidSpecError(
                f"W8A8 int8 weights are solved by method gptq or rtn, not {self.method.value}; SmoothQuant (scheme"
                " w8a8-int8-smoothquant) does the smoothing"
            )
        self._one_device_compressed_tensors("W8A8 int8 (compressed-tensors int-quantized)")
        if self.smoothquant is not None:
            if not 0 <= self.smoothquant <= 1:
                raise InvalidSpecError(f"SmoothQuant migration strength {self.smoothquant} must be in [0, 1]")
            if not self.calibration.path:
                raise InvalidSpecError(
                    "SmoothQuant's scales come from calibration activations: give calibration.path"
                )

    def _validate_kv_cache(self) -> None:
        if not self.calibration.path:
            raise InvalidSpecError("FP8 KV-cache scales are observed on calibration data: give calibration.path")
        self._one_device_compressed_tensors("the FP8 KV-cache scales (compressed-tensors kv_cache_scheme)")

    def _validate_mixed_precision(self, mixed: MixedPrecisionSpec) -> None:
        mixed.validate()
        if self.scheme.is_float or self.scheme.activations != "none" or self.scheme.bits not in (4, 8):
            raise InvalidSpecError(
                f"mixed precision starts from a 4- or 8-bit integer weight-only scheme, not {self.scheme}"
            )
        if self.method not in (Method.GPTQ, Method.RTN):
            raise InvalidSpecError(f"mixed precision is solved by method gptq or rtn, not {self.method.value}")
        if mixed.by_sensitivity and not self.calibration.path:
            raise InvalidSpecError(
                "mixed precision by sensitivity measures each layer's error on calibration data: give"
                " calibration.path, or use a rule (edge_layers, patterns)"
            )
        self._one_device_compressed_tensors("mixed precision (compressed-tensors mixed-precision)")

    def _validate_fp8(self) -> None:
        if self.method not in (Method.RTN, Method.GPTQ):
            raise InvalidSpecError(
                f"FP8 schemes are quantized by method rtn or gptq (on the E4M3 grid), not {self.method.value}; set"
                " method rtn or gptq"
            )
        if self.formats != (OutputFormat.COMPRESSED_TENSORS,):
            raise InvalidSpecError(
                "FP8 is written only as compressed-tensors (float-quantized); GPTQ v1 has no FP8 layout: set formats"
                " to ['compressed-tensors']"
            )
        if self.scheme.activations == "static":
            if not self.calibration.path:
                raise InvalidSpecError(
                    "static FP8 activation scales are observed on calibration data: give calibration.path, or use"
                    " activations 'dynamic' (scheme fp8-dynamic)"
                )
            if self.devices != 1:
                raise InvalidSpecError("static FP8 runs on one device; set devices 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = self.method.value
        d["formats"] = [f.value for f in self.formats]
        d["auto_candidates"] = list(self.auto_candidates)
        return d
