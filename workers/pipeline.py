"""The sequential ("true-sequential") quantization pipeline: one decoder layer at a time.

    calibration tokens → embeddings = inputs of layer 0
    for each layer:  load weights → forward the fp layer with hooks (per Linear group: Σ xᵀx and Σ|x| over
                     all calibration tokens, which serve GPTQ, AWQ and the error report) → solve → swap in the dequantized
                     weights → forward the *quantized* layer to make the next layer's inputs → write → free

Because the next inputs come from the quantized layer, every layer is solved for the inputs it will see
at inference time, errors of earlier layers included. Peak memory is one layer, its statistics and the
calibration activations (kept on the accelerator when they fit, else in host memory).

RTN needs no calibration: without calibration tokens the pipeline only quantizes and writes, layer by
layer, with no forward pass and no error report.

Disk I/O overlaps the compute (PipelineOptions switches, same checkpoint bytes either way): layer i+1's
weights are read on a thread while layer i is solved (workers/prefetch.py), and finished layers are written
on another, in order, at most `max_pending_writes` layers in flight (workers/background_writer.py).

Per-module error: the mean squared error of the module's output, quantized vs original, over its
calibration inputs x, computed from the input second moment Σ = E[x xᵀ] as trace(ΔW Σ ΔWᵀ) / out.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from workers.awq_mappings import AwqMapping
from workers.background_writer import BackgroundWriter
from workers.errors import JobCancelled
from workers.loading import LayerCall, LayerwiseModel, WeightSource, run_decoder_layer
from workers.memory import release_host_memory
from workers.model_graph import Group, LayerPlan, linear_names
from workers.prefetch import LayerPrefetcher
from workers.progress import CancelCheck, Progress, ProgressCallback, never_cancel, no_progress
from workers.quant.awq import apply_clip, search_clip, search_scales
from workers.quant.fp8 import FloatQuantizedTensor
from workers.quant.fp8 import input_scale as fp8_input_scale
from workers.quant.gptq import HessianAccumulator, gptq_quantize_shared
from workers.quant.grid import QuantizedTensor
from workers.quant.rtn import rtn_quantize
from workers.report import ModuleError
from workers.spec import JobSpec, Method


class CheckpointSink(Protocol):
    """Where finished tensors go (workers.formats.writer.CheckpointWriter)."""

    def add_dense(self, name: str, tensor: Tensor) -> None: ...
    def add_quantized(self, module_name: str, qt: QuantizedTensor) -> None: ...


@dataclass(frozen=True)
class PipelineOptions:
    batch_tokens: int = 8192  # tokens per forward chunk: bounds the attention/MLP intermediates
    awq_grid: int = 20
    gptq_block_size: int = 128
    device_activation_fraction: float = 0.5  # keep activations on the GPU if they fit in this share of free memory
    prefetch_weights: bool = True  # read layer i+1 from disk on a thread while layer i is solved (prefetch.py)
    background_writes: bool = True  # write finished layers on a thread (background_writer.py)
    max_pending_writes: int = 2  # layers queued or being written at once: bounds the memory they hold
    fast_error_report: bool = True  # per-module output errors (a report metric) from bf16 GEMM operands on CUDA


@dataclass
class PipelineResult:
    module_errors: list[ModuleError] = field(default_factory=list)
    fallback_modules: list[str] = field(default_factory=list)


class Activations:
    """Hidden states `[samples, seq, hidden]` of every calibration window, processed in chunks of samples."""

    def __init__(self, hidden: Tensor, device: torch.device, options: PipelineOptions) -> None:
        self.device = device
        self.rows_per_chunk = max(1, options.batch_tokens // hidden.shape[1])
        home = self._home(hidden, device, options)
        self.hidden = hidden.to(home)
        if home.type == "cpu" and device.type == "cuda":  # offloaded: pinned, so chunk copies are fast DMA
            self.hidden = self.hidden.pin_memory()

    @staticmethod
    def _home(hidden: Tensor, device: torch.device, options: PipelineOptions) -> torch.device:
        if device.type != "cuda":
            return device
        free, _ = torch.cuda.mem_get_info(device)
        fits = 2 * hidden.numel() * hidden.element_size() < options.device_activation_fraction * free
        return device if fits else torch.device("cpu")

    def chunks(self) -> list[tuple[int, int]]:
        n = self.hidden.shape[0]
        return [(a, min(a + self.rows_per_chunk, n)) for a in range(0, n, self.rows_per_chunk)]

    def probe(self) -> Tensor:
        """One window on the device: enough for a forward that only looks at the layer's structure."""
        return self.hidden[:1].to(self.device)

    def forward(self, layer: nn.Module, call: LayerCall, *, update: bool) -> None:
        """Run `layer` over all windows; with `update`, its outputs replace the stored hidden states."""
        for a, b in self.chunks():
            out = run_decoder_layer(layer, self.hidden[a:b].to(self.device), call)
            if update:
                self.hidden[a:b] = out.to(self.hidden.device)


