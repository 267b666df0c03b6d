"""Data-parallel calibration on CPU: two "devices" that are the same CPU run all the split/merge/assign logic."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from workers.activations import ShardedActivations
from workers.calibration import calibration_windows
from workers.devices import (
    DeviceThreads,
    _on_each,
    assign_groups,
    replicate,
    resolve_devices,
    shard_bounds,
    split_group,
    sync_replicas,
)
from workers.errors import InvalidSpecError
from workers.loading import CheckpointWeights, LayerwiseModel, load_tokenizer, run_decoder_layer
from workers.methods import method_for
from workers.methods.awq import merged_statistics
from workers.methods.base import LayerWork, PipelineResult
from workers.methods.groups import group_costs
from workers.model_graph import Group, LayerPlan
from workers.options import PipelineOptions
from workers.output_error import deployed
from workers.progress import Progress, ProgressCallback, no_progress
from workers.quant.gptq import HessianAccumulator, HessianPrecision, gptq_quantize_shared
from workers.quant.grid import QuantizedTensor
from workers.spec import JobSpec
from workers.statistics import InputStatistics, collect_statistics, merge_hessians, merge_sums
from workers.tensor_source import TensorSource

CPU = torch.device("cpu")
OPTIONS = PipelineOptions(batch_tokens=256)  # several chunks per shard: chunk boundaries are exercised


class Layer0:
    """Decoder layer 0 of the tiny model with its calibration inputs (hidden states after the embedding)."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.model = LayerwiseModel(spec.model_dir, CPU)
        self.weights = CheckpointWeights(TensorSource(spec.model_dir))
        ids = calibration_windows(spec.calibration, load_tokenizer(spec.model_dir))
        self.hidden = self.model.embed(ids, self.weights)
        self.calls = self.model.layer_calls(ids.shape[1], self.weights)
        self.pos = self.calls[0]

    def plan(self) -> LayerPlan:
        return self.model.layer_plan(self.layer(), self.hidden[:1], self.pos)

    def layer(self) -> nn.Module:
        return self.model.decoder_layer(0, self.weights)

    def work(
        self, layer: nn.Module, acts: ShardedActivations, *, precision: HessianPrecision | None = None,
        on_progress: ProgressCallback = no_progress,
    ) -> LayerWork:
        replicas = replicate(layer, acts.devices)
        return LayerWork(0, replicas, acts, self.model, self.spec, OPTIONS, PipelineResult(), on_progress, precision)

    def statistics(self, layer: nn.Module) -> dict[Group, InputStatistics]:
        """The one-device statistics of layer 0 (the pipeline's numerics: rescaled float32 running means)."""
        return collect_statistics([layer], ShardedActivations(self.hidden.clone(), self.calls, [CPU], OPTIONS), self.plan())

    def sequential(self) -> tuple[dict[str, QuantizedTensor], Tensor, PipelineResult]:
        """What the one-device pipeline does for layer 0: solve, install, forward."""
        return self._run([CPU], precision=None)

    def parallel(self, devices: list[torch.device]) -> tuple[dict[str, QuantizedTensor], Tensor, PipelineResult]:
        """The same with unscaled partial sums merged across `devices` (what several devices run; here also one)."""
        return self._run(devices, precision="half-operands")

    def _run(
        self, devices: list[torch.device], precision: HessianPrecision | None
    ) -> tuple[dict[str, QuantizedTensor], Tensor, PipelineResult]:
        layer = self.layer()
        acts = ShardedActivations(self.hidden.clone(), self.calls, devices, OPTIONS)
        with torch.no_grad():
            work = self.work(layer, acts, precision=precision)
            solved = method_for(self.spec).solve(work)
            install(layer, solved, self.model)
            sync_replicas(work.replicas)
            acts.forward(work.replicas, update=True)
        acts.close()
        return solved, acts.gather(CPU), work.result


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    module = layer.get_submodule(name)
    assert isinstance(module, nn.Linear)
    return module


