"""GPTQ (Frantar et al. 2022): quantize one Linear column by column, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

The sweep follows IST-DASLab's gptq.py (blocks of columns with lazy batch updates, the upper Cholesky factor
of H⁻¹ as the update matrix) but keeps no state: the Hessian is accumulated by `HessianAccumulator`
and `gptq_quantize` is a pure function of (weight, Hessian, scheme).

Two implementations of the column sweep give bit-identical results:
* `reference`: the plain PyTorch loop every grid shares (workers/quant/column_sweep.py; about 17 tiny kernels
  per column; the CPU path and the definition of the result);
* `triton`: `workers.quant.gptq_triton`, one fused kernel per block of columns (CUDA; with or without
  act_order), launch-bound no more.
`kernel="auto"` picks the fused one wherever it runs. Modules that share one input (q/k/v, gate/up) share
one Hessian, hence one inverse: `gptq_quantize_shared` factors it once for all of them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from workers.errors import InputError
from workers.quant.column_sweep import column_sweep
from workers.quant.grid import QuantizedTensor, compute_qparams, quantize_values
from workers.quant.inverse_hessian import PreparedHessian, prepare_hessian
from workers.quant.rtn import check_weight, group_qparams, rtn_quantize
from workers.spec import Observer, QuantScheme

SweepKernel = Literal["auto", "reference", "triton"]
HessianPrecision = Literal["auto", "fp32", "half-operands"]
HALF_DTYPES = (torch.bfloat16, torch.float16)


class HessianAccumulator:
    """Running H = 2/n Σ xᵀx over all rows (tokens) seen, in float32.

    Two numerics (`precision`):
    * "fp32" (IST-DASLab / llm-compressor): rows in float32, the running mean rescaled before each batch
      (H ← H·n/(n+m) + 2/(n+m)·XᵀX) so the magnitude stays that of one sample; the scaled operands are no
      longer bf16, so this needs full float32 GEMMs (51 TFLOP/s on an H100, TF32 off).
    * "half-operands": bf16/fp16 rows go into the GEMM as they are, accumulating S = Σ xᵀx in float32, and
      H = 2/n · S is formed on read. A product of two bf16 (or fp16) numbers is exact in float32, so the
      only difference from "fp32" is the order of the float32 additions; on CUDA this is a tensor-core GEMM
      (~15× faster). Float32 rows (the CPU path) are accumulated with float32 products, also unscaled.
    * "auto": "half-operands" for half-precision rows on CUDA, "fp32" otherwise (chosen from the measured
      Δppl and packed-weight mismatch rate in benchmarks/gpu.md).
    The mode is fixed by the first non-empty batch. With `magnitudes` (the default) the accumulator also keeps
    Σ|x| per input channel (AWQ's activation magnitude `mean_abs`) and max|x| (static FP8's range), so one
    capture serves every method; a method that reads neither (GPTQ, RTN) collects without them.
    """

    def __init__(
        self, in_features: int, device: str | torch.device = "cpu", *, precision: HessianPrecision = "auto",
        magnitudes: bool = True,
    ) -> None:
        if precision not in ("auto", "fp32", "half-operands"):
            raise ValueError(f"precision={precision!r}: choose 'auto', 'fp32' or 'half-operands'")
        self.in_features = in_features
        self.precision = precision
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._mode: Literal["fp32", "half-operands"] | None = None
        self._scaled: Tensor | None = None  # 2/n · S, cached until the next batch (half-operands mode)
        self._abs = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._max = torch.zeros((), dtype=torch.float32, device=device)  # max|x| over all rows (static FP8)
        self.magnitudes = magnitudes
        self.num_samples = 0

    def _resolve(self, rows: Tensor) -> Literal["fp32", "half-operands"]:
        if self.precision != "auto":
            return self.precision
        half_on_cuda = rows.dtype in HALF_DTYPES and self._h.device.type == "cuda"
        return "half-operands" if half_on_cuda else "fp32"

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs `[..., in_features]` (e.g. `[batch, seq, in]`); every row is one sample."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the Hessian expects {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).to(self._h.device)
        if rows.shape[0] == 0:
            return
        self._mode = self._mode or self._resolve(rows)
        if self.magnitudes:
            magnitude = rows.abs()
            self._abs.add_(magnitude.sum(dim=0, dtype=torch.float32))
            self._max = torch.maximum(self._max, magnitude.amax().to(torch.float32))
            del magnitude
        total = self.num_samples + rows.shape[0]
        if self._mode == "fp32":
            rows = rows.to(torch.float32)
            self._h.mul_(self.num_samples / total)
            rows = rows * math.sqrt(2.0 / total)
            self._h.addmm_(rows.T, rows)
        else:
            _add_gram(self._h, rows)
            self._scaled = None
        self.num_samples = total

    def unscaled_sum(self) -> Tensor:
        """S = Σ xᵀx (float32) in "half-operands" mode: partial sums of several devices add up exactly."""
        if self._mode == "fp32":
            raise ValueError("only unscaled (precision='half-operands') accumulators can be merged exactly")
        return self._h

    def abs_sum(self) -> Tensor:
        """Σ|x| per input channel (float32 `[in]`); partial sums of several devices add up."""
        return self._magnitude(self._abs)

    @property
    def abs_max(self) -> Tensor:
        """max|x| over every input seen (0-dim float32): static FP8's activation range."""
        return self._magnitude(self._max)

    @property
    def mean_abs(self) -> Tensor:
        """E|x| per input channel: AWQ's activation magnitude."""
        return self._magnitude(self._abs) / max(self.num_samples, 1)

    def _magnitude(self, value: Tensor) -> Tensor:
        if not self.magnitudes:
            raise ValueError("this accumulator was made with magnitudes=False: it kept no Σ|x| or max|x|")
        return value

    @property
    def second_moment(self) -> Tensor:
        """Σ = E[x xᵀ] = H / 2."""
        return self.hessian / 2

    @property
    def hessian(self) -> Tensor:
        if self._mode != "half-operands":
            return self._h
        if self._scaled is None:
            self._scaled = self._h * (2.0 / max(self.num_samples, 1))
        return self._scaled