def _first_linears(plan: LayerPlan) -> dict[str, Group]:
    """Each group's first Linear (whose input is the group's input) → the group."""
    return {group[0]: group for group in plan.groups}


class _InputsCaptured(Exception):
    """Raised by the last capture hook: the rest of the layer's forward is not needed."""


def capture_inputs(
    layer: nn.Module,
    activations: Activations,
    call: LayerCall,
    plan: LayerPlan,
    collect: Callable[[Group, Tensor], None],
) -> None:
    """Forward the layer over all windows, handing each Linear group's input `[tokens, in]` to `collect`.

    The forward of each chunk stops once the last group's input is seen (saving its matmul, a quarter of
    a Llama layer's work): only inputs are wanted here, the outputs come from the quantized layer later.
    """
    last = plan.groups[-1]
    handles = []
    for name, group in _first_linears(plan).items():

        def hook(_module: nn.Module, args: tuple[Tensor, ...], group: tuple[str, ...] = group) -> None:
            collect(group, args[0].detach().reshape(-1, args[0].shape[-1]))
            if group == last:
                raise _InputsCaptured

        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for a, b in activations.chunks():
            with contextlib.suppress(_InputsCaptured):
                run_decoder_layer(layer, activations.hidden[a:b].to(activations.device), call)
    finally:
        for handle in handles:
            handle.remove()


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

    A report metric only: no quantized weight depends on it. On CUDA (unless `report_precision(False)`)
    its two [out, in]·[in, in] GEMMs take bf16 operands with float32 accumulation: ~15× faster than fp32
    on an H100, ~0.1 s less per Llama-3-8B layer. No process-wide switch (such as TF32) is touched, so
    other threads' float32 matmuls (GPTQ's lazy updates) are never affected. Rounding the operands to bf16
    (round-to-nearest, unbiased) moves both sums by well under 1e-2 relative (3e-4 in the test case;
    tests/workers/test_prefetch.py emulates it on the CPU). CPU results are the exact fp32 ones.
    Both sums are read back in one host sync.
    """
    ref = reference.to(torch.float32)
    delta = quantized.to(torch.float32) - ref
    sigma = second_moment.to(ref.device, torch.float32)
    sums = torch.stack([(_report_mm(delta, sigma) * delta).sum(), (_report_mm(ref, sigma) * ref).sum()])
    mse, power = (float(v) / ref.shape[0] for v in sums.tolist())
    return mse, (mse / power if power > 0 else 0.0)


def _deployed(qt: QuantizedTensor, model: LayerwiseModel, device: torch.device) -> Tensor:
    """The weight a runtime computes with: dequantized in the model dtype, then in the compute dtype."""
    return qt.dequantize(model.model_dtype).to(device, model.compute_dtype)


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    module = layer.get_submodule(name)
    assert isinstance(module, nn.Linear), f"{name} is not a Linear"
    return module


def _solve_rtn(layer: nn.Module, spec: JobSpec, dtype: torch.dtype) -> dict[str, QuantizedTensor]:
    return {
        name: rtn_quantize(_linear(layer, name).weight, spec.scheme, scale_dtype=dtype, observer=spec.observer)
        for name in linear_names(layer)
    }


def input_statistics(
    layer: nn.Module, activations: Activations, call: LayerCall, plan: LayerPlan
) -> dict[Group, HessianAccumulator]:
    """Per Linear group, the statistics of its input over all calibration tokens (H = 2/n Σ xᵀx, Σ|x| and
    max|x|, static FP8's activation range), from one forward of the (not yet quantized) layer."""
    accumulators = {
        group: HessianAccumulator(_linear(layer, group[0]).in_features, activations.device) for group in plan.groups
    }
    capture_inputs(layer, activations, call, plan, lambda group, x: accumulators[group].add(x))
    return accumulators


GroupOutcome = tuple[str, QuantizedTensor, float, float, bool, str | None]  # name, result, mse, relative, fallback, note


@dataclass
class AwqStatistics:
    """What AWQ needs of one group's input: Σ = E[x xᵀ] and E|x|, divided by the scales as they are folded."""

    second_moment: Tensor
    mean_abs: Tensor

    @classmethod
    def of(cls, accumulator: HessianAccumulator) -> AwqStatistics:
        return cls(accumulator.second_moment.clone(), accumulator.mean_abs.clone())

    def divide(self, scales: Tensor) -> None:
        """The statistics of x / s."""
        s = scales.to(self.second_moment.device, torch.float32)
        self.second_moment.div_(s.unsqueeze(1)).div_(s.unsqueeze(0))
        self.mean_abs.div_(s)


class LayerQuantizer:
    """Solves one decoder layer with the job's method; records errors and RTN fallbacks."""

    def __init__(self, model: LayerwiseModel, spec: JobSpec, options: PipelineOptions, result: PipelineResult) -> None:
        self.model, self.spec, self.options, self.result = model, spec, options, result

    def plan(self, layer: nn.Module, activations: Activations, call: LayerCall) -> LayerPlan:
        """The layer's Linear groups and AWQ mappings (found on one window of its calibration inputs)."""
        return self.model.layer_plan(layer, activations.probe(), call)

    def _record(self, index: int, name: str, mse: float, relative: float, fallback: bool = False, note: str | None = None) -> None:
        self.result.module_errors.append(ModuleError(index, name, mse, relative, fallback, note))
        if fallback:
            self.result.fallback_modules.append(f"layers.{index}.{name}: {note}")

    def solve(
        self,
        index: int,
        layer: nn.Module,
        activations: Activations | None,
        call: LayerCall | None,
        on_progress: ProgressCallback,
    ) -> dict[str, QuantizedTensor]:
        method = self.spec.method
        if activations is None or call is None:
            return _solve_rtn(layer, self.spec, self.model.model_dtype)
        plan = self.plan(layer, activations, call)
        if method.smooths:
            stats = input_statistics(layer, activations, call, plan)
            awq_stats = {g: AwqStatistics.of(acc) for g, acc in stats.items()}
            return self.solve_awq_statistics(index, layer, awq_stats, plan, on_progress)
        statistics = input_statistics(layer, activations, call, plan)
        static_fp8 = self.spec.scheme.activations == "static"
        solved: dict[str, QuantizedTensor] = {}
        for group, accumulator in statistics.items():
            on_progress(Progress("quantize", index, self.model.num_layers, ", ".join(group)))
            for name, qt, mse, rel, fallback, note in self.solve_group(layer, group, accumulator.hessian):
                self._record(index, name, mse, rel, fallback, note)
                if static_fp8 and isinstance(qt, FloatQuantizedTensor):  # the group's inputs: one range for all
                    qt.input_scale = fp8_input_scale(accumulator.abs_max, self.model.model_dtype)
                solved[name] = qt
        return solved

    def solve_group(self, layer: nn.Module, group: tuple[str, ...], hessian: Tensor) -> list[GroupOutcome]:
        """GPTQ (one factored inverse Hessian for the whole group) or RTN of the Linears that share an input,
        with each module's output error; on the device of `layer` and `hessian`."""
        dtype = self.model.model_dtype
        weights = [_linear(layer, name).weight for name in group]
        if self.spec.method.sweeps:
            results = gptq_quantize_shared(
                weights, hessian, self.spec.scheme, dampening=self.spec.dampening,
                block_size=self.options.gptq_block_size, act_order=self.spec.act_order, scale_dtype=dtype,
                observer=self.spec.observer,
            )
            solved = [(r.quantized, r.fell_back_to_rtn, r.note) for r in results]
        else:
            importance = hessian.diagonal()
            solved = [
                (rtn_quantize(w, self.spec.scheme, scale_dtype=dtype, observer=self.spec.observer, importance=importance), False, None)
                for w in weights
            ]
        second_moment = hessian / 2  # E[x xᵀ] of the group's input, shared by its modules
        outcomes: list[GroupOutcome] = []
        for name, weight, (qt, fallback, note) in zip(group, weights, solved, strict=True):
            mse, rel = output_error(weight, _deployed(qt, self.model, weight.device), second_moment)
            outcomes.append((name, qt, mse, rel, fallback, note))
        return outcomes

    def solve_awq_statistics(
        self, index: int, layer: nn.Module, stats: dict[Group, AwqStatistics], plan: LayerPlan, on_progress: ProgressCallback
    ) -> dict[str, QuantizedTensor]:
        """AWQ given each group's input statistics over all calibration tokens (updated in place as scales fold):
        scale search per mapping (folding 1/s into the previous op), then clip search and RTN per Linear."""
        row_scale: dict[str, Tensor] = {}  # Linears whose output rows were divided by AWQ scales
        for mapping in self.awq_mappings(layer, plan):
            on_progress(Progress("quantize", index, self.model.num_layers, mapping.prev, "awq scale search"))
            group_stats = stats[plan.group_of(mapping.linears[0])]
            self.fold_awq_scales(layer, mapping, self.awq_scales(layer, mapping, group_stats), group_stats, row_scale)
        if self.spec.method.sweeps:
            return self.solve_groups_after_smoothing(index, layer, stats, plan, on_progress)

        solved: dict[str, QuantizedTensor] = {}
        for name in plan.linears:
            on_progress(Progress("quantize", index, self.model.num_layers, name))
            sigma = stats[plan.group_of(name)].second_moment
            qt, mse, rel = self.awq_clip_quantize(name, _linear(layer, name).weight, sigma, row_scale.get(name))
            self._record(index, name, mse, rel)
            solved[name] = qt
        return solved

    def solve_groups_after_smoothing(
        self, index: int, layer: nn.Module, stats: dict[Group, AwqStatistics], plan: LayerPlan, on_progress: ProgressCallback
    ) -> dict[str, QuantizedTensor]:
        """GPTQ of every group on the AWQ-scaled weights, with the Hessian of the scaled inputs (H = 2Σ')."""
        solved: dict[str, QuantizedTensor] = {}
        for group in plan.groups:
            on_progress(Progress("quantize", index, self.model.num_layers, ", ".join(group)))
            for name, qt, mse, rel, fallback, note in self.solve_group(layer, group, 2 * stats[group].second_moment):
                self._record(index, name, mse, rel, fallback, note)
                solved[name] = qt
        return solved

    def awq_mappings(self, layer: nn.Module, plan: LayerPlan) -> list[AwqMapping]:
        """The layer's AWQ mappings whose shapes line up (v_proj → o_proj does not under grouped-query attention,
        nor a fused qkv_proj → o_proj unless q, k and v have one size)."""
        usable = []
        for mapping in plan.awq_mappings:
            prev = layer.get_submodule(mapping.prev)
            width = _linear(layer, mapping.linears[0]).in_features
            if isinstance(prev, nn.Linear) and prev.out_features != mapping.parts * width:
                continue
            usable.append(mapping)
        return usable

    def awq_scales(self, layer: nn.Module, mapping: AwqMapping, stats: AwqStatistics) -> Tensor:
        """The scale search of one mapping on its Linears' current weights and their input statistics."""
        weights = [_linear(layer, name).weight for name in mapping.linears]
        return search_scales(
            stats.second_moment, stats.mean_abs, weights, self.spec.scheme, grid=self.options.awq_grid,
            scale_dtype=self.model.model_dtype,
        )[0]

    def fold_awq_scales(
        self, layer: nn.Module, mapping: AwqMapping, scales: Tensor, stats: AwqStatistics, row_scale: dict[str, Tensor]
    ) -> None:
        """Fold 1/s into the previous op, s into the mapping's Linears and 1/s into their input statistics."""
        prev = layer.get_submodule(mapping.prev)
        _fold_scales(prev, scales)
        for name in mapping.linears:
            weight = _linear(layer, name).weight
            weight.mul_(scales.to(weight.device, weight.dtype))
        stats.divide(scales)
        if isinstance(prev, nn.Linear):  # only the last `scales.numel()` output rows were divided (fused: one slice)
            rows = row_scale.get(mapping.prev, torch.ones(prev.out_features, device=scales.device, dtype=scales.dtype))
            rows[prev.out_features - scales.numel() :] *= scales
            row_scale[mapping.prev] = rows

    def awq_clip_quantize(
        self, name: str, weight: Tensor, sigma: Tensor, rows: Tensor | None
    ) -> tuple[QuantizedTensor, float, float]:
        """Clip search and RTN of one Linear, on `sigma`'s device (also for q/k, which llm-awq skips: clipping
        them measured better here, benchmarks/quality.md); its output
        error in the original output coordinates: `rows` undoes a division of its output rows by a later
        mapping's scales."""
        dtype = self.model.model_dtype
        clip = search_clip(sigma, weight, self.spec.scheme, grid=self.options.awq_grid, scale_dtype=dtype)
        qt = rtn_quantize(apply_clip(weight, clip), self.spec.scheme, scale_dtype=dtype)
        row = (rows if rows is not None else torch.ones(weight.shape[0], device=sigma.device)).to(sigma.device).unsqueeze(1)
        reference = weight.to(sigma.device, torch.float32) * row
        quantized = _deployed(qt, self.model, sigma.device).to(torch.float32) * row
        mse, rel = output_error(reference, quantized, sigma)
        return qt, mse, rel


_WEIGHT_OFFSETS: dict[type, float] = {}


def _weight_offset(norm: nn.Module) -> float:
    """0 for norms computing x̂·w (+ b), 1 for those computing x̂·(1 + w) (Gemma): read off the module by
    running a copy with its weight and bias zeroed; once per class (one host sync)."""
    kind = type(norm)
    if kind not in _WEIGHT_OFFSETS:
        probe = copy.deepcopy(norm)
        weight = probe.weight
        assert isinstance(weight, Tensor)
        for tensor in (weight, getattr(probe, "bias", None)):
            if isinstance(tensor, Tensor):
                tensor.data.zero_()
        x = torch.linspace(-1.0, 2.0, weight.shape[-1], device=weight.device, dtype=weight.dtype).unsqueeze(0)
        _WEIGHT_OFFSETS[kind] = 0.0 if bool(probe(x).abs().max() == 0) else 1.0
    return _WEIGHT_OFFSETS[kind]


def _fold_scales(prev: nn.Module, scales: Tensor) -> None:
    """Divide the output of `prev` by `scales`: a norm's weight/bias, or a Linear's output rows (the last
    `scales.numel()` of them: the slice of a fused projection that feeds the scaled Linears)."""
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"cannot fold AWQ scales into {type(prev).__name__}: it has no weight")
    s = scales.to(weight.device, weight.dtype)
    bias = getattr(prev, "bias", None)
    if isinstance(prev, nn.Linear):
        tail = slice(weight.shape[0] - s.numel(), weight.shape[0])
        weight[tail].div_(s.unsqueeze(1))
        if isinstance(bias, Tensor):
            bias[tail].div_(s)
        return
    offset = _weight_offset(prev)
    weight.add_(offset).div_(s).sub_(offset)
    if isinstance(bias, Tensor):
        bias.div_(s)


