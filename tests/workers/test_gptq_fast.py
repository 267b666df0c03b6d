"""The fast GPTQ paths give the reference's results: the Triton sweep (run by Triton's interpreter on the CPU),
the shared inverse of modules reading one input, and the half-operand Hessian."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.errors import InputError
from workers.quant.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_shared
from workers.spec import QuantScheme

IN, OUT, TOKENS = 192, 16, 1024  # 192 = one block of 128 + a short block of 64: both kernel variants


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


requires_triton = pytest.mark.skipif(not _triton_installed(), reason="needs Triton (pip install triton)")

CASES = {  # id: (bits, group_size, symmetric, scale dtype)
    "w4g64-sym-bf16": (4, 64, True, "bfloat16"),
    "w3g32-asym-fp16": (3, 32, False, "float16"),
    "w2g64-asym-bf16": (2, 64, False, "bfloat16"),
    "w8-channel-sym-fp32": (8, -1, True, "float32"),
    "w4-channel-asym-bf16": (4, -1, False, "bfloat16"),
}


def interpreter_report() -> dict[str, dict[str, bool]]:  # noqa: C901 - one flat list of checks
    """Run in a child process with TRITON_INTERPRET=1 (it must be set before Triton's first import, and the
    test process may already hold a compiled-mode Triton): triton vs reference sweep for every case."""
    hessian, weight = _hessian(), _weight()
    report: dict[str, dict[str, bool]] = {}
    for name, (bits, group_size, symmetric, dtype), act_order in [
        (case + suffix, params, act_order) for case, params in CASES.items()
        for suffix, act_order in (("", False), ("-actorder", True))
    ]:
        scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
        scale_dtype = getattr(torch, dtype)
        ref_result = gptq_quantize(weight, hessian, scheme, scale_dtype=scale_dtype, kernel="reference", act_order=act_order)
        res = gptq_quantize(weight, hessian, scheme, scale_dtype=scale_dtype, kernel="triton", act_order=act_order)
        ref, fast = ref_result.quantized, res.quantized
        zeros_equal = (fast.zero_point is None and ref.zero_point is None) or (
            fast.zero_point is not None and ref.zero_point is not None and torch.equal(fast.zero_point, ref.zero_point)
        )
        plain = gptq_quantize(weight, torch.eye(IN), scheme, scale_dtype=scale_dtype).quantized.q
        report[name] = {
            "codes": torch.equal(fast.q, ref.q), "scales": torch.equal(fast.scale, ref.scale), "zeros": zeros_equal,
            "loss": res.loss == ref_result.loss,
            "differs_from_rtn": bool((fast.q != plain).any()),
        }
    dead = hessian.clone()
    dead[:, [0, 77]] = 0
    dead[[0, 77], :] = 0
    scheme = QuantScheme(bits=4, group_size=64)
    ref, fast = (gptq_quantize(weight, dead, scheme, kernel=k).quantized for k in ("reference", "triton"))
    report["dead-inputs"] = {
        "codes": torch.equal(fast.q, ref.q), "scales": torch.equal(fast.scale, ref.scale),
        "dead_columns_zero": not bool(fast.q[:, [0, 77]].any()),
    }
    # A group scale just past float16's largest value (65506 > 65504): both sweeps must refuse it.
    huge = weight.clone()
    huge[:, 64:] *= 6.226e6
    report["oversized-scale"] = {}
    for kernel in ("reference", "triton"):
        try:
            gptq_quantize(huge, hessian, scheme, scale_dtype=torch.float16, kernel=kernel)  # type: ignore[arg-type]
            report["oversized-scale"][kernel] = False
        except InputError as exc:
            report["oversized-scale"][kernel] = "exceeds the largest torch.float16" in str(exc)
    return report


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, bool]]:
    code = "import json; from tests.workers.test_gptq_fast import interpreter_report; print(json.dumps(interpreter_report()))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _correlated(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN, IN, generator=g) / math.sqrt(IN)
    return torch.randn(tokens, IN, generator=g) @ mixing + 0.1 * torch.randn(tokens, IN, generator=g)


def _hessian() -> torch.Tensor:
    acc = HessianAccumulator(IN)
    acc.add(_correlated(TOKENS, seed=0))
    return acc.hessian


def _weight() -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1)) * 0.02


@pytest.fixture(scope="module")
def hessian() -> torch.Tensor:
    return _hessian()


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return _weight()


@requires_triton
@pytest.mark.parametrize("case", [c + s for c in CASES for s in ("", "-actorder")])
def test_triton_sweep_is_bit_identical_to_the_reference(interpreted, case: str) -> None:
    """Codes, scales, zero points and loss equal the PyTorch loop's (natural order and act_order with static
    groups), and the sweep really moved codes."""
    assert interpreted[case] == {"codes": True, "scales": True, "zeros": True, "loss": True, "differs_from_rtn": True}


@requires_triton
def test_triton_sweep_handles_dead_inputs_and_rejects_oversized_scales(interpreted) -> None:
    assert interpreted["dead-inputs"] == {"codes": True, "scales": True, "dead_columns_zero": True}
    assert interpreted["oversized-scale"] == {"reference": True, "triton": True}


def test_auto_kernel_on_cpu_is_the_reference(weight, hessian) -> None:
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    auto = gptq_quantize(weight, hessian, scheme)
    ref = gptq_quantize(weight, hessian, scheme, kernel="reference")
    assert torch.equal(auto.quantized.q, ref.quantized.q) and auto.loss == ref.loss


def test_bad_kernel_choices_say_what_to_do(weight, hessian) -> None:
    with pytest.raises(ValueError, match="choose 'auto', 'reference' or 'triton'"):
        gptq_quantize(weight, hessian, QuantScheme(group_size=64), kernel="cuda")  # type: ignore[arg-type]


def test_triton_kernel_without_triton_says_how_to_get_it(weight, hessian, monkeypatch) -> None:
    import workers.quant.gptq as gptq_module

    monkeypatch.setattr(gptq_module, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs Triton \(pip install triton\)"):
        gptq_quantize(weight, hessian, QuantScheme(group_size=64), kernel="triton")


@pytest.mark.parametrize("act_order", [False, True])
def test_shared_inverse_gives_each_module_its_own_result(hessian, act_order: bool) -> None:
    """q/k/v (or gate/up) solved against one factored Hessian equal three separate solves, bit for bit."""
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(rows, IN, generator=g) for rows in (24, 8, 8)]
    scheme = QuantScheme(bits=4, group_size=64)
    shared = gptq_quantize_shared(weights, hessian, scheme, act_order=act_order, scale_dtype=torch.bfloat16)
    for w, res in zip(weights, shared, strict=True):
        alone = gptq_quantize(w, hessian, scheme, act_order=act_order, scale_dtype=torch.bfloat16)
        assert torch.equal(res.quantized.q, alone.quantized.q) and torch.equal(res.quantized.scale, alone.quantized.scale)
        assert res.loss == alone.loss
    assert gptq_quantize_shared([], hessian, scheme) == []
    with pytest.raises(ValueError, match="does not match weight input size 128"):
        gptq_quantize_shared([weights[0], weights[1][:, :128]], hessian, scheme)


def test_half_operand_hessian_matches_the_exact_sum() -> None:
    """bf16 rows, float32 accumulation of exact products, scaled once at the end: within float32 rounding of
    the float64 truth, and of the scale-first float32 accumulator."""
    x = _correlated(TOKENS, seed=3).to(torch.bfloat16)
    exact = 2 / TOKENS * x.double().T @ x.double()
    half, fp32 = HessianAccumulator(IN, precision="half-operands"), HessianAccumulator(IN, precision="fp32")
    for chunk in x.split(300):  # uneven chunks, as the pipeline hands them over
        half.add(chunk.reshape(-1, 4, IN) if chunk.shape[0] % 4 == 0 else chunk)
        fp32.add(chunk)
    half.add(torch.empty(0, IN, dtype=torch.bfloat16))
    assert half.num_samples == fp32.num_samples == TOKENS
    norm = float(exact.norm())
    assert float((half.hessian.double() - exact).norm()) / norm < 1e-6
    assert float((fp32.hessian.double() - exact).norm()) / norm < 1e-5
    assert half.hessian is half.hessian  # scaled once, cached until the next batch
    before = half.hessian.clone()
    half.add(x[:10])
    assert not torch.equal(half.hessian, before)


def test_auto_precision_is_the_fp32_reference_off_cuda() -> None:
    x = _correlated(256, seed=4).to(torch.bfloat16)
    auto, fp32 = HessianAccumulator(IN), HessianAccumulator(IN, precision="fp32")
    auto.add(x)
    fp32.add(x)
    assert torch.equal(auto.hessian, fp32.hessian)
    with pytest.raises(ValueError, match="choose 'auto', 'fp32' or 'half-operands'"):
        HessianAccumulator(IN, precision="tf32")  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", [QuantScheme(4, 128, True), QuantScheme(3, -1, True), QuantScheme(8, 32, False)])
def test_warm_up_solves_a_small_problem_for_any_scheme(scheme: QuantScheme) -> None:
    from workers.quant.gptq import warm_up

    assert warm_up(torch.device("cpu"), scheme, torch.bfloat16) > 0


def test_engine_warms_up_only_gptq_on_cuda() -> None:
    from workers.engine import _start_warm_up
    from workers.spec import JobSpec, Method

    cpu = [torch.device("cpu")]
    assert _start_warm_up(JobSpec("m", Method.GPTQ), cpu, torch.float16) is None
    assert _start_warm_up(JobSpec("m", Method.AWQ), [torch.device("cuda")], torch.float16) is None
