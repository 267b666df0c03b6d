"""Background read-ahead of layer weights, the background checkpoint writer, and the fast error report."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor

from workers.background_writer import BackgroundWriter
from workers.loading import CheckpointWeights
from workers.output_error import output_error, report_precision
from workers.prefetch import LayerPrefetcher
from workers.quant.rtn import rtn_quantize
from workers.spec import QuantScheme
from workers.tensor_source import TensorSource

CPU = torch.device("cpu")


def helper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("qf-writer", "qf-prefetch"))]


class RecordingSource:
    """A WeightSource that logs which prefixes were read, in order."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.all = tensors
        self.reads: list[str] = []
        self.lock = threading.Lock()

    def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]:
        with self.lock:
            self.reads.append(prefix)
        return {n[len(prefix) :]: t.to(device) for n, t in self.all.items() if n.startswith(prefix)}


def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- prefetch -------------------------------------------------------------------------------------------


def test_prefetched_layers_equal_direct_reads(tiny_model_dir: Path) -> None:
    weights = CheckpointWeights(TensorSource(tiny_model_dir))
    prefixes = ["model.layers.0.", "model.layers.1."]
    with LayerPrefetcher(weights, prefixes, CPU) as layers:
        for index, prefix in enumerate(prefixes):
            source = layers.source(index)
            got = source.tensors(prefix, CPU)
            expected = weights.tensors(prefix, CPU)
            assert sorted(got) == sorted(expected) and len(got) == 9
            for name, tensor in expected.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
            other = source.tensors("model.norm.", CPU)  # any other prefix: the source's own
            assert torch.equal(other["weight"], weights.tensors("model.norm.", CPU)["weight"])
    assert helper_threads() == []


def test_prefetcher_reads_at_most_one_layer_ahead() -> None:
    source = RecordingSource({f"l.{i}.w": torch.full((2,), float(i)) for i in range(4)})
    prefixes = [f"l.{i}." for i in range(4)]
    with LayerPrefetcher(source, prefixes, CPU) as layers:
        wait_for(lambda: source.reads == ["l.0."])  # started at construction, nothing more
        time.sleep(0.05)
        assert source.reads == ["l.0."]
        for i in range(4):
            assert torch.equal(layers.source(i).tensors(prefixes[i], CPU)["w"], torch.full((2,), float(i)))
            expected = prefixes[: min(i + 2, 4)]
            wait_for(lambda expected=expected: source.reads == expected)
            time.sleep(0.05)
            assert source.reads == expected  # layer i+2 is not read before layer i+1 is taken
    assert helper_threads() == []


def test_prefetcher_disabled_is_the_source_itself_and_starts_no_thread() -> None:
    source = RecordingSource({"l.0.w": torch.ones(2)})
    with LayerPrefetcher(source, ["l.0."], CPU, enabled=False) as layers:
        assert helper_threads() == []
        assert layers.source(0) is source and source.reads == []


def test_a_failed_read_is_raised_by_source() -> None:
    class Broken:
        def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]:
            raise OSError(f"disk gone while reading {prefix}")

    with LayerPrefetcher(Broken(), ["l.0.", "l.1."], CPU) as layers, pytest.raises(OSError, match="reading l.0."):
        layers.source(0)
    assert helper_threads() == []


# --- background writer ----------------------------------------------------------------------------------


def test_writes_run_in_order_on_one_thread() -> None:
    done: list[int] = []
    threads: set[str] = set()

    def write(i: int) -> None:
        threads.add(threading.current_thread().name)
        done.append(i)

    with BackgroundWriter(CPU, max_pending=2) as writer:
        for i in range(50):
            writer.submit(partial(write, i))
    assert done == list(range(50)) and threads == {"qf-writer"}
    assert helper_threads() == []


def test_at_most_max_pending_writes_are_in_flight() -> None:
    release = threading.Event()
    submitted: list[int] = []
    writer = BackgroundWriter(CPU, max_pending=2)

    def producer() -> None:
        for i in range(4):
            writer.submit(lambda: release.wait(5))
            submitted.append(i)

    thread = threading.Thread(target=producer)
    thread.start()
    wait_for(lambda: len(submitted) == 2)
    time.sleep(0.1)
    assert submitted == [0, 1]  # the third submit waits while two writes are queued or running
    release.set()
    thread.join(5)
    writer.close()
    assert submitted == [0, 1, 2, 3] and helper_threads() == []


