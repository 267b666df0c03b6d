"""The layer loop: quantize a model one decoder layer at a time ("true-sequential"), on one or several devices.

    calibration tokens → embeddings = inputs of layer 0, split by samples over the devices (one: all of them)
    for each layer:  load weights → a copy on every other device → the job's method solves the layer
                     (workers/methods/: it collects the input statistics it needs, one capture forward per
                     device, merged once) → swap in the dequantized weights → every device forwards its shard
                     through the *quantized* layer to make the next layer's inputs → write → free

Because the next inputs come from the quantized layer, every layer is solved for the inputs it will see
at inference time, errors of earlier layers included. Peak memory is one layer (per device), its statistics
and the calibration activations (kept on the accelerator when they fit, else in host memory).

RTN needs no calibration: without calibration tokens the loop only quantizes and writes, layer by layer,
with no forward pass and no error report.

Disk I/O overlaps the compute (PipelineOptions switches, same checkpoint bytes either way): layer i+1's
weights are read on a thread while layer i is solved (workers/prefetch.py), and finished layers are written
on another, in order, at most `max_pending_writes` layers in flight (workers/background_writer.py).

With `PipelineOptions.resume_dir`, finished layers and the next layer's inputs are kept there
(workers/resume.py), and a rerun of the same job starts at the first unfinished layer.

Several grids, one calibration pass: a job's formats may need different grids (compressed-tensors and gptq
share the job scheme's; every GGUF type is a grid of its own, workers/methods/gguf.py). `sinks` then holds
`Output`s, one per grid, in the job's format order. Each layer's statistics are collected once (one capture
forward per device, `LayerWork.statistics`) and every grid is solved from them, on the original weights; each
grid's sinks are written from its own solved weights. The next layer's inputs come from the *first* output's
(the primary's) quantized layer: one stream of activations, one propagating forward per layer. So the
primary's checkpoint is exactly that of a job asking for its format alone, and every other grid is solved for
the inputs the primary's quantized model produces (identical to its own job's at layer 0, not after). A Linear
that the primary quantizes and another output keeps float (GGUF F16) is written from its original weight.
Resume keeps one grid's solved layers: it applies to jobs of the scheme grid alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from workers.activations import ShardedActivations
from workers.background_writer import BackgroundWriter
from workers.devices import replicate, sync_replicas
from workers.errors import JobCancelled
from workers.loading import LayerCall, LayerwiseModel, WeightSource
from workers.memory import release_host_memory
from workers.methods import method_for
from workers.methods.base import LayerWork, PipelineResult, QuantMethod
from workers.moe import Solver, solve_layer
from workers.options import PipelineOptions
from workers.output_error import report_precision
from workers.prefetch import LayerPrefetcher
from workers.progress import CancelCheck, Progress, ProgressCallback, never_cancel, no_progress
from workers.quant.grid import QuantizedTensor
from workers.report import ModuleError
from workers.resume import LayerCheckpoints, fingerprint
from workers.spec import JobSpec, Method

__all__ = ["CheckpointSink", "Grid", "Output", "PipelineOptions", "PipelineResult", "quantize_model"]

log = logging.getLogger(__name__)

Q = TypeVar("Q", contravariant=True)


class CheckpointSink(Protocol[Q]):
    """Where finished tensors go (workers.formats.writer.CheckpointWriter; GGUF: workers.formats.gguf.GGUFFile)."""

    def add_dense(self, name: str, tensor: Tensor) -> None: ...
    def add_quantized(self, module_name: str, qt: Q) -> None: ...


class Grid(Solver, Protocol):
    """A grid other than the job scheme's, solved from the same layer statistics (workers/methods/gguf.py)."""

    result: PipelineResult  # its module errors and fallbacks

    def deployed(self, qt: Any, work: LayerWork, device: torch.device) -> Tensor: ...


@dataclass
class Output:
    """The sinks written from one grid's solved weights; `grid` None: the job's method on its scheme."""

    sinks: Sequence[CheckpointSink[Any]]
    grid: Grid | None = None


Keep = Callable[[dict[str, Tensor], dict[str, QuantizedTensor]], None]
LayerPart = tuple[Sequence[CheckpointSink[Any]], dict[str, Tensor], Mapping[str, Any]]  # sinks, dense, solved


def _outputs(sinks: Sequence[CheckpointSink[Any] | Output]) -> list[Output]:
    """Plain sinks form the scheme grid's Output, at the place of the first of them; Outputs stay as they are."""
    outputs: list[Output] = []
    scheme: list[CheckpointSink[Any]] = []
    for sink in sinks:
        if isinstance(sink, Output):
            outputs.append(sink)
        else:
            if not scheme:
                outputs.append(Output(scheme))
            scheme.append(sink)
    if not outputs:
        raise ValueError("quantize_model needs at least one sink")
    return outputs


