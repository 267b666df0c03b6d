"""Quantization methods, one file each (`base.py` has the interface); `method_for(spec)` finds a job's method."""

from __future__ import annotations

import importlib
import pkgutil

from workers.methods.base import REGISTRY, QuantMethod
from workers.spec import JobSpec

_loaded: list[bool] = []


def _load_all() -> None:
    """Import every module of this package once: each registers its methods."""
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded.append(True)


def method_for(spec: JobSpec) -> QuantMethod:
    """The method that solves `spec`'s layers: "<method>:<scheme type>" if one is registered, else "<method>"."""
    _load_all()
    for name in (f"{spec.method.value}:{spec.scheme.type}", spec.method.value):
        if name in REGISTRY:
            return REGISTRY[name]()
    raise ValueError(f"no quantization method is registered for {spec.method.value!r}; known: {sorted(REGISTRY)}")
