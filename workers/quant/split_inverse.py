"""GPTQ's inverse-Hessian factor computed by several devices: one Cholesky, then the triangular inverse's
column chunks shared out.

The factor is U = P·L⁻¹·P with L the Cholesky factor of the reversed damped Hessian
(workers/quant/inverse_hessian.py, where one device computes it). Only the Cholesky is serial (n³/3): the
device that owns the Hessian factors it and publishes L (`SharedInverse.publish`); every device, once done with
its own groups, copies L and solves the next unsolved chunk of columns of L⁻¹ (`SharedInverse.work`); each
device that sweeps rows assembles U from the chunks (`SharedInverse.upper`). Critical path: one Cholesky +
1/N of the triangular inverse. The chunks are the ones one device solves, so U has the same bits as one
device's (for Llama-3-8B's down_proj, n = 14,336, the factorisation was the serial part of a layer on 2 GPUs:
benchmarks/gpu.md, run 11). `column_ranges` cuts even-work ranges for the benchmarks' static split.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from workers.quant.inverse_hessian import (
    SOLVE_MIN_CHUNK,
    FlippedCholesky,
    column_chunks,
    flipped_upper,
    inverse_columns,
    solve_chunk,
)


def column_ranges(n: int, shares: Sequence[float]) -> list[tuple[int, int]]:
    """Consecutive column ranges [a, b) of L⁻¹ covering [0, n), one per share, whose triangular-solve work
    (column c costs ∝ (n − c)²) is proportional to `shares`; a zero share gets an empty range."""
    if not shares or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"shares must be non-negative with a positive sum, got {list(shares)}")
    total, cumulative, cuts = sum(shares), 0.0, [0]
    for share in shares[:-1]:
        cumulative += share / total
        # work of columns [0, c) ∝ 1 − (1 − c/n)³  ⇒  c = n·(1 − (1 − s)^(1/3))
        cut = round(n * (1.0 - max(0.0, 1.0 - cumulative) ** (1.0 / 3.0)))
        cuts.append(min(max(cut, cuts[-1]), n))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


class SharedInverse:
    """L⁻¹ of one Cholesky factor, solved in column chunks by whichever device is free (workers/methods/groups.py).

    The device that factors calls `publish` (also on failure: nobody waits forever); every device calls `work`
    once it is done with its own groups: it waits for the factor, copies it, then takes the next unsolved chunk
    until none is left (on a GPU it finishes each chunk before taking another, so a busy device takes none).
    Chunk boundaries are fixed, so U is the same whichever device solves which chunk.
    """

    def __init__(self, min_chunk: int = SOLVE_MIN_CHUNK) -> None:
        self.min_chunk = min_chunk
        self.factor: FlippedCholesky | None = None
        self.blocks: list[tuple[tuple[int, int], Tensor]] = []  # ((a, b), rows a: of columns [a, b) of L⁻¹)
        self._ready, self._lock = threading.Event(), threading.Lock()
        self._chunks: list[tuple[int, int]] = []
        self._copy_streams: dict[torch.device, Any] = {}

    def publish(self, factor: FlippedCholesky | None) -> None:
        """Called on the factoring device's thread once its Cholesky is done (None: it failed with an error)."""
        lower = factor.lower if factor is not None else None
        if lower is not None:
            if lower.is_cuda:
                torch.cuda.synchronize(lower.device)  # others copy it on a side stream: it must be complete
                self._copy_streams = {lower.device: torch.cuda.Stream(lower.device)}
            self._chunks = column_chunks(0, lower.shape[0], lower.shape[0], self.min_chunk)
        self.factor = factor
        self._ready.set()

    def work(self, device: torch.device) -> None:
        """On `device`'s thread: solve chunks until none is left (returns at once when the factor failed)."""
        if device.type == "cuda":  # the thread runs ahead of its GPU: join only once the GPU is free
            torch.cuda.current_stream(device).synchronize()
        self._ready.wait()
        lower = self.factor.lower if self.factor is not None else None
        if lower is None:
            return
        lower = self._copy(lower, device)
        while True:
            with self._lock:
                if not self._chunks:
                    return
                a, b = self._chunks.pop(0)
            block = solve_chunk(lower, a, b)
            if block.is_cuda:
                torch.cuda.current_stream(device).synchronize()  # done before taking another chunk
            with self._lock:
                self.blocks.append(((a, b), block))

    def _copy(self, lower: Tensor, device: torch.device) -> Tensor:
        if lower.device == device:
            return lower
        if not lower.is_cuda:
            return lower.to(device)
        # On a side stream of the factoring GPU (current streams are per thread): the copy is not queued behind
        # the chunks that GPU solves meanwhile; this thread's GPU is idle (see `work`), so nothing waits there.
        stream = self._copy_streams[lower.device]
        with torch.cuda.stream(stream):
            copy = lower.to(device)
        stream.synchronize()
        return copy

    def upper(self, device: torch.device) -> Tensor:
        """U = P·L⁻¹·P on `device` from every chunk (after every device's `work` has returned)."""
        assert self.factor is not None and self.factor.lower is not None
        ranges, blocks = zip(*sorted(self.blocks, key=lambda rb: rb[0]), strict=True)
        return flipped_upper(blocks, ranges, self.factor.lower.shape[0], device)


def split_upper_cholesky_of_inverse(lower: Tensor, parts: int) -> Tensor:
    """U from `lower` with the triangular inverse cut into `parts` even ranges, all on lower's device (the
    arithmetic the devices do, in one place: tests and benchmarks)."""
    n = lower.shape[0]
    ranges = column_ranges(n, [1.0] * parts)
    return flipped_upper([inverse_columns(lower, a, b) for a, b in ranges], ranges, n, lower.device)
