"""The stored job spec (the validated API request, with URIs) and its conversion to the engine's JobSpec.

The API calls `engine_spec` at submit time (to reject bad jobs with the engine's own messages) and the
worker calls it again before running, with a resolver that downloads S3 inputs into a local cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from workers.errors import InvalidSpecError
from workers.spec import (
    AUTO_CANDIDATES,
    SMOOTHQUANT_PRESETS,
    CalibrationSpec,
    EvalSpec,
    JobSpec,
    Method,
    MixedPrecisionSpec,
    OutputFormat,
    QuantScheme,
)

# (uri, kind "dir" | "file", what) -> local path
Resolver = Callable[[str, str, str], str]


def request_hash(spec: dict[str, Any]) -> str:
    """Hash of the canonical JSON of a normalised request: equal bodies hash equal, whatever the key order."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_spec(spec: dict[str, Any], resolve: Resolver) -> JobSpec:
    """JobSpec for a stored spec, with every URI turned into a local path by `resolve`; validated."""
    try:
        method = Method(spec["method"])
        formats = tuple(
            OutputFormat(f) for f in (spec.get("output") or {}).get("formats") or ["compressed-tensors"]
        )
    except ValueError as e:
        raise InvalidSpecError(str(e)) from e
    cal = spec.get("calibration") or {}
    ev = spec.get("eval")
    job = JobSpec(
        model_dir=resolve(spec["model"], "dir", "model"),
        method=method,
        scheme=QuantScheme.from_preset(spec["scheme"])
        if spec.get("scheme")
        else QuantScheme(bits=spec["bits"], group_size=spec["group_size"], symmetric=spec["symmetric"]),
        calibration=CalibrationSpec(
            path=resolve(cal["uri"], "file", "calibration") if cal.get("uri") else None,
            num_samples=cal.get("num_samples", 128),
            seq_len=cal.get("seq_len", 512),
            seed=cal.get("seed", 0),
        ),
        eval=EvalSpec(
            path=resolve(ev["uri"], "file", "eval"),
            seq_len=ev.get("seq_len", 512),
            max_windows=ev.get("max_windows"),
        )
        if ev
        else None,
        formats=formats,
        dampening=spec.get("dampening", 0.01),
        act_order=spec.get("act_order", False),  # specs stored before act-order became the default asked for none
        observer=spec.get("observer", "minmax"),  # specs stored before the field existed used min-max
        auto_candidates=tuple(spec.get("auto_candidates") or AUTO_CANDIDATES),
        auto_budget_s=spec.get("auto_budget_s"),
        devices=spec.get("gpus", 1),  # specs stored before the field existed asked for one
        smoothquant=_smoothquant(spec),
        kv_cache_fp8=bool(spec.get("kv_cache_fp8")),
        mixed_precision=_mixed_precision(spec.get("mixed_precision"), spec),
    )
    job.validate()
    return job


def _smoothquant(spec: dict[str, Any]) -> float | None:
    """SmoothQuant's α: the one asked for, else the preset's default (scheme w8a8-int8-smoothquant), else none."""
    alpha = spec.get("smoothquant_alpha")
    return float(alpha) if alpha is not None else SMOOTHQUANT_PRESETS.get(spec.get("scheme") or "")


def _mixed_precision(mixed: dict[str, Any] | None, spec: dict[str, Any]) -> MixedPrecisionSpec | None:
    if not mixed:
        return None
    high = None
    if mixed.get("edge_layers") or mixed.get("patterns"):
        group = mixed.get("high_group_size")
        high = QuantScheme(int(mixed.get("high_bits", 8)), spec["group_size"] if group is None else int(group), spec["symmetric"])
    return MixedPrecisionSpec(
        edge_layers=int(mixed.get("edge_layers", 0)), patterns=tuple(mixed.get("patterns") or ()), high=high,
        target_bits_per_weight=mixed.get("target_bits_per_weight"), target_kl=mixed.get("target_kl"),
    )
