"""Progress reporting: the engine calls `on_progress(Progress(...))`; the CLI draws bars, the service stores events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    stage: str  # "load" | "calibrate" | "quantize" | "write" | "evaluate" | "upload" | "done"
    layer: int | None = None  # 0-based index of the decoder layer being processed
    num_layers: int | None = None
    module: str | None = None  # e.g. "self_attn.q_proj"
    message: str | None = None


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


def no_progress(_: Progress) -> None:
    """Default callback: report nothing."""


def never_cancel() -> bool:
    return False