def test_a_write_error_is_raised_in_the_caller_and_later_writes_are_skipped() -> None:
    done: list[int] = []

    def fail() -> None:
        raise ValueError("disk full")

    writer = BackgroundWriter(CPU, max_pending=1)
    writer.submit(lambda: done.append(0))
    writer.submit(fail)
    with pytest.raises(ValueError, match="disk full"):
        for i in range(1, 100):  # a later submit reports the error; it never hangs
            writer.submit(partial(done.append, i))
    with pytest.raises(ValueError, match="disk full"):
        writer.close()  # so does close, after joining the thread
    assert done == [0] and helper_threads() == []


def test_the_callers_exception_wins_and_the_thread_is_joined() -> None:
    done: list[int] = []
    with pytest.raises(KeyError), BackgroundWriter(CPU) as writer:
        writer.submit(lambda: done.append(1))
        raise KeyError("cancelled")
    assert done == [1] and helper_threads() == []  # what was submitted before is written


def test_disabled_writer_runs_writes_synchronously() -> None:
    done: list[str] = []
    with BackgroundWriter(CPU, enabled=False) as writer:
        assert helper_threads() == []
        writer.submit(lambda: done.append(threading.current_thread().name))
        assert done == [threading.current_thread().name]


# --- the output-error report ----------------------------------------------------------------------------


def _case(out: int, d: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A weight, its 4-bit RTN dequantization and Σ = E[xxᵀ] of correlated inputs with outlier channels."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(d, generator=g))
    scales[:4] *= 30
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = (torch.randn(4 * d, d, generator=g) @ mix) * scales
    w = torch.randn(out, d, generator=g) * 0.02
    quantized = rtn_quantize(w, QuantScheme(bits=4, group_size=64, symmetric=True)).dequantize()
    return w, quantized, x.T @ x / x.shape[0]


def test_cpu_output_error_is_exactly_the_plain_fp32_formula() -> None:
    w, quantized, sigma = _case(96, 128)
    delta = quantized - w
    mse = float(((delta @ sigma) * delta).sum()) / w.shape[0]
    power = float(((w @ sigma) * w).sum()) / w.shape[0]
    with report_precision(True):  # no effect on CPU
        assert output_error(w, quantized, sigma) == (mse, mse / power)
    assert output_error(w.half(), quantized.half(), sigma.double()) == output_error(w.half().float(), quantized.half().float(), sigma)


def _bf16(x: Tensor) -> Tensor:
    """fp32 → bf16 → fp32 (round to nearest even), what the CUDA report GEMM does to its operands."""
    return x.to(torch.bfloat16).to(torch.float32)


def test_bf16_operands_move_the_report_by_less_than_1e2() -> None:
    """Backs output_error's docstring: what bf16 GEMM operands do to the two reported sums."""
    w, quantized, sigma = _case(256, 512)
    delta = quantized - w

    def sums(f: Callable[[Tensor], Tensor]) -> tuple[float, float]:
        d, s, ref = (f(t).double() for t in (delta, sigma, w))
        return float(((d @ s) * delta.double()).sum()), float(((ref @ s) * w.double()).sum())

    exact = sums(lambda t: t)
    emulated = sums(_bf16)
    deviations = [abs(e / x - 1) for e, x in zip(emulated, exact, strict=True)]
    assert all(dev < 1e-2 for dev in deviations), deviations


def test_fast_report_is_scoped_to_its_block() -> None:
    from workers import output_error as pipeline

    assert pipeline._FAST_REPORT.get() is True
    with report_precision(False):
        assert pipeline._FAST_REPORT.get() is False
        seen: list[bool] = []
        thread = threading.Thread(target=lambda: seen.append(pipeline._FAST_REPORT.get()))
        thread.start()
        thread.join(5)
        assert seen == [True]  # a new thread starts from the default, not from this block
    assert pipeline._FAST_REPORT.get() is True
    a = torch.randn(8, 16)
    assert torch.equal(pipeline._report_mm(a, a.T), a @ a.T)  # CPU: always the plain fp32 product
