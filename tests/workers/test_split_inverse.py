"""GPTQ's inverse factor (workers/quant/inverse_hessian.py) and its chunks shared over devices
(workers/quant/split_inverse.py, workers/methods/groups.py), on CPU "devices": the factor against an independent
float64 one, the same factor bit for bit whichever device solves which chunk, the same codes for 2, 3 and 4
devices."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import Tensor

from tests.workers.test_data_parallel import CPU, OPTIONS, Layer0, code_mismatch
from tests.workers.test_pipeline import run
from workers.activations import ShardedActivations
from workers.methods import method_for
from workers.progress import Progress
from workers.quant.gptq import gptq_solve
from workers.quant.inverse_hessian import (
    column_chunks,
    flipped_cholesky,
    flipped_upper,
    hessian_in_sweep_order,
    inverse_columns,
    prepare_hessian,
)
from workers.quant.split_inverse import SharedInverse, column_ranges, split_upper_cholesky_of_inverse
from workers.spec import JobSpec, QuantScheme


def hessian(n: int, tokens: int = 4 * 96, seed: int = 0, dead: int = 0) -> Tensor:
    """2/N·XᵀX of correlated inputs with uneven channel scales (and `dead` always-zero inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n**0.5)
    x *= torch.logspace(-1, 0.5, n)
    x[:, :dead] = 0
    return 2 * x.T @ x / tokens


def work_of(ranges: list[tuple[int, int]], n: int) -> list[float]:
    return [sum((n - c) ** 2 for c in range(a, b)) for a, b in ranges]


@pytest.mark.parametrize("n", [7, 128, 1000, 14336])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_column_ranges_cover_every_column_with_even_work(n: int, parts: int) -> None:
    ranges = column_ranges(n, [1.0] * parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a <= b and b == c for (a, b), (c, _) in zip(ranges, ranges[1:], strict=False))
    if n >= 1000:  # rounding to whole columns aside, every range does 1/parts of the work
        work = work_of(ranges, n)
        assert max(work) / min(work) < (1.01 if n > 10_000 else 1.05)