def _add_gram(total: Tensor, rows: Tensor) -> None:
    """total += rowsᵀ·rows in float32 without rounding the operands (bf16/fp16 products are exact)."""
    if rows.dtype in HALF_DTYPES and rows.is_cuda:
        total.add_(torch.mm(rows.T, rows, out_dtype=torch.float32))  # type: ignore[call-overload]
    else:  # CPU has no mixed-dtype GEMM; an exact upcast gives the same products
        wide = rows.to(torch.float32)
        total.addmm_(wide.T, wide)


@dataclass
class GPTQResult:
    quantized: QuantizedTensor
    loss: float  # GPTQ's objective Σ (w - q)² / (2·[H⁻¹]ᵢᵢ²) over all columns; NaN after an RTN fallback
    dampening: float  # the relative dampening that made H positive definite (the requested one if no retry)
    fell_back_to_rtn: bool
    note: str | None


Swept = tuple[Tensor, Tensor, Tensor | None, Tensor]  # codes, scales, zero points, per-row losses


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    scheme: QuantScheme,
    *,
    dampening: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
    kernel: SweepKernel = "auto",
    observer: Observer = "minmax",
) -> GPTQResult:
    """Quantize `weight` `[out, in]` given the Hessian `[in, in]` of its inputs (not modified).

    Without act_order the scale/zero of each group are computed at the group's first column from the
    error-updated weights (original GPTQ). With act_order columns are visited by descending diag(H), with
    group parameters fixed beforehand from the original weight groups ("static" actorder), so the result
    keeps the plain layout g_idx = j // group. `observer="mse"` sweeps twice, once with the group parameters
    fixed beforehand by the range search weighted by diag(H) (`range_search.py`) and once with min-max, and
    keeps each row's better sweep (`_better_rows`). The result is always in the original
    column order. A Hessian
    that stays indefinite after raising the dampening gives an RTN result with `fell_back_to_rtn=True`.
    `scale_dtype` as in `rtn_quantize` (default: the weight's dtype). Math is float32 on the weight's device.
    `kernel` picks the sweep implementation (see the module docstring); all give the same integers.
    """
    check_weight(weight, scheme)
    n = weight.shape[1]
    if hessian.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight input size {n}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be positive")
    prepared = prepare_hessian(hessian, dampening=dampening, act_order=act_order, device=weight.device)
    return gptq_solve(weight, prepared, scheme, block_size=block_size, scale_dtype=scale_dtype, kernel=kernel,
                      observer=observer)


