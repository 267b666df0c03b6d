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


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight-only quantization grid. group_size -1 means one scale per output channel."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InvalidSpecError(f"bits={self.bits} is not supported; choose one of {list(SUPPORTED_BITS)}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise InvalidSpecError(
                f"group_size={self.group_size} is not supported; choose one of {list(SUPPORTED_GROUP_SIZES)}"
                " (-1 = one scale per output channel)"
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = self.method.value
        d["formats"] = [f.value for f in self.formats]
        d["auto_candidates"] = list(self.auto_candidates)
        return d