def test_column_ranges_follow_uneven_shares_and_skip_zero_shares() -> None:
    ranges = column_ranges(4096, [3.0, 0.0, 1.0])
    assert ranges[1][0] == ranges[1][1]  # an empty range
    work = work_of(ranges, 4096)
    assert work[0] / work[2] == pytest.approx(3.0, rel=0.01)
    with pytest.raises(ValueError):
        column_ranges(10, [0.0, 0.0])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_split_factor_is_the_one_device_factor(act_order: bool, parts: int) -> None:
    h = hessian(384, dead=3)
    one = prepare_hessian(h, act_order=act_order)
    factor = flipped_cholesky(h, act_order=act_order)
    assert factor.lower is not None and one.hinv is not None
    upper = split_upper_cholesky_of_inverse(factor.lower, parts)
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    if parts == 1:
        assert torch.equal(upper, one.hinv)
    torch.testing.assert_close(upper, one.hinv, rtol=1e-4, atol=1e-5 * float(one.hinv.abs().max()))
    # UᵀU is the damped H⁻¹ in sweep order, and U its upper Cholesky factor as float64 LAPACK computes it
    damped, _, _ = _damped(h, act_order, one.dampening)
    torch.testing.assert_close(upper.T @ upper @ damped, torch.eye(384), rtol=0, atol=2e-3)
    reference = torch.linalg.cholesky(torch.linalg.inv(damped.double()), upper=True)
    torch.testing.assert_close(one.hinv.double(), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
    assert factor.dampening == one.dampening
    assert torch.equal(factor.dead, one.dead)
    assert (factor.perm is None) == (one.perm is None)
    if factor.perm is not None and one.perm is not None:
        assert torch.equal(factor.perm, one.perm)


def _damped(h: Tensor, act_order: bool, damp: float) -> tuple[Tensor, Tensor | None, Tensor]:
    s, perm, dead = hessian_in_sweep_order(h, act_order=act_order)
    s = s.clone()
    s.diagonal().add_(damp * s.diagonal().mean())
    return s, perm, dead


def test_the_ranges_do_not_change_the_factor() -> None:
    """Columns of L⁻¹ are independent solves: 1, 2, 3 or 4 ranges give the same U up to the solver's blocking
    (measured: 1 element of 262,144 differs by 1.3e-7)."""
    factor = flipped_cholesky(hessian(512, seed=1))
    assert factor.lower is not None
    first = split_upper_cholesky_of_inverse(factor.lower, 1)
    for parts in (2, 3, 4):
        torch.testing.assert_close(split_upper_cholesky_of_inverse(factor.lower, parts), first, rtol=1e-5, atol=1e-6)


def test_blocks_assemble_in_any_order_of_devices() -> None:
    factor = flipped_cholesky(hessian(200, seed=2))
    assert factor.lower is not None
    n, ranges = 200, column_ranges(200, [1.0, 2.0, 1.0])
    blocks = [inverse_columns(factor.lower, a, b, min_chunk=16) for a, b in ranges]
    full = torch.linalg.solve_triangular(factor.lower, torch.eye(n), upper=False)
    torch.testing.assert_close(flipped_upper(blocks, ranges, n, CPU), full.flip(0, 1), rtol=1e-5, atol=1e-6)


def test_column_chunks_are_fine_enough_to_share_out() -> None:
    chunks = column_chunks(0, 14336, 14336)
    assert chunks[0][0] == 0 and chunks[-1][1] == 14336
    assert all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:], strict=False))
    work = [(14336 - a) ** 2 * (b - a) for a, b in chunks]  # what each solve does
    assert max(work) < 0.1 * sum(work)
    exact = sum((14336 - c) ** 2 for c in range(14336))
    assert sum(work) < 1.04 * exact  # the zero rows skipped but for ~3 %


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_chunks_pulled_by_any_devices_give_the_one_device_factor(workers: int) -> None:
    h = hessian(700, seed=5)
    one = prepare_hessian(h)
    assert one.hinv is not None
    inverse = SharedInverse(min_chunk=16)
    with ThreadPoolExecutor(workers) as pool:
        joined = [pool.submit(inverse.work, CPU) for _ in range(workers)]  # they wait for the factor
        inverse.publish(flipped_cholesky(h))
        for future in joined:
            future.result(timeout=60)
    covered = sorted(rng for rng, _ in inverse.blocks)
    assert covered == column_chunks(0, 700, 700, 16)
    torch.testing.assert_close(inverse.upper(CPU), one.hinv, rtol=1e-4, atol=1e-5 * float(one.hinv.abs().max()))


def test_devices_sharing_the_chunks_give_the_one_device_factor_bit_for_bit() -> None:
    """With the engine's chunk size every device solves the chunks one device solves: the same U, bit for bit."""
    h = hessian(1100, seed=7)
    one = prepare_hessian(h)
    inverse = SharedInverse()
    with ThreadPoolExecutor(3) as pool:
        joined = [pool.submit(inverse.work, CPU) for _ in range(3)]
        inverse.publish(flipped_cholesky(h))
        for future in joined:
            future.result(timeout=60)
    assert len(inverse.blocks) == len(column_chunks(0, 1100, 1100)) > 1
    assert one.hinv is not None and torch.equal(inverse.upper(CPU), one.hinv)


