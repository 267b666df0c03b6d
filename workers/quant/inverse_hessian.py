"""GPTQ's inverse-Hessian factor: U, the upper Cholesky factor of H⁻¹ (H damped, in sweep order).

With P the reversal of the column order and L the lower Cholesky factor of P·H·P:

    P·H·P = L·Lᵀ  ⇒  H⁻¹ = (P·L⁻ᵀ·P)(P·L⁻¹·P) = UᵀU  with  U = P·L⁻¹·P  (upper, diagonal 1/L_ii > 0)

so U is the flipped inverse of one Cholesky factor (the upper Cholesky factor of a positive-definite matrix is
unique: this is the factor of `cholesky(cholesky_inverse(cholesky(H)), upper=True)`, ≈ 4/3·n³ flops, in
≈ 2/3·n³). Column j of L⁻¹ solves L·x = e_j and is zero above row j, so columns [a, b) need only L[a:, a:]:
the inverse is computed in column chunks (`column_chunks`), each a triangular solve against identity columns
that skips the zero rows above it. One device solves every chunk (`prepare_hessian`); several devices share
the chunks of one factor (workers/quant/split_inverse.py). The chunk boundaries are fixed, so U has the same
bits whichever device solves which chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DAMPENING_RETRIES = 3  # on Cholesky failure try λ·10, λ·100, λ·1000 before falling back to RTN

# Columns per triangular solve: a chunk starting at column c solves against the n − c rows below it, so its
# columns do (n − c)² work each where column j needs (n − j)²; chunks of at most (n − c)/32 columns keep that
# excess under ~3 % and the first chunk under ~10 % of the work (fine enough to share out), at least
# SOLVE_MIN_CHUNK wide (a triangular solve with fewer right-hand sides runs well below the GEMM rate).
SOLVE_MIN_CHUNK = 256
SOLVE_CHUNK_FRACTION = 32


@dataclass
class PreparedHessian:
    """What the sweep needs from one Hessian; shared by every module that reads the same input."""

    hinv: Tensor | None  # upper Cholesky factor of the damped H⁻¹ (in sweep order); None if all retries failed
    perm: Tensor | None  # sweep order of the columns (act_order), None for the natural order
    dead: Tensor  # bool [in]: inputs that were always zero
    importance: Tensor  # diag(H) [in], original order: the range search's weight per input column
    dampening: float  # the dampening that worked (or the last one tried)
    requested_dampening: float

    def note(self) -> str | None:
        """What a module's record says of this factorisation: an RTN fallback, a raised dampening, or nothing."""
        if self.hinv is None:
            return f"Cholesky of the Hessian failed up to dampening {self.dampening:g}; quantized with RTN instead"
        if self.dampening != self.requested_dampening:
            return f"dampening raised to {self.dampening:g} for a positive-definite Hessian"
        return None


@dataclass
class FlippedCholesky:
    """Step one of the factorisation of one Hessian: L with L·Lᵀ = P·(H + λ·mean(diag H)·I)·P."""

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


def prepare_hessian(
    hessian: Tensor, *, dampening: float = 0.01, act_order: bool = False, device: torch.device | None = None
) -> PreparedHessian:
    """Dead inputs, sweep order and the damped inverse factor of `hessian` `[in, in]` (not modified), on one device."""
    factor = flipped_cholesky(hessian, dampening=dampening, act_order=act_order, device=device)
    if factor.lower is None:
        return factor.prepared(None)
    n = factor.lower.shape[0]
    return factor.prepared(inverse_columns(factor.lower, 0, n).flip(0, 1))


def hessian_in_sweep_order(
    hessian: Tensor, *, act_order: bool = False, device: torch.device | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(H in float32 with dead inputs' diagonal set to 1, permuted to the sweep order; the order or None; the
    dead inputs): what the factorisation starts from."""
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be a square [in, in] matrix, got shape {tuple(hessian.shape)}")
    h = hessian.detach().to(device or hessian.device, torch.float32).clone()
    dead = h.diagonal() == 0  # inputs that were always zero: any value works, so make them exact zeros
    h.diagonal()[dead] = 1.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    return (h[perm][:, perm] if perm is not None else h), perm, dead


def flipped_cholesky(
    hessian: Tensor, *, dampening: float = 0.01, act_order: bool = False, device: torch.device | None = None
) -> FlippedCholesky:
    """Dead inputs, sweep order, and the lower Cholesky factor of the reversed damped Hessian, λ·mean(diag H)
    on the diagonal; λ is raised ×10 on failure (DAMPENING_RETRIES times)."""
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


def flipped_upper(blocks: Sequence[Tensor], ranges: Sequence[tuple[int, int]], n: int, device: torch.device) -> Tensor:
    """U = P·L⁻¹·P on `device` from the column blocks of L⁻¹ (`inverse_columns` of each range)."""
    upper = torch.zeros(n, n, dtype=torch.float32, device=device)
    for (a, b), block in zip(ranges, blocks, strict=True):
        if b > a:  # L⁻¹[a:, a:b] lands, reversed on both axes, at U[:n − a, n − b:n − a]
            upper[: n - a, n - b : n - a] = block.to(device).flip(0, 1)
    return upper