def gptq_quantize_shared(
    weights: Sequence[Tensor],
    hessian: Tensor,
    scheme: QuantScheme,
    *,
    dampening: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
    kernel: SweepKernel = "auto",
    observer: Observer = "minmax",
) -> list[GPTQResult]:
    """`gptq_quantize` for several weights that read the same input (q/k/v, gate/up): one inverse for all.

    Each result equals `gptq_quantize(weight, hessian, ...)` exactly; rows of different modules never mix.
    """
    if not weights:
        return []
    n = weights[0].shape[-1]
    for weight in weights:
        check_weight(weight, scheme)
        if weight.shape[1] != n or hessian.shape != (n, n):
            raise ValueError(
                f"Hessian shape {tuple(hessian.shape)} does not match weight input size {weight.shape[1]}"
            )
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be positive")
    prepared = prepare_hessian(hessian, dampening=dampening, act_order=act_order, device=weights[0].device)
    return [
        gptq_solve(w, prepared, scheme, block_size=block_size, scale_dtype=scale_dtype, kernel=kernel, observer=observer)
        for w in weights
    ]


def gptq_solve(
    weight: Tensor,
    prepared: PreparedHessian,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    scale_dtype: torch.dtype | None = None,
    kernel: SweepKernel = "auto",
    observer: Observer = "minmax",
) -> GPTQResult:
    """The sweep of one weight against an already factored Hessian (`prepare_hessian`)."""
    check_weight(weight, scheme)
    n = weight.shape[1]
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(w).all()):
        raise InputError("the weight has non-finite values (inf or NaN); quantization needs finite weights")
    if prepared.dead.shape != (n,):
        raise ValueError(f"the prepared Hessian is for {prepared.dead.shape[0]} inputs, the weight has {n}")
    w[:, prepared.dead.to(w.device)] = 0.0

    if prepared.hinv is None:
        fallback = rtn_quantize(w, scheme, scale_dtype=scale_dtype, observer=observer, importance=prepared.importance)
        return GPTQResult(fallback, math.nan, prepared.dampening, fell_back_to_rtn=True, note=prepared.note())

    if kernel not in ("auto", "reference", "triton"):
        raise ValueError(f"kernel={kernel!r}: choose 'auto', 'reference' or 'triton'")
    if kernel == "triton" and not triton_available():
        raise ValueError("kernel='triton' needs Triton (pip install triton); use kernel='reference' or 'auto'")
    group = n if scheme.group_size == -1 else scheme.group_size
    importance = prepared.importance.to(w.device)
    scale, zero = group_qparams(w, scheme, "minmax", importance, scale_dtype)
    # Min-max groups are fixed beforehand from the original weight with act_order (the sweep then visits a
    # group's columns out of order), else recomputed at each group start from the error-updated weights.
    # The range search's are always fixed beforehand.
    static = prepared.perm is not None
    if observer != "mse":
        q, losses = _sweep(w, prepared, scheme, block_size, scale_dtype, kernel, scale, zero, static)
    else:  # per row, the better of the range search's and min-max's ranges after the sweep (_better_rows)
        found, found_zero = group_qparams(w, scheme, "mse", importance, scale_dtype)
        if static or group == n:  # both candidates in one sweep, stacked by rows (rows never interact)
            both_zero = torch.cat([found_zero, zero]) if found_zero is not None and zero is not None else None
            both_q, both_losses = _sweep(torch.cat([w, w]), prepared, scheme, block_size, scale_dtype, kernel,
                                         torch.cat([found, scale]), both_zero, True)
            rows = w.shape[0]
            first: Swept = (both_q[:rows], found, found_zero, both_losses[:rows])
            second: Swept = (both_q[rows:], scale, zero, both_losses[rows:])
        else:
            # (a sweep updates the columns ahead of it in place: the second starts from the original weights too)
            # a sweep may update the columns ahead of it in place (the Triton kernel does): the second candidate
            # must start from the original weight too
            q, losses = _sweep(w.clone(), prepared, scheme, block_size, scale_dtype, kernel, found, found_zero, True)
            first = (q, found, found_zero, losses)
            q, losses = _sweep(w, prepared, scheme, block_size, scale_dtype, kernel, scale, zero, False)
            second = (q, scale, zero, losses)
        q, scale, zero, losses = _better_rows(first, second)

    result = QuantizedTensor(q, scale, zero, scheme)
    return GPTQResult(result, float(losses.sum()), prepared.dampening, fell_back_to_rtn=False, note=prepared.note())


