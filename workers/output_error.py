"""Per-module error, a report metric: the mean squared error of a Linear's output, quantized vs original, over
its calibration inputs x, computed from the input second moment Σ = E[x xᵀ] as trace(ΔW Σ ΔWᵀ) / out.
No quantized weight depends on it."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

from workers.loading import LayerwiseModel
from workers.quant.grid import QuantizedTensor

_FAST_REPORT: contextvars.ContextVar[bool] = contextvars.ContextVar("fast_error_report", default=True)


@contextlib.contextmanager
def report_precision(fast: bool) -> Iterator[None]:
    """Let (or forbid) `output_error` use half-precision GEMM operands on CUDA inside this block."""
    token = _FAST_REPORT.set(fast)
    try:
        yield
    finally:
        _FAST_REPORT.reset(token)


def _report_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in float32; on CUDA (when allowed) from bf16 operands with float32 accumulation."""
    if a.is_cuda and _FAST_REPORT.get():
        return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
    return a @ b


def output_error(reference: Tensor, quantized: Tensor, second_moment: Tensor) -> tuple[float, float]:
    """(MSE of x·Wᵀ between the two weights, that MSE / mean square of x·referenceᵀ) with E[xxᵀ] given.

    On CUDA (unless `report_precision(False)`) its two [out, in]·[in, in] GEMMs take bf16 operands with
    float32 accumulation: ~15× faster than fp32 on an H100, ~0.1 s less per Llama-3-8B layer. No
    process-wide switch (such as TF32) is touched, so other threads' float32 matmuls (GPTQ's lazy updates)
    are never affected. Rounding the operands to bf16 (round-to-nearest, unbiased) moves both sums by well
    under 1e-2 relative (3e-4 in the test case; tests/workers/test_prefetch.py emulates it on the CPU). CPU
    results are the exact fp32 ones. Both sums are read back in one host sync.
    """
    ref = reference.to(torch.float32)
    delta = quantized.to(torch.float32) - ref
    sigma = second_moment.to(ref.device, torch.float32)
    sums = torch.stack([(_report_mm(delta, sigma) * delta).sum(), (_report_mm(ref, sigma) * ref).sum()])
    mse, power = (float(v) / ref.shape[0] for v in sums.tolist())
    return mse, (mse / power if power > 0 else 0.0)


def row_errors(reference: Tensor, quantized: Tensor, hessian: Tensor) -> Tensor:
    """(ΔW H ΔWᵀ)_rr per row `[out]`: each output's squared error per calibration token (× 2, H = 2 E[x xᵀ]),
    from the Hessian alone (no forward)."""
    delta = quantized.to(torch.float32) - reference.to(torch.float32)
    return ((delta @ hessian.to(delta.device, torch.float32)) * delta).sum(1)


def deployed(qt: QuantizedTensor, model: LayerwiseModel, device: torch.device) -> Tensor:
    """The weight a runtime computes with: dequantized in the model dtype, then in the compute dtype."""
    return qt.dequantize(model.model_dtype).to(device, model.compute_dtype)
