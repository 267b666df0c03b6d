"""The GPTQ column sweep as one Triton kernel per block of columns, bit-identical to the PyTorch loop.

Why: the reference sweep (`workers.quant.gptq._reference_sweep`) launches ~17 tiny kernels per column,
~39k columns per Llama-3-8B layer: ~8 s of launch latency for ~0.03 s of arithmetic. Here one program owns
`ROWS` rows of a block of up to 128 columns in registers and walks the columns itself; the lazy update of
the columns right of the block stays the same cuBLAS GEMM as in the reference.

Why the result is bit-identical: rows are independent, and per row the kernel performs the reference's
float32 operations in the reference's order, each rounded once:
* division is `div_rn` (IEEE round-to-nearest, as PyTorch's `/` of two tensors), never Triton's approximate
  division; the one division by a Python number (a group's range / qmax) is x·(1/qmax) on CUDA, as PyTorch's
  CUDA kernel computes it, and a true division on the CPU, as PyTorch's CPU kernel does;
* contraction of a·b - c into one FMA is switched off (`enable_fp_fusion=False`): the reference rounds the
  outer product `err ⊗ hinv_row` (a K=1 matmul) and then the subtraction;
* round-half-to-even is (x + 1.5·2²³) - 1.5·2²³, exact for |x| < 2²²; larger |x| are clamped to the grid
  either way;
* taking column i out of the register tile is a masked sum of one value and zeros (exact);
* group scales are rounded to the checkpoint dtype with round-to-nearest-even, as `Tensor.to` does (bf16 on
  the bits, since Triton's interpreter truncates a float32 → bf16 cast).
`tests/workers/test_gptq_fast.py` checks the codes, scales and losses against the reference on the CPU
through Triton's interpreter; `benchmarks/gpu_checks.py` does the same on the GPU (H100, 2026-11-23: identical
on all four Llama-3-8B module shapes, 13–58× faster per module; 12.4 → 1.6 s per layer; benchmarks/gpu.md).

Scope: act_order=False (the sweep order is the column order), any bits / group size / symmetry the
reference supports. Everything else takes the reference path (`gptq_solve` decides).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from workers.errors import InputError
from workers.spec import QuantScheme

ROWS_PER_PROGRAM = 16  # rows of one program: 16 × 128 float32 = 16 registers per thread at 4 warps
_SCALE_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _sweep_block(  # type: ignore[no-untyped-def]
    W, stride_w, HINV, stride_h, Q, stride_q, ERR, stride_e, SCALE, ZERO, stride_s, LOSS, rows, col0, tiny, inv_range, levels,
    NCOLS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SCALE_ROUND: tl.constexpr, RECIPROCAL: tl.constexpr,
    PER_COLUMN: tl.constexpr,
):
    """Quantize columns [col0, col0 + NCOLS) of `ROWS` rows of W, updating the rest of the block in registers.

    GROUP > 0: a new group starts every GROUP columns (col0 is a multiple of GROUP); its scale (and zero
    point) come from the error-updated block and are written to SCALE/ZERO[:, group]. GROUP == 0: one
    static per-row scale in SCALE/ZERO[:, 0] (group_size -1). PER_COLUMN (act_order, static groups): SCALE/
    ZERO are `[rows, n]`, each column's fixed group parameters in sweep order. Writes Q[:, col0 + i],
    ERR[:, i] and LOSS.
    """
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    rmask = r < rows
    cmask = c < NCOLS
    w = tl.load(W + r[:, None] * stride_w + (col0 + c)[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    loss = tl.load(LOSS + r, mask=rmask, other=0.0)
    scale = tl.load(SCALE + r * stride_s, mask=rmask, other=1.0)
    zero = tl.zeros([ROWS], dtype=tl.float32)
    if not SYMMETRIC:
        zero = tl.load(ZERO + r * stride_s, mask=rmask, other=0).to(tl.float32)

    for i in range(0, NCOLS):
        if GROUP > 0:  # noqa: SIM102 - compile-time test outside, run-time test inside
            if i % GROUP == 0:
                in_group = (c >= i) & (c < i + GROUP)
                hi = tl.maximum(tl.max(tl.where(in_group[None, :], w, float("-inf")), axis=1), 0.0)
                lo = tl.minimum(tl.min(tl.where(in_group[None, :], w, float("inf")), axis=1), 0.0)
                top = tl.maximum(-lo, hi) if SYMMETRIC else hi - lo
                if RECIPROCAL:  # PyTorch on CUDA divides by a Python number as x * (1/n)
                    raw = top * inv_range
                else:
                    raw = tl.math.div_rn(top, tl.full([ROWS], levels, tl.float32))
                # to the storage dtype and back, toward zero where nearest went up (as `grid._round_scale`)
                if SCALE_ROUND == 1:  # bf16: half-to-even on the bits (as torch does)
                    bits = raw.to(tl.uint32, bitcast=True)
                    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                    bits = tl.where(bits.to(tl.float32, bitcast=True) > raw, bits - 0x10000, bits)
                    raw = bits.to(tl.float32, bitcast=True)
                elif SCALE_ROUND == 2:
                    half = raw.to(tl.float16)
                    lower = (half.to(tl.int16, bitcast=True) - 1).to(tl.float16, bitcast=True).to(tl.float32)
                    raw = tl.where(half.to(tl.float32) > raw, lower, half.to(tl.float32))
                scale = tl.where(raw == 0.0, tiny, raw)
                g = (col0 + i) // GROUP
                tl.store(SCALE + r * stride_s + g, scale, mask=rmask)
                if not SYMMETRIC:
                    zq = (QMIN - tl.math.div_rn(lo, scale) + 12582912.0) - 12582912.0
                    zero = tl.minimum(tl.maximum(zq, QMIN), QMAX)
                    tl.store(ZERO + r * stride_s + g, zero.to(tl.int8), mask=rmask)
        if PER_COLUMN:
            scale = tl.load(SCALE + r * stride_s + col0 + i, mask=rmask, other=1.0)
            if not SYMMETRIC:
                zero = tl.load(ZERO + r * stride_s + col0 + i, mask=rmask, other=0).to(tl.float32)
        column = tl.sum(tl.where((c == i)[None, :], w, 0.0), axis=1)
        x = tl.math.div_rn(column, scale)
        if not SYMMETRIC:
            x = x + zero
        q = tl.minimum(tl.maximum((x + 12582912.0) - 12582912.0, QMIN), QMAX)
        dq = (q - zero) * scale
        d = tl.load(HINV + (col0 + i) * stride_h + col0 + i)
        err = tl.math.div_rn(column - dq, tl.full([ROWS], 0.0, tl.float32) + d)
        loss = loss + (err * err) * 0.5
        tl.store(Q + r * stride_q + col0 + i, q.to(tl.int8), mask=rmask)
        tl.store(ERR + r * stride_e + i, err, mask=rmask)
        h_row = tl.load(HINV + (col0 + i) * stride_h + col0 + c, mask=cmask & (c >= i), other=0.0)
        w = tl.where((c >= i)[None, :], w - err[:, None] * h_row[None, :], w)

    tl.store(LOSS + r, loss, mask=rmask)


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The compiled kernel for CUDA tensors, or Triton's interpreter for CPU tensors (tests)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_sweep_block)
    return triton.jit(_sweep_block)


def triton_sweep(
    w: Tensor,
    hinv: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    scheme: QuantScheme,
    *,
    block_size: int,
    scale_dtype: torch.dtype,
    rows_per_program: int = ROWS_PER_PROGRAM,
    column_groups: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as `gptq._reference_sweep`, but updates `w` (float32 `[out, in]`, in sweep order) in place; fills
    `scale`/`zero` in place and returns (int8 codes `[out, in]` in sweep order, per-row losses). With
    `column_groups` (act_order: the original group of each column in sweep order) the group parameters are
    the static ones given in `scale`/`zero` and stay unchanged. CUDA tensors run the compiled kernel; CPU
    tensors run Triton's interpreter (slow; for tests)."""
    out, n = w.shape
    if w.dtype != torch.float32 or hinv.dtype != torch.float32:
        raise ValueError(f"the sweep works in float32, got weight {w.dtype} and inverse {hinv.dtype}")
    if scale_dtype not in _SCALE_ROUNDING:
        raise ValueError(f"scales can be rounded to {list(_SCALE_ROUNDING)}, not {scale_dtype}")
    group = 0 if scheme.group_size == -1 or column_groups is not None else scheme.group_size
    if group and block_size % group:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {group}")
    w, hinv = w.contiguous(), hinv.contiguous()
    scale_f = scale.to(torch.float32).contiguous()
    zero_i8 = zero.contiguous() if zero is not None else torch.zeros(1, dtype=torch.int8, device=w.device)
    if column_groups is not None:  # static parameters, expanded to one per column in sweep order
        cols = column_groups.to(w.device)
        scale_f = scale_f[:, cols].contiguous()
        zero_i8 = zero_i8[:, cols].contiguous() if zero is not None else zero_i8
    q = torch.empty(out, n, dtype=torch.int8, device=w.device)
    losses = torch.zeros(out, dtype=torch.float32, device=w.device)
    err = torch.empty(out, block_size, dtype=torch.float32, device=w.device)
    qmin, qmax = -(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1
    kernel = _kernel(interpret=not w.is_cuda)
    block = triton.next_power_of_2(block_size)
    grid = (triton.cdiv(out, rows_per_program),)
    tiny = torch.finfo(scale_dtype).smallest_normal
    # `grid.compute_qparams` divides the range by the Python number (qmax - qmin) / 2 (or qmax - qmin). PyTorch's CUDA kernel
    # turns division by a CPU scalar into multiplication by its float32 reciprocal, its CPU kernel divides:
    # the kernel mirrors whichever the reference runs on, so the scales agree to the last bit on both.
    levels = (qmax - qmin) / 2 if scheme.symmetric else float(qmax - qmin)
    inv_range = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(levels), dtype=torch.float32))
    for b1 in range(0, n, block_size):
        b2 = min(b1 + block_size, n)
        # a fresh contiguous buffer for a short last block: the GEMM below sees the reference's shapes
        err_block = err if b2 - b1 == block_size else torch.empty(out, b2 - b1, dtype=torch.float32, device=w.device)
        kernel[grid](
            w, w.stride(0), hinv, hinv.stride(0), q, q.stride(0), err_block, err_block.stride(0),
            scale_f, zero_i8, scale_f.stride(0), losses, out, b1, tiny, inv_range, levels,
            NCOLS=b2 - b1, BLOCK=block, ROWS=rows_per_program, GROUP=group, SYMMETRIC=scheme.symmetric,
            QMIN=qmin, QMAX=qmax, SCALE_ROUND=_SCALE_ROUNDING[scale_dtype], RECIPROCAL=w.is_cuda,
            PER_COLUMN=column_groups is not None, num_warps=4, enable_fp_fusion=False,
        )
        if b2 < n:
            w[:, b2:] -= err_block @ hinv[b1:b2, b2:]
    _check_scales(scale_f, scale_dtype)
    if column_groups is not None:
        return q, losses
    if scale_f is not scale:
        scale.copy_(scale_f)
    if zero is not None and zero_i8 is not zero:
        zero.copy_(zero_i8)
    return q, losses


def _check_scales(scale: Tensor, scale_dtype: torch.dtype) -> None:
    """The reference raises these in `grid._round_scale` at the offending group; here once, after the sweep."""
    if bool(torch.isfinite(scale).all()):
        return
    if scale_dtype != torch.float32:
        raise InputError(
            f"a quantization scale exceeds the largest {scale_dtype} value {torch.finfo(scale_dtype).max:g}; "
            "the weight is too large"
        )
    raise InputError("the weight has non-finite values (inf or NaN); quantization needs finite weights")