def _sweep(
    w: Tensor, prepared: PreparedHessian, scheme: QuantScheme, block_size: int, scale_dtype: torch.dtype,
    kernel: SweepKernel, scale: Tensor, zero: Tensor | None, static: bool,
) -> tuple[Tensor, Tensor]:
    """One column sweep of `w` (float32, dead inputs zeroed): (codes, per-row losses). `static`: the group
    parameters `scale`/`zero` stay as given; otherwise they are replaced at each group start (in place)."""
    assert prepared.hinv is not None
    n = w.shape[1]
    hinv = prepared.hinv.to(w.device)
    perm = prepared.perm.to(w.device) if prepared.perm is not None else None
    group = n if scheme.group_size == -1 else scheme.group_size
    block_size = math.ceil(block_size / group) * group if group < n else block_size
    if kernel == "triton" or (kernel == "auto" and _triton_applies(w)):
        from workers.quant.gptq_triton import triton_sweep

        if not static:
            return triton_sweep(w, hinv, scale, zero, scheme, block_size=block_size, scale_dtype=scale_dtype)
        order = perm if perm is not None else torch.arange(n, device=w.device)
        q, losses = triton_sweep(w[:, order], hinv, scale, zero, scheme, block_size=block_size,
                                 scale_dtype=scale_dtype, column_groups=order // group)
        return q[:, torch.argsort(order)], losses
    return _reference_sweep(w, hinv, perm, scale, zero, scheme, block_size, scale_dtype, static)


def _better_rows(first: Swept, second: Swept) -> Swept:
    """Per output row, the sweep with the lower loss (ties: `second`).

    GPTQ solves every row on its own (a row's updates never touch another row), and a row's summed loss
    Σ err²/2 is its Hessian-weighted error ½·(w − ŵ)·H·(w − ŵ)ᵀ (H damped), so picking rows from two sweeps
    is exact: each row gets the lower of its two errors. The range search ranks ranges by the rounding error
    alone; after GPTQ's compensation a shrunk range can lose to min-max (at 8 bits it mostly does), so
    min-max is always the second candidate (benchmarks/quality.md, "GPTQ ranges").
    """
    q1, s1, z1, l1 = first
    q2, s2, z2, l2 = second
    take = (l1 < l2).unsqueeze(1)
    zero = torch.where(take, z1, z2) if z1 is not None and z2 is not None else None
    return torch.where(take, q1, q2), torch.where(take, s1, s2), zero, torch.minimum(l1, l2)


@functools.cache
def triton_available() -> bool:
    """True where Triton is installed (the GPU images have it; the CPU CI need not)."""
    return importlib.util.find_spec("triton") is not None


def _triton_applies(w: Tensor) -> bool:
    return w.is_cuda and triton_available()


def _reference_sweep(
    w: Tensor,
    hinv: Tensor,
    perm: Tensor | None,
    scale: Tensor,
    zero: Tensor | None,
    scheme: QuantScheme,
    block_size: int,
    scale_dtype: torch.dtype,
    static: bool,
) -> tuple[Tensor, Tensor]:
    """The column loop in plain PyTorch (workers/quant/column_sweep.py); with `static` False fills `scale`/`zero`
    in place at each group start, returns (codes, per-row losses)."""
    n = w.shape[1]
    group = n if scheme.group_size == -1 else scheme.group_size

    def round_column(block: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        g = j // group
        if not static and group < n and j % group == 0:
            # (no act-order: j is the sweep position) the whole group lies in this block, up to date
            g_scale, g_zero = compute_qparams(block[:, i : i + group], scheme, scale_dtype=scale_dtype)
            scale[:, g : g + 1] = g_scale
            if zero is not None and g_zero is not None:
                zero[:, g : g + 1] = g_zero
        g_scale = scale[:, g : g + 1]
        g_zero = zero[:, g : g + 1] if zero is not None else None
        q_col = quantize_values(block[:, i : i + 1], g_scale, g_zero, scheme)
        shift = g_zero.to(torch.float32) if g_zero is not None else 0.0
        return q_col[:, 0], (q_col.to(torch.float32) - shift) * g_scale

    return column_sweep(w, hinv, perm, round_column, codes_dtype=torch.int8, block_size=block_size)


def warm_up(device: torch.device, scheme: QuantScheme, dtype: torch.dtype) -> float:
    """Solve a tiny problem on `device` so the first real layer does not pay one-time costs; returns seconds.

    On CUDA the first GPTQ solve of a process compiles the Triton sweep and creates the cuBLAS/cuSOLVER
    handles (~5 s on an H100 before layer 0, benchmarks/gpu.md). Run on a thread while the calibration text
    is tokenized, that cost overlaps with CPU work. Numbers are unaffected: nothing is kept but caches.
    """
    started = time.perf_counter()
    columns = 2 * (scheme.group_size if scheme.group_size > 0 else 128)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = torch.randn(4 * columns, columns, generator=generator, device=device).to(dtype)
    accumulator = HessianAccumulator(columns, device)
    accumulator.add(rows)
    weight = (torch.randn(32, columns, generator=generator, device=device) * 0.02).to(dtype)
    gptq_quantize_shared([weight], accumulator.hessian, scheme, scale_dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started