def _write_dense(sinks: Sequence[CheckpointSink], prefix: str, tensors: dict[str, Tensor], dtype: torch.dtype) -> None:
    """One device→host copy per tensor, shared by every sink (each sink keeps its own private copy)."""
    for name, tensor in tensors.items():
        host = tensor.detach().to("cpu", dtype)
        for sink in sinks:
            sink.add_dense(prefix + name, host)


def _write_layer(
    sinks: Sequence[CheckpointSink], prefix: str, dense: dict[str, Tensor], solved: dict[str, QuantizedTensor],
    dtype: torch.dtype,
) -> None:
    """All tensors of one decoder layer, dense ones first, in a fixed order (the shard layout depends on it)."""
    _write_dense(sinks, prefix, dense, dtype)
    for name, qt in solved.items():
        for sink in sinks:
            sink.add_quantized(prefix + name, qt)


def quantize_model(
    model: LayerwiseModel,
    weights: WeightSource,
    spec: JobSpec,
    sinks: Sequence[CheckpointSink],
    calibration: Tensor | None = None,
    *,
    on_progress: ProgressCallback = no_progress,
    should_cancel: CancelCheck = never_cancel,
    options: PipelineOptions | None = None,
    devices: Sequence[torch.device] | None = None,
) -> PipelineResult:
    """Quantize every decoder layer in order and hand all tensors of the new checkpoint to `sinks`.

    `calibration` is token ids `[samples, seq_len]`; required for GPTQ and AWQ, optional for RTN (with it,
    RTN also reports per-module errors). Raises JobCancelled at a layer boundary when `should_cancel()`.
    `devices` (default: the model's device alone; `devices[0]` must be the model's device): with several,
    the calibration windows are split across them (workers/data_parallel.py).
    """
    # imported here: workers.data_parallel imports this module
    from workers.data_parallel import ShardedActivations, replicate, solve_layer, sync_replicas

    options = options or PipelineOptions()
    num_layers, dtype = model.num_layers, model.model_dtype
    if spec.method is not Method.RTN and calibration is None:
        raise ValueError(f"method {spec.method.value} needs calibration tokens")
    result = PipelineResult()
    cpu = torch.device("cpu")
    prefixes = [model.graph.layer_prefix(index) for index in range(num_layers)]
    with (
        BackgroundWriter(model.device, max_pending=options.max_pending_writes, enabled=options.background_writes) as writer,
        LayerPrefetcher(weights, prefixes, model.device, enabled=options.prefetch_weights) as layers,
        report_precision(options.fast_error_report),
        torch.no_grad(),
        contextlib.ExitStack() as cleanup,
    ):
        for piece in model.dense_pieces():  # under the names the checkpoint uses
            writer.submit(partial(_write_dense, sinks, *model.stored(piece, weights, cpu), dtype))

        activations: Activations | None = None
        sharded: ShardedActivations | None = None
        calls: list[LayerCall] | None = None
        if calibration is not None:
            on_progress(Progress("calibrate", 0, num_layers, message=f"embedding {calibration.shape[0]} windows"))
            hidden = model.embed(calibration, weights, batch_tokens=options.batch_tokens)
            calls = model.layer_calls(calibration.shape[1], weights)
            if devices is not None and len(devices) > 1:
                sharded = ShardedActivations(hidden, calls, devices, options)
                cleanup.callback(sharded.close)  # its per-device threads
            else:
                activations = Activations(hidden, model.device, options)
            del hidden

        quantizer = LayerQuantizer(model, spec, options, result)
        for index in range(num_layers):
            if should_cancel():
                raise JobCancelled(f"cancelled before decoder layer {index} of {num_layers}")
            on_progress(Progress("quantize", index, num_layers))
            layer = model.decoder_layer(index, layers.source(index))
            replicas = replicate(layer, sharded.devices) if sharded is not None else [layer]
            call = calls[index] if calls is not None else None
            if sharded is not None:
                sharded.at_layer(index)
                solved = solve_layer(quantizer, index, replicas, sharded, on_progress)
            else:
                solved = quantizer.solve(index, layer, activations, call, on_progress)
            for name, qt in solved.items():
                linear = _linear(layer, name)
                linear.weight.data = _deployed(qt, model, linear.weight.device)
            if sharded is not None:
                sync_replicas(replicas)
                sharded.forward(replicas, update=True)
            elif activations is not None and call is not None:
                activations.forward(layer, call, update=True)
            quantized_names = {f"{name}.weight" for name in solved}
            dense = {n: t for n, t in layer.state_dict().items() if n not in quantized_names}
            writer.submit(partial(_write_layer, sinks, prefixes[index], dense, solved, dtype))
            del layer, solved, dense, replicas
            release_host_memory()
    return result
