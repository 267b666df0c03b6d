"""GPTQ against the textbook algorithm written out here, and the range search ("mse" observer).

The reference below is Frantar et al.'s Algorithm 1 as plainly as it can be written: one column at a
time, no lazy batch updates, the inverse Hessian's upper Cholesky factor as the update matrix, group
parameters from min-max of the (error-updated) group at its first column, or — with act-order — fixed
beforehand from the original weights, with columns visited by decreasing diag(H). Same Hessian in, same
integer codes out.
"""

from __future__ import annotations

import pytest
import torch

from workers.quant.gptq import HessianAccumulator, gptq_quantize
from workers.quant.grid import compute_qparams, quantize_values
from workers.quant.range_search import search_qparams
from workers.quant.rtn import rtn_quantize
from workers.spec import QuantScheme

IN, OUT, TOKENS = 128, 24, 2048


def textbook_gptq(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, act_order: bool, damp: float = 0.01) -> torch.Tensor:
    """Signed integer codes `[out, in]` of Algorithm 1 (float64 throughout, one column at a time)."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    group = n if scheme.group_size == -1 else scheme.group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if act_order:
        static_scale, static_zero = compute_qparams(w.float(), scheme, scale_dtype=torch.float32)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(w.shape, dtype=torch.int8)
    for i in range(n):
        g = int(perm[i]) // group
        if act_order:
            scale, zero = static_scale[:, g : g + 1], (static_zero[:, g : g + 1] if static_zero is not None else None)
        else:
            if i % group == 0:
                scale, zero = compute_qparams(w[:, i : i + group].float(), scheme, scale_dtype=torch.float32)
        q[:, i] = quantize_values(w[:, i : i + 1].float(), scale, zero, scheme)[:, 0]
        shift = zero.double() if zero is not None else 0.0
        dq = (q[:, i : i + 1].double() - shift) * scale.double()
        err = (w[:, i : i + 1] - dq) / u[i, i]
        w[:, i:] -= err @ u[i : i + 1, i:]
    return q[:, torch.argsort(perm)]


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN, IN, generator=g) / IN**0.5
    x = torch.randn(TOKENS, IN, generator=g) @ mixing
    x[:, :4] *= 10  # a few outlier channels, as in LLMs
    acc = HessianAccumulator(IN)
    acc.add(x)
    return 0.05 * torch.randn(OUT, IN, generator=g), acc.hessian


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, True), QuantScheme(3, 64, False), QuantScheme(4, -1, True)], ids=str)
def test_gptq_gives_the_textbook_codes(scheme: QuantScheme, act_order: bool) -> None:
    w, h = _problem()
    ours = gptq_quantize(w, h, scheme, act_order=act_order, scale_dtype=torch.float32).quantized.q
    reference = textbook_gptq(w, h, scheme, act_order)
    assert torch.equal(ours, reference)  # float32 vs float64 arithmetic moves no code on this problem


def _weighted_error(w: torch.Tensor, w_hat: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    return ((w - w_hat).square() * importance).sum(dim=1)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, True), QuantScheme(3, 32, False), QuantScheme(4, -1, False)], ids=str)
def test_range_search_never_loses_to_min_max_on_its_objective(scheme: QuantScheme) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, IN, generator=g)
    w[torch.rand(64, IN, generator=g) < 0.01] *= 6  # outliers make a shrunk range pay off
    importance = torch.rand(IN, generator=g) + 0.1
    scale, zero = search_qparams(w, scheme, importance, scale_dtype=torch.float32)
    searched = rtn_quantize(w, scheme, observer="mse", importance=importance, scale_dtype=torch.float32)
    assert torch.equal(searched.scale, scale)
    plain = rtn_quantize(w, scheme, scale_dtype=torch.float32)
    groups = scale.shape[1]
    size = IN // groups
    rows = importance.reshape(groups, size).repeat(64, 1)  # the importance of each (row, group)'s columns
    per_group_s = _weighted_error(w.reshape(-1, size), searched.dequantize().reshape(-1, size), rows)
    per_group_p = _weighted_error(w.reshape(-1, size), plain.dequantize().reshape(-1, size), rows)
    assert bool((per_group_s <= per_group_p * (1 + 1e-6)).all())
    assert float(per_group_s.sum()) < 0.9 * float(per_group_p.sum())


@pytest.mark.parametrize(
    ("scheme", "act_order"),
    [(QuantScheme(3, 32, True), False), (QuantScheme(3, 32, True), True), (QuantScheme(4, 32, False), True),
     (QuantScheme(8, -1, True), True)],
)
def test_gptq_with_the_range_search_keeps_each_rows_better_sweep(scheme: QuantScheme, act_order: bool) -> None:
    """observer="mse": per row, the range search's static groups or min-max's, whichever gives the lower
    Hessian-weighted error after the sweep; never a row worse than min-max alone, and lower in total."""
    w, h = _problem(1)
    searched = gptq_quantize(w, h, scheme, observer="mse", scale_dtype=torch.float32, act_order=act_order)
    plain = gptq_quantize(w, h, scheme, scale_dtype=torch.float32, act_order=act_order)
    found_scale, _ = search_qparams(w, scheme, torch.diag(h), scale_dtype=torch.float32)
    from_search = (searched.quantized.scale == found_scale).all(dim=1)
    from_min_max = (searched.quantized.scale == plain.quantized.scale).all(dim=1)
    assert bool((from_search | from_min_max).all())  # every row is one candidate's, whole
    assert 0 < int(from_search.sum()) < w.shape[0] or scheme.bits == 8

    damped = h.double() + 0.01 * h.diagonal().mean().double() * torch.eye(h.shape[0], dtype=torch.float64)

    def row_errors(q: torch.Tensor) -> torch.Tensor:  # the objective GPTQ minimises, per row
        delta = (w - q).double()
        return ((delta @ damped) * delta).sum(dim=1)

    ours, theirs = row_errors(searched.quantized.dequantize()), row_errors(plain.quantized.dequantize())
    assert bool((ours <= theirs * (1 + 1e-5)).all())
    assert float(ours.sum()) < float(theirs.sum())
    assert searched.loss == pytest.approx(float(ours.sum()) / 2, rel=1e-3)  # the sweep's loss is that error


def test_both_candidate_sweeps_start_from_the_original_weight() -> None:
    """observer="mse" without act-order sweeps its two candidates one after the other, and a sweep updates the
    columns ahead of it in place: each must start from the original weight, so the rows taken from min-max are
    exactly min-max's own solve (blocks of 32 of 128 columns, so columns ahead are updated between blocks)."""
    w, h = _problem(2)
    scheme = QuantScheme(3, 32, True)
    searched = gptq_quantize(w, h, scheme, observer="mse", scale_dtype=torch.float32, block_size=32)
    plain = gptq_quantize(w, h, scheme, scale_dtype=torch.float32, block_size=32)
    rows = (searched.quantized.scale == plain.quantized.scale).all(dim=1)
    assert 0 < int(rows.sum()) < w.shape[0]
    assert torch.equal(searched.quantized.q[rows], plain.quantized.q[rows])