def install(layer: nn.Module, solved: dict[str, QuantizedTensor], model: LayerwiseModel) -> None:
    for name, qt in solved.items():
        _linear(layer, name).weight.data = deployed(qt, model, CPU)


def norm_weight(layer: nn.Module) -> Tensor:
    weight = layer.get_submodule("input_layernorm").weight
    assert isinstance(weight, Tensor)
    return weight


def code_mismatch(a: dict[str, QuantizedTensor], b: dict[str, QuantizedTensor]) -> float:
    assert a.keys() == b.keys()
    differ = sum(int((a[n].q != b[n].q).sum()) for n in a)
    return differ / sum(a[n].q.numel() for n in a)


# --- shards, devices, assignment -------------------------------------------------------------------------


def test_shards_are_contiguous_and_differ_by_at_most_one() -> None:
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(8, 2) == [(0, 4), (4, 8)]
    assert shard_bounds(5, 5) == [(i, i + 1) for i in range(5)]
    for n in range(1, 40):
        for parts in range(1, n + 1):
            bounds = shard_bounds(n, parts)
            sizes = [b - a for a, b in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == n and max(sizes) - min(sizes) <= 1
            assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds, bounds[1:], strict=False))


def test_bad_device_lists_are_refused_with_a_reason() -> None:
    hidden, pos = torch.zeros(3, 4, 8), []
    with pytest.raises(ValueError, match="at least one device"):
        ShardedActivations(hidden, pos, [], OPTIONS)
    with pytest.raises(InvalidSpecError, match="4 devices but only 3 calibration samples.*at most 3 devices"):
        ShardedActivations(hidden, pos, [CPU] * 4, OPTIONS)


def test_resolve_devices_on_a_cpu_worker() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the messages of a worker without GPUs")
    assert resolve_devices("cpu", 1) == [CPU]
    assert resolve_devices("auto", 1) == [CPU]
    with pytest.raises(InvalidSpecError, match=r"devices=2 .* this worker has 0 visible CUDA GPU\(s\); set devices to at most 1"):
        resolve_devices("auto", 2)
    with pytest.raises(InvalidSpecError, match="devices=2 needs CUDA GPUs, but device is 'cpu'"):
        resolve_devices("cpu", 2)
    with pytest.raises(InvalidSpecError, match="at least one device"):
        resolve_devices("auto", 0)


def test_resolve_devices_picks_consecutive_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_devices("auto", 4) == [torch.device("cuda", i) for i in range(4)]
    assert resolve_devices("cuda:1", 2) == [torch.device("cuda", 1), torch.device("cuda", 2)]
    with pytest.raises(InvalidSpecError, match="needs GPUs 3..4, but this worker has 4 .* at most 1"):
        resolve_devices("cuda:3", 2)
    with pytest.raises(InvalidSpecError, match="this worker has 4 visible CUDA GPU"):
        resolve_devices("auto", 5)


def test_work_runs_one_thread_per_device_without_grad_and_reraises() -> None:
    threads: list[str] = []
    all_started = threading.Barrier(3, timeout=10)  # passes only if the three run at the same time
    job = contextvars.ContextVar("job", default="none")

    def work(i: int) -> int:
        threads.append(threading.current_thread().name)
        assert not torch.is_grad_enabled() and job.get() == "caller's"
        all_started.wait()
        return i * 10

    token = job.set("caller's")
    try:
        assert _on_each([CPU, CPU, CPU], work) == [0, 10, 20]
    finally:
        job.reset(token)
    assert sorted(threads) == ["qf-device-0_0", "qf-device-1_0", "qf-device-2_0"]

    finished: list[int] = []

    def fail_on_second(i: int) -> int:
        if i == 1:
            raise RuntimeError("device 1 failed")
        time.sleep(0.05)
        finished.append(i)
        return i

    with pytest.raises(RuntimeError, match="device 1 failed"):
        _on_each([CPU, CPU, CPU], fail_on_second)
    assert sorted(finished) == [0, 2]  # the other devices' work was waited for, not abandoned


