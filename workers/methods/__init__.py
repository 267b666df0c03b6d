"""Quantization methods, one file each (`base.py` has the interface); `method_for(spec)` finds a job's method."""

from __future__ import annotations

import importlib
import pkgutil

from workers.methods.base import REGISTRY, QuantMethod
from workers.methods.kv_cache import KvCacheScales
from workers.spec import JobSpec

_loaded: list[bool] = []


def _load_all() -> None:
    """Import every module of this package once: each registers its methods."""
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded.append(True)


def method_for(spec: JobSpec) -> QuantMethod:
    """The method that solves `spec`'s layers: "smoothquant" / "mixed-precision" when the spec asks for them
    (they run the job's gptq or rtn themselves), else "<method>:<scheme type>" if one is registered, else
    "<method>"; wrapped to record FP8 KV-cache scales when `spec.kv_cache_fp8`."""
    _load_all()
    variants = [v for v, on in (("smoothquant", spec.smoothquant is not None),
                                ("mixed-precision", spec.mixed_precision is not None)) if on]
    for name in (*variants, f"{spec.method.value}:{spec.scheme.type}", spec.method.value):
        if name in REGISTRY:
            method = REGISTRY[name]()
            return KvCacheScales(method) if spec.kv_cache_fp8 else method  # k_scale/v_scale from its forwards
    raise ValueError(f"no quantization method is registered for {spec.method.value!r}; known: {sorted(REGISTRY)}")
