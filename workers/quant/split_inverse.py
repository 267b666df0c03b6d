"""GPTQ's inverse-Hessian factor computed by several devices: one Cholesky, then a triangular inverse split by
columns.

GPTQ sweeps with U, the upper Cholesky factor of H⁻¹ (H damped, in sweep order). One device computes it as
`cholesky(cholesky_inverse(cholesky(H)), upper=True)` (workers/quant/gptq.py): three dependent steps of
≈ n³/3 flops each plus the product inside `cholesky_inverse`, ≈ 4/3·n³ on one device. For Llama-3-8B's
down_proj (n = 14,336) that was the serial part of a layer on 2 GPUs (benchmarks/gpu.md, run 11: 299 ms of a
786 ms layer, one GPU idle for ~160 ms of it).

Here, with P the reversal of the column order and L the lower Cholesky factor of P·H·P:

    P·H·P = L·Lᵀ  ⇒  H⁻¹ = (P·L⁻ᵀ·P)(P·L⁻¹·P) = UᵀU  with  U = P·L⁻¹·P  (upper, diagonal 1/L_ii > 0)

so U is the flipped inverse of one Cholesky factor: the same matrix as the one-device path's (the upper
Cholesky factor of a positive-definite matrix is unique), reached by another rounding path. Column j of L⁻¹
solves L·x = e_j and is zero above row j, so columns [a, b) need only L[a:, a:]: each device solves its own
range of columns (`inverse_columns`, a triangular solve against identity columns), with ranges cut so that the
work Σ (n−c)² is even (`column_ranges`). Critical path: one Cholesky (n³/3) + 1/N of the triangular inverse,
instead of 4/3·n³. `flipped_upper` assembles U from the ranges on each device that sweeps rows.

Different rounding from the one-device factor means a code on a rounding boundary may flip: several devices
give the one-device codes within a tolerance, not bit for bit (tests/workers/test_split_inverse.py,
tests/workers/test_data_parallel.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workers.quant.gptq import DAMPENING_RETRIES, PreparedHessian, hessian_in_sweep_order

# Columns per triangular solve: a chunk starting at column c solves against the n − c rows below it, so its
# columns do (n − c)² work each where column j needs (n − j)²; chunks of at most (n − c)/32 columns keep that
# excess under ~3 % and the first chunk under ~10 % of the work (fine enough to share out), at least
# SOLVE_MIN_CHUNK wide (a triangular solve with fewer right-hand sides runs well below the GEMM rate).
SOLVE_MIN_CHUNK = 256
SOLVE_CHUNK_FRACTION = 32


@dataclass
class FlippedCholesky:
    """Step one of the split factorisation of one Hessian: L with L·Lᵀ = P·(H + λ·mean(diag H)·I)·P."""

    lower: Tensor | None  # None when every dampening failed (the sweep then falls back to RTN)
    perm: Tensor | None  # the sweep order (act_order) or None
    dead: Tensor  # bool [in]: inputs that were always zero
    importance: Tensor  # diag(H) [in], original order
    dampening: float  # the dampening that worked (or the last one tried)
    requested_dampening: float

    def prepared(self, hinv: Tensor | None) -> PreparedHessian:
        """The PreparedHessian of this factorisation with `hinv` (U on some device), for `gptq_solve`."""
        device = hinv.device if hinv is not None else self.dead.device
        perm = self.perm.to(device) if self.perm is not None else None
        return PreparedHessian(hinv, perm, self.dead.to(device), self.importance.to(device), self.dampening,
                               self.requested_dampening)


def flipped_cholesky(
    hessian: Tensor, *, dampening: float = 0.01, act_order: bool = False, device: torch.device | None = None
) -> FlippedCholesky:
    """Dead inputs, sweep order, and the lower Cholesky factor of the reversed damped Hessian; the dampening is
    raised ×10 on failure as in `prepare_hessian` (same λ·mean(diag H) on the diagonal)."""
    h, perm, dead = hessian_in_sweep_order(hessian, act_order=act_order, device=device)
    importance = hessian.diagonal().to(h.device, torch.float32)
    flipped = h.flip(0, 1)
    del h
    mean_diag = flipped.diagonal().mean()
    damp = dampening
    for _ in range(DAMPENING_RETRIES + 1):
        damped = flipped.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            return FlippedCholesky(lower, perm, dead, importance, damp, dampening)
        damp *= 10
    return FlippedCholesky(None, perm, dead, importance, damp / 10, dampening)


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


def column_chunks(a: int, b: int, n: int, min_chunk: int = SOLVE_MIN_CHUNK) -> list[tuple[int, int]]:
    """Columns [a, b) of an n-column L⁻¹ in consecutive chunks (see SOLVE_CHUNK_FRACTION)."""
    chunks, c = [], a
    while c < b:
        d = min(c + max(min_chunk, (n - c) // SOLVE_CHUNK_FRACTION), b)
        chunks.append((c, d))
        c = d
    return chunks


def inverse_columns(lower: Tensor, a: int, b: int, min_chunk: int = SOLVE_MIN_CHUNK) -> Tensor:
    """Rows a: of columns [a, b) of L⁻¹ (its rows above a are zero), `[n − a, b − a]`, by triangular solves
    against identity columns, a chunk of columns at a time (each chunk skips the zero rows above it)."""
    n = lower.shape[0]
    chunks = column_chunks(a, b, n, min_chunk)
    if len(chunks) == 1:
        return solve_chunk(lower, a, b)
    out = torch.zeros(n - a, b - a, dtype=lower.dtype, device=lower.device)
    for c, d in chunks:
        out[c - a:, c - a:d - a] = solve_chunk(lower, c, d)
    return out


def solve_chunk(lower: Tensor, a: int, b: int) -> Tensor:
    """Rows a: of columns [a, b) of L⁻¹: one triangular solve L[a:, a:]·X = I[a:, a:b]."""
    eye = torch.zeros(lower.shape[0] - a, b - a, dtype=lower.dtype, device=lower.device)
    eye.diagonal().fill_(1.0)
    return torch.linalg.solve_triangular(lower[a:, a:], eye, upper=False)


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


def flipped_upper(blocks: Sequence[Tensor], ranges: Sequence[tuple[int, int]], n: int, device: torch.device) -> Tensor:
    """U = P·L⁻¹·P on `device` from the column blocks of L⁻¹ (`inverse_columns` of each range)."""
    upper = torch.zeros(n, n, dtype=torch.float32, device=device)
    for (a, b), block in zip(ranges, blocks, strict=True):
        if b > a:  # L⁻¹[a:, a:b] lands, reversed on both axes, at U[:n − a, n − b:n − a]
            upper[: n - a, n - b : n - a] = block.to(device).flip(0, 1)
    return upper


def split_upper_cholesky_of_inverse(lower: Tensor, parts: int) -> Tensor:
    """U from `lower` with the triangular inverse cut into `parts` even ranges, all on lower's device (the
    arithmetic the devices do, in one place: tests and benchmarks)."""
    n = lower.shape[0]
    ranges = column_ranges(n, [1.0] * parts)
    return flipped_upper([inverse_columns(lower, a, b) for a, b in ranges], ranges, n, lower.device)
