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
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from workers.activations import ShardedActivations
from workers.background_writer import BackgroundWriter
from workers.devices import replicate, sync_replicas
from workers.errors import JobCancelled
from workers.loading import LayerCall, LayerwiseModel, WeightSource
from workers.memory import release_host_memory
from workers.methods import method_for
from workers.methods.base import LayerWork, PipelineResult
from workers.moe import solve_layer
from workers.options import PipelineOptions
from workers.output_error import report_precision
from workers.prefetch import LayerPrefetcher
from workers.progress import CancelCheck, Progress, ProgressCallback, never_cancel, no_progress
from workers.quant.grid import QuantizedTensor
from workers.report import ModuleError
from workers.resume import LayerCheckpoints, fingerprint
from workers.spec import JobSpec, Method

__all__ = ["CheckpointSink", "PipelineOptions", "PipelineResult", "quantize_model"]

log = logging.getLogger(__name__)


class CheckpointSink(Protocol):
    """Where finished tensors go (workers.formats.writer.CheckpointWriter)."""

    def add_dense(self, name: str, tensor: Tensor) -> None: ...
    def add_quantized(self, module_name: str, qt: QuantizedTensor) -> None: ...


Keep = Callable[[dict[str, Tensor], dict[str, QuantizedTensor]], None]


def _write_dense(
    sinks: Sequence[CheckpointSink], prefix: str, tensors: dict[str, Tensor], dtype: torch.dtype
) -> dict[str, Tensor]:
    """One device→host copy per tensor, shared by every sink (each sink keeps its own private copy)."""
    written = {}
    for name, tensor in tensors.items():
        written[name] = host = tensor.detach().to("cpu", dtype)
        for sink in sinks:
            sink.add_dense(prefix + name, host)
    return written


def _write_layer(
    sinks: Sequence[CheckpointSink], prefix: str, dense: dict[str, Tensor], solved: dict[str, QuantizedTensor],
    dtype: torch.dtype, keep: Keep | None = None,
) -> None:
    """All tensors of one decoder layer, dense ones first, in a fixed order (the shard layout depends on it);
    then `keep(dense as written, solved)` (the resume state)."""
    written = _write_dense(sinks, prefix, dense, dtype)
    for name, qt in solved.items():
        for sink in sinks:
            sink.add_quantized(prefix + name, qt)
    if keep is not None:
        keep(written, solved)


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


def _replay_layer(sinks: Sequence[CheckpointSink], prefix: str, checkpoints: LayerCheckpoints, index: int,
                  dtype: torch.dtype) -> None:
    """Hand a layer finished by an earlier run to the writers again, exactly as it was handed then."""
    dense, solved = checkpoints.restore_layer(index)
    _write_layer(sinks, prefix, dense, solved, dtype)


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
    the calibration windows are split across them (workers/devices.py).
    """
    options = options or PipelineOptions()
    num_layers, dtype = model.num_layers, model.model_dtype
    if spec.method is not Method.RTN and calibration is None:
        raise ValueError(f"method {spec.method.value} needs calibration tokens")
    method, result = method_for(spec), PipelineResult()
    devices = list(devices or [model.device])
    prefixes = [model.graph.layer_prefix(index) for index in range(num_layers)]
    checkpoints = _checkpoints(model, spec, options, calibration, len(devices))
    first, resumed_inputs = checkpoints.start() if checkpoints is not None else (0, None)
    with (
        BackgroundWriter(model.device, max_pending=options.max_pending_writes, enabled=options.background_writes) as writer,
        LayerPrefetcher(weights, prefixes, model.device, enabled=options.prefetch_weights) as layers,
        report_precision(options.fast_error_report),
        torch.no_grad(),
        contextlib.ExitStack() as cleanup,
    ):
        for piece in model.dense_pieces():  # under the names the checkpoint uses
            writer.submit(partial(_write_dense, sinks, *model.stored(piece, weights, torch.device("cpu")), dtype))
        if first > 0 and checkpoints is not None:
            message = f"resuming at decoder layer {first} of {num_layers}: layers 0-{first - 1} kept by an earlier run"
            log.info("%s (%s)", message, checkpoints.dir)
            on_progress(Progress("resume", first, num_layers, message=message))
            for index in range(first):
                errors, fallbacks = checkpoints.restore_report(index)
                result.module_errors += errors
                result.fallback_modules += fallbacks
                writer.submit(partial(_replay_layer, sinks, prefixes[index], checkpoints, index, dtype))

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
            work = LayerWork(index, replicas, acts, model, spec, options, result, on_progress)
            solved = solve_layer(method, work)  # MoE layers: expert passes within a memory budget (workers/moe.py)
            for name, qt in solved.items():
                linear = work.linear(name)
                linear.weight.data = work.deployed(qt, linear.weight.device)
            if acts is not None:
                sync_replicas(replicas)
                acts.forward(replicas, update=True)
            quantized_names = {f"{name}.weight" for name in solved}
            dense = {n: t for n, t in layer.state_dict().items() if n not in quantized_names}
            keep = _keep_layer(checkpoints, index, result) if checkpoints is not None else None
            writer.submit(partial(_write_layer, sinks, prefixes[index], dense, solved, dtype, keep))
            if checkpoints is not None and checkpoints.due(index):  # after the layer's own write, in order
                hidden = acts.gather(torch.device("cpu")) if acts is not None else None
                writer.submit(partial(checkpoints.save_inputs, index + 1, hidden))
            del layer, solved, dense, replicas, work
            release_host_memory()
    return result
