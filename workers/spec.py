"""The job specification the engine runs: what to quantize, how, and how to evaluate it.

Everything here is checked without touching the model (`JobSpec.validate`); checks that need the
model's config live in `workers.validation.check_against_model`.
"""

from __future__ import annotations

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
        if self.strategy is not None or self.activations != "none":
            raise InvalidSpecError(
                "strategy and activations belong to FP8 schemes (type 'float'); integer schemes are weight-only"
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
    def preset(self) -> str | None:
        """The name of this scheme in FP8_PRESETS, if it is one."""
        return next((name for name, scheme in FP8_PRESETS.items() if scheme == self), None)

    @classmethod
    def from_preset(cls, name: str) -> QuantScheme:
        if name not in FP8_PRESETS:
            raise InvalidSpecError(f"scheme {name!r} is not known; choose one of {list(FP8_PRESETS)}")
        return FP8_PRESETS[name]


# The named FP8 schemes (llm-compressor's FP8_DYNAMIC, FP8 and FP8_BLOCK presets).
FP8_PRESETS: dict[str, QuantScheme] = {
    "fp8-dynamic": QuantScheme(8, -1, True, "float", "channel", "dynamic"),
    "fp8-static": QuantScheme(8, -1, True, "float", "tensor", "static"),
    "fp8-block": QuantScheme(8, -1, True, "float", "block", "dynamic"),
}


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
    observer: Observer = "mse"  # group ranges: the activation-weighted range search (range_search.py) or min-max
    auto_candidates: tuple[str, ...] = AUTO_CANDIDATES  # method "auto": "method" or "method:observer" each
    auto_budget_s: float | None = None  # method "auto": start no candidate that would end past this many seconds
    allow_pickle: bool = False
    device: str = "auto"
    devices: int = 1  # accelerators for this one job: calibration split across them (data parallel)

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

    def _validate_fp8(self) -> None:
        if self.method is not Method.RTN:
            raise InvalidSpecError(
                f"FP8 schemes are quantized by method rtn (FP8's fine grid leaves little for {self.method.value} to"
                " gain); set method rtn"
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