def test_every_free_device_takes_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow solves: the devices that join take their share of the chunks, and U stays the one-device U."""
    import threading
    import time

    from workers.quant import split_inverse

    original, solvers = split_inverse.solve_chunk, []

    def slow(lower: Tensor, a: int, b: int) -> Tensor:
        solvers.append(threading.current_thread().name)
        time.sleep(0.02)
        return original(lower, a, b)

    monkeypatch.setattr(split_inverse, "solve_chunk", slow)
    h = hessian(400, seed=6)
    inverse = SharedInverse(min_chunk=8)
    with ThreadPoolExecutor(3, thread_name_prefix="device") as pool:
        joined = [pool.submit(inverse.work, CPU) for _ in range(3)]
        inverse.publish(flipped_cholesky(h))
        for future in joined:
            future.result(timeout=60)
    assert len(solvers) == len(column_chunks(0, 400, 400, 8)) and len(set(solvers)) == 3
    one = prepare_hessian(h).hinv
    assert one is not None
    torch.testing.assert_close(inverse.upper(CPU), one, rtol=1e-4, atol=1e-5 * float(one.abs().max()))


def test_a_failed_factorisation_releases_the_waiting_devices() -> None:
    inverse = SharedInverse()
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(inverse.work, CPU) for _ in range(2)]
        inverse.publish(None)  # the factoring device raised
        assert [f.result(timeout=10) for f in waiting] == [None, None]
    failed = flipped_cholesky(-torch.eye(4))
    inverse = SharedInverse()
    inverse.publish(failed)  # every dampening failed: nothing to solve
    inverse.work(CPU)
    assert inverse.blocks == []


def test_dampening_is_raised_like_the_one_device_path_and_fails_to_none() -> None:
    h = torch.eye(8)
    h[0, 1] = h[1, 0] = 1.05  # eigenvalue −0.05: indefinite at λ = 0.01, positive definite at 0.1
    one = prepare_hessian(h)
    factor = flipped_cholesky(h)
    assert factor.dampening == one.dampening == pytest.approx(0.1)
    bad = -torch.eye(8)
    assert flipped_cholesky(bad).lower is None and prepare_hessian(bad).hinv is None


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_from_the_split_factor_equal_the_one_device_codes(act_order: bool) -> None:
    n, scheme = 512, QuantScheme(bits=4, group_size=64, symmetric=True)
    h = hessian(n, seed=3)
    weight = torch.randn(96, n, generator=torch.Generator().manual_seed(4))
    one = gptq_solve(weight, prepare_hessian(h, act_order=act_order), scheme, observer="mse")
    factor = flipped_cholesky(h, act_order=act_order)
    assert factor.lower is not None
    split = gptq_solve(weight, factor.prepared(split_upper_cholesky_of_inverse(factor.lower, 3)), scheme, observer="mse")
    mismatch = float((one.quantized.q != split.quantized.q).float().mean())
    assert mismatch <= 1e-3  # measured: 0 of 49,152
    assert split.loss == pytest.approx(one.loss, rel=1e-3)


# --- one layer and the whole model on N CPU "devices" --------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq-gptq"])
@pytest.mark.parametrize("count", [2, 3, 4])
def test_a_layer_on_n_devices_gives_the_one_device_codes(make_spec: Callable[..., JobSpec], method: str, count: int) -> None:
    case = Layer0(make_spec(method, num_samples=12))
    one, _, one_result = case.parallel([CPU])  # the same merged statistics, one device
    seen: list[Progress] = []
    layer = case.layer()
    with torch.no_grad():
        acts = ShardedActivations(case.hidden, case.calls, [CPU] * count, OPTIONS)
        work = case.work(layer, acts, on_progress=seen.append)
        solved = method_for(case.spec).solve(work)
        acts.close()
    assert f"Cholesky on cpu, inverse and rows over {count} devices" in [p.message for p in seen]
    assert code_mismatch(one, solved) <= 1e-3  # measured: 0
    assert all(torch.equal(one[n].scale, solved[n].scale) for n in one)
    for a, b in zip(work.result.module_errors, one_result.module_errors, strict=True):
        assert (a.module, a.fell_back_to_rtn) == (b.module, b.fell_back_to_rtn)
        assert a.error == pytest.approx(b.error, rel=1e-3)


@pytest.mark.parametrize("count", [3, 4])
def test_the_whole_model_on_n_devices_quantizes_like_one(make_spec: Callable[..., JobSpec], count: int) -> None:
    """Samples split over N devices for every forward, statistics merged once per layer, GPTQ factor split."""
    spec = make_spec("gptq", num_samples=9, with_eval=False)
    _, one, _ = run(spec)
    result, many, _ = run(spec, devices=[CPU] * count)
    assert one.dense.keys() == many.dense.keys() and one.quantized.keys() == many.quantized.keys()
    differ = sum(int((one.quantized[n].q != many.quantized[n].q).sum()) for n in one.quantized)
    total = sum(qt.q.numel() for qt in one.quantized.values())
    assert differ <= 2e-3 * total  # the Hessians' float32 summation order, as for two devices
    assert len(result.module_errors) == 2 * 7