def test_device_threads_live_for_the_job_one_per_device() -> None:
    """Every call lands on the same long-lived thread of its device (its CUDA state is set up once)."""
    with DeviceThreads([CPU, CPU]) as threads:
        first = threads.run(lambda i: threading.get_ident())
        again = threads.run(lambda i: threading.get_ident())
        assert first == again and len(set(first)) == 2 and threading.get_ident() not in first
    assert DeviceThreads([CPU]).run(lambda i: threading.get_ident()) == [threading.get_ident()]  # one device: inline


LLAMA_8B = {  # (out of the whole group, in) of Llama-3-8B's groups: q/k/v, o, gate/up, down
    "qkv": (4096 + 2 * 1024, 4096), "o": (4096, 4096), "gate_up": (2 * 14336, 4096), "down": (4096, 14336),
}


def test_groups_are_balanced_by_solve_cost() -> None:
    costs = [out * n * n + n**3 for out, n in LLAMA_8B.values()]
    assert assign_groups(costs, 1) == [0, 0, 0, 0]
    assert assign_groups(costs, 2) == [1, 1, 1, 0]  # down (3.8e12) alone; the rest (0.85e12) together
    assert sorted(assign_groups(costs, 4)) == [0, 1, 2, 3]
    assert assign_groups([5, 5, 5], 2) == [0, 1, 0]  # ties go to the lower device
    assert assign_groups([10, 4, 3, 3], 2) == [0, 1, 1, 1]  # loads 10 / 10
    assert assign_groups([6, 5, 4, 3, 2], 3) == [0, 1, 2, 2, 1]  # loads 6 / 7 / 7


def test_only_a_group_larger_than_an_even_share_has_its_rows_split() -> None:
    costs = [out * n * n + n**3 for out, n in LLAMA_8B.values()]
    assert split_group(costs, 1) is None
    assert split_group(costs, 2) == 3 and split_group(costs, 8) == 3  # down_proj: 82% of the layer's cost
    assert split_group([5, 5, 5], 2) is None  # no group dominates: whole groups are spread
    assert split_group([1, 9, 9], 2) is None and split_group([1, 10, 8], 2) == 1


def test_group_costs_of_the_tiny_llama(make_spec: Callable[..., JobSpec]) -> None:
    layer = Layer0(make_spec()).layer()  # hidden 64, intermediate 128, 4 heads, 2 KV heads (head dim 16)
    assert group_costs(layer, Layer0(make_spec()).plan()) == [
        (64 + 32 + 32) * 64**2 + 64**3, 64 * 64**2 + 64**3, 256 * 64**2 + 64**3, 64 * 128**2 + 128**3,
    ]


# --- Hessians --------------------------------------------------------------------------------------------


def _accumulate(chunks: list[Tensor], precision: str = "half-operands") -> HessianAccumulator:
    acc = HessianAccumulator(chunks[0].shape[-1], precision=precision)  # type: ignore[arg-type]
    for chunk in chunks:
        acc.add(chunk)
    return acc


def test_merged_hessian_equals_the_one_device_hessian() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(300, 96, generator=g) * torch.linspace(0.1, 5, 96) for _ in range(7)]  # uneven channels
    parts = [_accumulate(chunks[:3]), _accumulate(chunks[3:5]), _accumulate(chunks[5:])]
    merged = merge_hessians(parts, CPU)
    # float32: only the order of the additions differs (a 3-way split, or the pipeline's rescaled running mean)
    for single in (_accumulate(chunks).hessian, _accumulate(chunks, "fp32").hessian):
        torch.testing.assert_close(merged, single, rtol=1e-5, atol=1e-5 * float(single.abs().max()))
    # bit for bit where every partial sum is exact: the arithmetic is Σ S_d then one scaling by 2/n
    ints = [c.round().clamp(-8, 8) for c in chunks]
    exact = [_accumulate(ints[:3]), _accumulate(ints[3:5]), _accumulate(ints[5:])]
    assert torch.equal(merge_hessians(exact, CPU), _accumulate(ints).hessian)
    # float64: values on a 1/256 grid in [-8, 8] make every sum exact, so the split changes nothing
    grid = [(c * 32).round().clamp(-2048, 2048).double() / 256 for c in chunks]
    sums = [sum((x.T @ x for x in part), torch.zeros(96, 96, dtype=torch.float64)) for part in (grid[:3], grid[3:5], grid[5:])]
    whole = sum((x.T @ x for x in grid), torch.zeros(96, 96, dtype=torch.float64)) * (2.0 / 2100)
    assert torch.equal(merge_sums(sums, 2100, CPU), whole)