def _write_dense(
    sinks: Sequence[CheckpointSink[Any]], prefix: str, tensors: dict[str, Tensor], dtype: torch.dtype,
    hosts: dict[int, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One device→host copy per tensor, shared by every sink (each sink keeps its own private copy) and, through
    `hosts` (id → copy), by the outputs of one layer."""
    hosts = {} if hosts is None else hosts
    written = {}
    for name, tensor in tensors.items():
        host = hosts.get(id(tensor))
        if host is None:
            hosts[id(tensor)] = host = tensor.detach().to("cpu", dtype)
        written[name] = host
        for sink in sinks:
            sink.add_dense(prefix + name, host)
    return written


def _write_layer(parts: Sequence[LayerPart], prefix: str, dtype: torch.dtype, keep: Keep | None = None) -> None:
    """All tensors of one decoder layer, output by output, dense ones first, in a fixed order (the shard layout
    depends on it); then `keep(dense as written, solved)` of the first output (the resume state)."""
    hosts: dict[int, Tensor] = {}
    written: dict[str, Tensor] = {}
    for i, (sinks, dense, solved) in enumerate(parts):
        copies = _write_dense(sinks, prefix, dense, dtype, hosts)
        written = copies if i == 0 else written
        for name, qt in solved.items():
            for sink in sinks:
                sink.add_quantized(prefix + name, qt)
    if keep is not None:
        keep(written, dict(parts[0][2]))


def _checkpoints(
    model: LayerwiseModel, spec: JobSpec, options: PipelineOptions, calibration: Tensor | None, devices: int
) -> LayerCheckpoints | None:
    if options.resume_dir is None:
        return None
    shaping = {k: v for k, v in dataclasses.asdict(options).items() if k not in PipelineOptions.RESUME_FIELDS}
    key = fingerprint(spec, shaping, calibration, devices)
    return LayerCheckpoints(options.resume_dir, key, model.num_layers, options.checkpoint_every)


def _keep_layer(
    checkpoints: LayerCheckpoints, index: int, result: PipelineResult
) -> Keep:
    """The resume state's copy of layer `index`, with the module errors it recorded."""
    errors = [e for e in result.module_errors if e.layer == index]
    fallbacks = [f for f in result.fallback_modules if f.startswith(f"layers.{index}.")]
    return partial(_save_layer, checkpoints, index, errors=errors, fallbacks=fallbacks)


def _save_layer(
    checkpoints: LayerCheckpoints, index: int, dense: dict[str, Tensor], solved: dict[str, QuantizedTensor], *,
    errors: list[ModuleError], fallbacks: list[str],
) -> None:
    checkpoints.save_layer(index, dense, solved, errors, fallbacks)


def _replay_layer(sinks: Sequence[CheckpointSink[Any]], prefix: str, checkpoints: LayerCheckpoints, index: int,
                  dtype: torch.dtype) -> None:
    """Hand a layer finished by an earlier run to the writers again, exactly as it was handed then."""
    dense, solved = checkpoints.restore_layer(index)
    _write_layer([(sinks, dense, solved)], prefix, dtype)


def _check_grids(spec: JobSpec, outputs: Sequence[Output]) -> None:
    """Several grids are solved from one layer's statistics: on its original weights by gptq or rtn, or on the
    layer AWQ smoothed once, with the first grid's scale search (workers/methods/awq.py `smooth`); no other
    smoothing, no per-group grids."""
    several = len(outputs) > 1 or outputs[0].grid is not None
    if several and (spec.method not in (Method.GPTQ, Method.RTN, Method.AWQ) or spec.smoothquant is not None
                    or spec.mixed_precision is not None or spec.kv_cache_fp8):
        raise ValueError("several grids (GGUF types beside the scheme) are solved by plain gptq, rtn or awq only")


def _solve_outputs(method: QuantMethod, work: LayerWork, outputs: Sequence[Output]) -> list[dict[str, Any]]:
    """Every output's solved Linears of this layer, each grid from the same statistics and original weights."""
    return solve_layer([(method, work.result) if out.grid is None else (out.grid, out.grid.result) for out in outputs],
                       work)


def _install(work: LayerWork, output: Output, solved: Mapping[str, Any]) -> None:
    """Swap the primary's dequantized weights into the layer: the next layer's inputs are made with them."""
    for name, qt in solved.items():
        linear = work.linear(name)
        if output.grid is None:
            linear.weight.data = work.deployed(qt, linear.weight.device)
        else:
            linear.weight.data = output.grid.deployed(qt, work, linear.weight.device)


def _originals(layer: torch.nn.Module, solved: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Original weights of the Linears the primary quantizes and some other output keeps float."""
    float_somewhere = {name for name in solved[0] if any(name not in other for other in solved[1:])}
    state = layer.state_dict()
    return {f"{name}.weight": state[f"{name}.weight"].detach().clone() for name in float_somewhere}


def _layer_parts(
    layer: torch.nn.Module, outputs: Sequence[Output], solved: Sequence[Mapping[str, Any]], originals: dict[str, Tensor]
) -> list[LayerPart]:
    """(sinks, dense tensors, solved Linears) of each output, dense in the layer's state_dict order."""
    state = layer.state_dict()
    parts: list[LayerPart] = []
    for out, own in zip(outputs, solved, strict=True):
        quantized = {f"{name}.weight" for name in own}
        dense = {n: originals.get(n, t) for n, t in state.items() if n not in quantized}
        parts.append((out.sinks, dense, own))
    return parts


def quantize_model(
    model: LayerwiseModel,
    weights: WeightSource,
    spec: JobSpec,
    sinks: Sequence[CheckpointSink[Any] | Output],
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
    the calibration windows are split across them (workers/devices.py). `sinks`: plain sinks take the job
    scheme's solved weights; an `Output` takes its grid's (see the module docstring), the first one propagates.
    Returns the scheme grid's errors (a `Grid` keeps its own in `grid.result`).
    """
    options = options or PipelineOptions()
    num_layers, dtype = model.num_layers, model.model_dtype
    if spec.method is not Method.RTN and calibration is None:
        raise ValueError(f"method {spec.method.value} needs calibration tokens")
    outputs = _outputs(sinks)
    _check_grids(spec, outputs)
    all_sinks = [sink for out in outputs for sink in out.sinks]
    method, result = method_for(spec), PipelineResult()
    devices = list(devices or [model.device])
    prefixes = [model.graph.layer_prefix(index) for index in range(num_layers)]
    scheme_alone = len(outputs) == 1 and outputs[0].grid is None
    checkpoints = _checkpoints(model, spec, options, calibration, len(devices)) if scheme_alone else None
    if options.resume_dir is not None and not scheme_alone:
        log.info("no resume state for a job of several grids or a GGUF grid: it starts at layer 0 when rerun")
    first, resumed_inputs = checkpoints.start() if checkpoints is not None else (0, None)
    with (
        BackgroundWriter(model.device, max_pending=options.max_pending_writes, enabled=options.background_writes) as writer,
        LayerPrefetcher(weights, prefixes, model.device, enabled=options.prefetch_weights) as layers,
        report_precision(options.fast_error_report),
        torch.no_grad(),
        contextlib.ExitStack() as cleanup,
    ):
        for piece in model.dense_pieces():  # under the names the checkpoint uses
            writer.submit(partial(_write_dense, all_sinks, *model.stored(piece, weights, torch.device("cpu")), dtype))
        if first > 0 and checkpoints is not None:
            message = f"resuming at decoder layer {first} of {num_layers}: layers 0-{first - 1} kept by an earlier run"
            log.info("%s (%s)", message, checkpoints.dir)
            on_progress(Progress("resume", first, num_layers, message=message))
            for index in range(first):
                errors, fallbacks = checkpoints.restore_report(index)
                result.module_errors += errors
                result.fallback_modules += fallbacks
                writer.submit(partial(_replay_layer, all_sinks, prefixes[index], checkpoints, index, dtype))

        acts: ShardedActivations | None = None
        if calibration is not None:
            calls: list[LayerCall] = model.layer_calls(calibration.shape[1], weights)
            if resumed_inputs is None:
                on_progress(Progress("calibrate", 0, num_layers, message=f"embedding {calibration.shape[0]} windows"))
                resumed_inputs = model.embed(calibration, weights, batch_tokens=options.batch_tokens)
            acts = ShardedActivations(resumed_inputs, calls, devices, options)
            del resumed_inputs
            cleanup.callback(acts.close)  # its per-device threads

        for index in range(first, num_layers):
            if should_cancel():
                raise JobCancelled(f"cancelled before decoder layer {index} of {num_layers}")
            on_progress(Progress("quantize", index, num_layers))
            layer = model.decoder_layer(index, layers.source(index))
            replicas = replicate(layer, devices if acts is not None else devices[:1])
            if acts is not None:
                acts.at_layer(index)
            work = LayerWork(index, replicas, acts, model, spec, options, result, on_progress, wanted=method.statistics)
            # MoE layers: expert passes within a memory budget (workers/moe.py); every grid from one capture
            solved = _solve_outputs(method, work, outputs)
            originals = _originals(layer, solved) if len(outputs) > 1 else {}
            _install(work, outputs[0], solved[0])
            if acts is not None:
                sync_replicas(replicas)
                acts.forward(replicas, update=True)
            parts = _layer_parts(layer, outputs, solved, originals)
            keep = _keep_layer(checkpoints, index, result) if checkpoints is not None else None
            writer.submit(partial(_write_layer, parts, prefixes[index], dtype, keep))
            if checkpoints is not None and checkpoints.due(index):  # after the layer's own write, in order
                hidden = acts.gather(torch.device("cpu")) if acts is not None else None
                writer.submit(partial(checkpoints.save_inputs, index + 1, hidden))
            del layer, solved, originals, parts, replicas, work
            release_host_memory()
    return result
