"""GPU checks of the fast GPTQ paths against the reference, with timings (one device call, ~1 minute).

1. Sweep: `gptq_quantize(kernel="triton")` vs `kernel="reference"` on the Llama-3-8B module shapes, from one
   Hessian of correlated bf16 activations: codes, scales and loss must be bit-identical; both are timed.
2. Hessian numerics: "fp32" (scale first, float32 GEMM, TF32 off) vs "half-operands" (bf16 operands,
   float32 accumulation) over 262,144 tokens: time, ‖ΔH‖/‖H‖ against a float64 reference, how many GPTQ
   codes change, and the held-out layer-output error of either result against the run-to-run noise of
   drawing another calibration sample.
3. Rows per Triton program: sweep time of the gate/up shape for a few values.

    python benchmarks/gpu_checks.py --results /tmp/checks.json
Prints one table per check; the JSON holds every number.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.quant import gptq_triton  # noqa: E402
from workers.quant.gptq import GPTQResult, HessianAccumulator, gptq_quantize  # noqa: E402
from workers.spec import QuantScheme  # noqa: E402

SCHEME = QuantScheme(bits=4, group_size=128, symmetric=True)
MODULES = {  # name: (out, in) of a Llama-3-8B layer
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "gate_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of `fn` after one warm-up, with the GPU drained around each call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def correlated_activations(tokens: int, d: int, seed: int, sample: int = 0, chunk: int = 8192) -> list[torch.Tensor]:
    """bf16 rows X = (Z·A)·diag(c) + 0.1·Z in chunks (as the pipeline hands them over): correlated features with
    uneven magnitudes, like real hidden states, so GPTQ's error feedback matters and rounding ties are not rare.
    `seed` fixes the distribution (A, c); `sample` draws another calibration set from the same distribution."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mixing = torch.randn(d, d, device="cuda", generator=gen) / math.sqrt(d)
    scales = torch.rand(d, device="cuda", generator=gen) * 4 + 0.1
    gen.manual_seed(seed * 1000 + sample + 1)
    chunks = []
    for _ in range(tokens // chunk):
        z = torch.randn(chunk, d, device="cuda", generator=gen)
        chunks.append(((z @ mixing) * scales + 0.1 * z).to(torch.bfloat16))
    return chunks


def exact_hessian(chunks: list[torch.Tensor]) -> torch.Tensor:
    """2/n Σ xᵀx in float64 (the truth both float32 accumulators are compared with)."""
    d = chunks[0].shape[1]
    exact = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    for x in chunks:
        xd = x.to(torch.float64)
        exact.addmm_(xd.T, xd)
    return exact.mul_(2.0 / sum(x.shape[0] for x in chunks))


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the layer-output error GPTQ minimises, relative, in float64."""
    delta = (w.double() - q.double())
    return float(((delta @ h) * delta).sum() / ((w.double() @ h) * w.double()).sum())


def hessian_of(chunks: list[torch.Tensor], precision: str) -> HessianAccumulator:
    acc = HessianAccumulator(chunks[0].shape[1], "cuda", precision=precision)  # type: ignore[arg-type]
    for x in chunks:
        acc.add(x)
    return acc


def same(a: GPTQResult, b: GPTQResult) -> dict[str, Any]:
    qa, qb = a.quantized, b.quantized
    return {
        "codes_equal": bool(torch.equal(qa.q, qb.q)),
        "code_mismatch": int((qa.q != qb.q).sum()),
        "scales_equal": bool(torch.equal(qa.scale, qb.scale)),
        "loss_equal": a.loss == b.loss,
    }


def check_sweep(tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hessians: dict[int, torch.Tensor] = {}
    for name, (rows, cols) in MODULES.items():
        if cols not in hessians:
            hessians[cols] = hessian_of(correlated_activations(tokens, cols, seed=cols), "half-operands").hessian
        h = hessians[cols]
        w = (torch.randn(rows, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(rows)) * 0.02).bfloat16()
        ref = gptq_quantize(w, h, SCHEME, scale_dtype=torch.bfloat16, kernel="reference")
        fast = gptq_quantize(w, h, SCHEME, scale_dtype=torch.bfloat16, kernel="triton")
        t_fast = seconds(functools.partial(gptq_quantize, w, h, SCHEME, scale_dtype=torch.bfloat16, kernel="triton"))
        t_ref = seconds(
            functools.partial(gptq_quantize, w, h, SCHEME, scale_dtype=torch.bfloat16, kernel="reference"), repeats=1
        )
        out[name] = {"shape": [rows, cols], **same(ref, fast), "reference_s": t_ref, "triton_s": t_fast}
        print(f"sweep {name:10} {rows:>6}x{cols:<6} identical={out[name]['codes_equal'] and out[name]['scales_equal']}"
              f" mismatch={out[name]['code_mismatch']} loss_equal={out[name]['loss_equal']}"
              f" reference {t_ref:7.3f} s  triton {t_fast:7.4f} s  ({t_ref / t_fast:5.1f}x)", flush=True)
    return out


def check_hessian(tokens: int) -> dict[str, Any]:
    """Speed and accuracy of the two Hessian numerics, and what they do to GPTQ's result.

    Quality proxy (no real model fits in a device call): the relative layer-output error of the quantized
    weight on a *held-out* sample of the same activation distribution. The effect of the numerics is the
    change when the calibration Hessian is accumulated one way or the other; the noise it must be compared
    with is the change when the calibration sample itself is replaced by another one.
    """
    out: dict[str, Any] = {}
    for d in (4096, 14336):
        seed = d + 1
        chunks = correlated_activations(tokens, d, seed)
        times = {p: seconds(functools.partial(hessian_of, chunks, p), repeats=2) for p in ("fp32", "half-operands")}
        h32, hh = hessian_of(chunks, "fp32").hessian, hessian_of(chunks, "half-operands").hessian
        exact = exact_hessian(chunks)
        norm = float(exact.norm())
        r: dict[str, Any] = {
            "fp32_s": times["fp32"], "half_operands_s": times["half-operands"],
            "rel_err_fp32": float((h32.double() - exact).norm()) / norm,
            "rel_err_half_operands": float((hh.double() - exact).norm()) / norm,
        }
        del chunks, exact
        other = hessian_of(correlated_activations(tokens, d, seed, sample=1), "fp32").hessian
        held_out = exact_hessian(correlated_activations(tokens, d, seed, sample=2))
        rows = 4096 if d == 14336 else 14336
        w = (torch.randn(rows, d, device="cuda", generator=torch.Generator("cuda").manual_seed(7)) * 0.02).bfloat16()
        qs = {
            name: gptq_quantize(w, h, SCHEME, scale_dtype=torch.bfloat16).quantized
            for name, h in (("fp32", h32), ("half", hh), ("fp32_other_sample", other))
        }
        dense = {name: q.dequantize(torch.bfloat16).float() for name, q in qs.items()}
        errors = {name: output_error(w.float(), dq, held_out) for name, dq in dense.items()}
        r.update({
            "weight_shape": [rows, d],
            "code_mismatch_half_vs_fp32": float((qs["half"].q != qs["fp32"].q).float().mean()),
            "code_mismatch_other_sample_vs_fp32": float((qs["fp32_other_sample"].q != qs["fp32"].q).float().mean()),
            "heldout_rel_output_error": errors,
            "effect_half_vs_fp32": errors["half"] - errors["fp32"],
            "noise_other_sample_vs_fp32": errors["fp32_other_sample"] - errors["fp32"],
        })
        out[str(d)] = r
        print(f"hessian d={d:<6} fp32 {r['fp32_s']:.3f} s  half-operands {r['half_operands_s']:.3f} s  "
              f"|dH|/|H| vs fp64: fp32 {r['rel_err_fp32']:.2e} half {r['rel_err_half_operands']:.2e}", flush=True)
        print(f"   GPTQ {rows}x{d}: codes changed half-vs-fp32 {r['code_mismatch_half_vs_fp32']:.2e}, "
              f"other-calibration-sample-vs-fp32 {r['code_mismatch_other_sample_vs_fp32']:.2e}; held-out output error "
              + ", ".join(f"{k} {v:.6e}" for k, v in errors.items()), flush=True)
        del other, held_out
        torch.cuda.empty_cache()
    return out


def check_rows_per_program(tokens: int) -> dict[str, float]:
    rows, cols = MODULES["gate_proj"]
    h = hessian_of(correlated_activations(tokens // 4, cols, seed=3), "half-operands").hessian
    w = (torch.randn(rows, cols, device="cuda") * 0.02).float()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(cols, device="cuda"))), upper=True)
    out = {}
    for rpp in (8, 16, 32, 64):
        def run(rpp: int = rpp) -> None:
            scale = torch.empty(rows, cols // 128, device="cuda")
            gptq_triton.triton_sweep(w.clone(), hinv, scale, None, SCHEME, block_size=128, scale_dtype=torch.bfloat16,
                                     rows_per_program=rpp)
        out[str(rpp)] = seconds(run)
    print("rows per program (gate_proj sweep, s): " + ", ".join(f"{k}: {v:.4f}" for k, v in out.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128 * 2048)
    p.add_argument("--results", default=None)
    p.add_argument("--skip", default="", help="comma list of sweep, hessian, rows")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("these checks need a CUDA GPU")
    skip = set(args.skip.split(","))
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (("sweep", check_sweep), ("hessian", check_hessian), ("rows", check_rows_per_program)):
        if name in skip:
            continue
        try:
            results[name] = fn(args.tokens)
        except Exception as exc:  # keep the other checks' numbers
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"!!! check {name} failed: {exc!r}", flush=True)
        torch.cuda.empty_cache()
        if args.results:
            Path(args.results).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