def test_rescaled_fp32_accumulators_are_not_merged() -> None:
    with pytest.raises(ValueError, match="half-operands"):
        merge_hessians([_accumulate([torch.ones(2, 4)], "fp32")], CPU)


def test_partial_hessians_of_a_real_layer_merge_to_the_pipeline_hessians(make_spec: Callable[..., JobSpec]) -> None:
    case = Layer0(make_spec(num_samples=9))  # shards of 5 and 4 windows
    layer = case.layer()
    with torch.no_grad():
        single = {group: stats.hessian(CPU) for group, stats in case.statistics(layer).items()}
        acts = ShardedActivations(case.hidden, case.calls, [CPU, CPU], OPTIONS)
        partials = collect_statistics(replicate(layer, acts.devices), acts, case.plan())
    assert [p.num_samples for p in partials[("mlp.down_proj",)].parts] == [5 * 64, 4 * 64]
    for group, hessian in single.items():
        merged = merge_hessians(partials[group].parts, CPU)
        torch.testing.assert_close(merged, hessian, rtol=1e-5, atol=1e-5 * float(hessian.abs().max()))


# --- replicas --------------------------------------------------------------------------------------------


def test_replicas_own_their_tensors_and_sync_copies_the_primary(make_spec: Callable[..., JobSpec]) -> None:
    layer = Layer0(make_spec()).layer()
    primary, copy_ = replicate(layer, [CPU, CPU])
    assert primary is layer
    for (name, a), (_, b) in zip(primary.state_dict().items(), copy_.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert getattr(copy_.self_attn, "config") is getattr(layer.self_attn, "config")  # noqa: B009
    with torch.no_grad():
        norm_weight(layer).mul_(3)
        _linear(layer, "mlp.down_proj").weight.data = torch.zeros(64, 128)
        sync_replicas([primary, copy_])
    assert torch.equal(norm_weight(copy_), norm_weight(layer))
    assert int(torch.count_nonzero(_linear(copy_, "mlp.down_proj").weight)) == 0


# --- one layer end to end: [cpu] vs [cpu, cpu] vs the sequential pipeline ---------------------------------


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_two_devices_matches_one_device(make_spec: Callable[..., JobSpec], act_order: bool) -> None:
    case = Layer0(make_spec(num_samples=16, act_order=act_order))
    seq_codes, seq_hidden, seq_result = case.sequential()  # the pipeline: rescaled fp32 running-mean Hessians
    one_codes, one_hidden, _ = case.parallel([CPU])
    two_codes, two_hidden, two_result = case.parallel([CPU, CPU])
    with torch.no_grad():
        quant_error = float((seq_hidden - run_decoder_layer(case.layer(), case.hidden, case.pos)).norm())
    # Hessians differ only by float32 summation order, so a code on a rounding boundary may flip, and GPTQ carries
    # a flipped code's error into the rest of its row. Measured (36,864 codes): without act_order 0 codes differ;
    # with it one vs two devices 18 codes (4.9e-4), pipeline vs two 0. Next-layer inputs: ‖two − one‖ = 0.043 of
    # ‖quantization error‖.
    assert code_mismatch(one_codes, two_codes) <= 1e-3
    assert code_mismatch(seq_codes, two_codes) <= 1e-3
    assert float((two_hidden - one_hidden).norm()) <= 0.1 * quant_error
    assert float((two_hidden - seq_hidden).norm()) <= 0.1 * quant_error
    assert [(e.layer, e.module) for e in two_result.module_errors] == [(e.layer, e.module) for e in seq_result.module_errors]
    for a, b in zip(two_result.module_errors, seq_result.module_errors, strict=True):
        assert a.error == pytest.approx(b.error, rel=0.05)


def test_spread_solves_give_the_same_codes_as_one_solve_given_the_same_hessian(make_spec: Callable[..., JobSpec]) -> None:
    case = Layer0(make_spec(num_samples=16))
    arch = case.plan()
    codes, _, _ = case.parallel([CPU, CPU])  # q/k/v, o and gate/up solved on replica 1, down on the primary
    layer = case.layer()
    with torch.no_grad():
        acts = ShardedActivations(case.hidden, case.calls, [CPU, CPU], OPTIONS)
        partials = collect_statistics(replicate(layer, acts.devices), acts, arch)
        for group in arch.groups:
            hessian = merge_hessians(partials[group].parts, CPU)
            weights = [_linear(layer, name).weight for name in group]
            results = gptq_quantize_shared(
                weights, hessian, case.spec.scheme, scale_dtype=case.model.model_dtype, act_order=case.spec.act_order,
                observer=case.spec.observer,
            )
            for name, r in zip(group, results, strict=True):
                assert torch.equal(r.quantized.q, codes[name].q), name
                assert torch.equal(r.quantized.scale, codes[name].scale), name


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_three_devices_split_rows_and_searches_without_changing_a_code(make_spec: Callable[..., JobSpec], method: str) -> None:
    """down_proj's 64 rows go 22/21/21 to three devices (GPTQ), AWQ's searches are spread: same integers."""
    case = Layer0(make_spec(method, num_samples=12))
    seen: list[Progress] = []
    layer = case.layer()
    with torch.no_grad():
        acts = ShardedActivations(case.hidden, case.calls, [CPU] * 3, OPTIONS)
        solved = method_for(case.spec).solve(case.work(layer, acts, on_progress=seen.append))
        acts.close()
    one, _, _ = case.parallel([CPU])
    assert code_mismatch(one, solved) == 0.0
    assert all(torch.equal(one[n].scale, solved[n].scale) for n in one)
    messages = [p.message for p in seen]
    if method == "gptq":
        assert "Cholesky on cpu, inverse and rows over 3 devices" in messages
    else:
        assert messages.count("awq scale search on cpu") == 3  # v_proj → o_proj is skipped (GQA shapes)
        assert messages.count("awq clip search on cpu") == len(case.plan().linears)


def test_awq_on_two_devices_merges_the_same_statistics_and_codes(make_spec: Callable[..., JobSpec]) -> None:
    case = Layer0(make_spec("awq", num_samples=10))
    arch = case.plan()
    layer = case.layer()
    with torch.no_grad():
        single = case.statistics(layer)
        acts = ShardedActivations(case.hidden, case.calls, [CPU, CPU, CPU], OPTIONS)
        merged = merged_statistics(case.work(layer, acts))
        acts.close()
    for group in arch.groups:  # the same sums, added in another order
        assert torch.allclose(merged[group].second_moment, single[group].second_moment(CPU), rtol=1e-5, atol=1e-7), group
        assert torch.allclose(merged[group].mean_abs, single[group].mean_abs(CPU), rtol=1e-5), group

    seq_codes, seq_hidden, _ = case.sequential()
    two_codes, two_hidden, two_result = case.parallel([CPU, CPU])
    assert code_mismatch(seq_codes, two_codes) == 0.0
    # the folded scales differ in the last float32 bits (sums added in another order), the outputs by as little
    torch.testing.assert_close(two_hidden, seq_hidden, rtol=1e-4, atol=1e-5)
    assert len(two_result.module_errors) == len(arch.linears)
