"""Read decoder layer i+1's weights from disk on a background thread while layer i is being solved.

Without this the accelerator waits for every layer's read (~0.25 s of 1.56 s per Llama-3-8B layer on an
H100, benchmarks/gpu.md, P5a). Safetensors maps shards lazily: `WeightSource.tensors` returns almost at
once and the disk is read when the bytes are first touched. So the background thread touches them: it
copies each tensor into pinned host memory (CUDA), or clones it (CPU, no pinning). Torch releases the GIL
during those copies, so the main thread keeps launching work while the disk is read; the pipeline then
only does the host→device copy, asynchronously from pinned memory.

Memory: at most one layer ahead is held (the thread reads layer i+1 only after layer i was handed out),
i.e. one extra layer of host memory, and pinned blocks are reused by torch's caching host allocator.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch
from torch import Tensor

from workers.loading import WeightSource

_CPU = torch.device("cpu")


class _OneLayer:
    """A WeightSource serving one prefix from tensors already in host memory, the rest from `fallback`."""

    def __init__(self, prefix: str, tensors: dict[str, Tensor], fallback: WeightSource) -> None:
        self.prefix, self._tensors, self._fallback = prefix, tensors, fallback

    def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]:
        if prefix != self.prefix:
            return self._fallback.tensors(prefix, device)
        return {name: t.to(device, non_blocking=t.is_pinned()) for name, t in self._tensors.items()}


class LayerPrefetcher:
    """`source(i)` gives layer i's weights (read ahead) and starts reading layer i+1; a context manager.

    With `enabled=False` it hands out `weights` itself: every layer is read when asked for, as before.
    """

    def __init__(
        self, weights: WeightSource, prefixes: Sequence[str], device: torch.device, *, enabled: bool = True
    ) -> None:
        self.weights, self.prefixes, self.enabled = weights, list(prefixes), enabled
        self._pin = device.type == "cuda" and torch.cuda.is_available()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qf-prefetch") if enabled else None
        self._ahead: tuple[int, Future[dict[str, Tensor]]] | None = None
        if enabled and self.prefixes:
            self._read_ahead(0)  # layer 0 is read while the calibration windows are embedded

    def _read(self, prefix: str) -> dict[str, Tensor]:
        """Runs on the background thread: the copy is what actually reads the bytes from disk."""
        tensors = self.weights.tensors(prefix, _CPU)
        return {name: t.pin_memory() if self._pin else t.clone() for name, t in tensors.items()}

    def _read_ahead(self, index: int) -> None:
        assert self._pool is not None
        self._ahead = (index, self._pool.submit(self._read, self.prefixes[index]))

    def source(self, index: int) -> WeightSource:
        """Layer `index`'s weights (waiting for the read if it is still running); starts reading the next."""
        if self._pool is None:
            return self.weights
        if self._ahead is None or self._ahead[0] != index:  # out of order: read this one now
            self._read_ahead(index)
        assert self._ahead is not None
        tensors = self._ahead[1].result()  # re-raises an error of the background read here
        self._ahead = None
        if index + 1 < len(self.prefixes):
            self._read_ahead(index + 1)
        return _OneLayer(self.prefixes[index], tensors, self.weights)

    def close(self) -> None:
        """Drop the read-ahead and stop the thread (waits for a read in progress: at most one layer)."""
        self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LayerPrefetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
