"""`run_local`: one quantization job on this machine, from a model directory to a finished output directory.

Order of work: validate everything that can be validated cheaply (spec, config, shapes, files) before
any weight is read; build the whole output in a hidden sibling directory; rename it to `out_dir` only
when every file (checkpoints, tokenizer, eval.json) is complete. A failure or cancellation removes the
staging directory, so an `out_dir` that exists is always a finished job.

Layout: the first format in `spec.formats` at the root of `out_dir`, every other format in
`out_dir/<format>/` (e.g. `out_dir/gptq/`), each with the tokenizer files, GGUF files as
`gguf-<TYPE>/model-<TYPE>.gguf` (workers/outputs.py); `out_dir/eval.json` is the EngineReport. Every format
comes from one calibration pass: the formats' grids are solved from the same layer statistics
(workers/pipeline.py), and each grid is evaluated (`outputs` in eval.json; `eval` is the first format's).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import compressed_tensors
import torch
import transformers

from workers import auto, mixed_precision, resume
from workers.calibration import calibration_windows
from workers.calibration_cache import CalibrationProvider
from workers.devices import resolve_devices
from workers.errors import InputError
from workers.evaluate import compare_on_windows, evaluate_many
from workers.formats.mixed_precision import schemes_from_config
from workers.loading import CheckpointWeights, LayerwiseModel, load_tokenizer
from workers.memory import PeakMemory
from workers.outputs import JobOutputs
from workers.pipeline import PipelineOptions, PipelineResult, quantize_model
from workers.progress import CancelCheck, Progress, ProgressCallback, never_cancel, no_progress
from workers.quant.gptq import warm_up
from workers.report import EngineReport
from workers.spec import JobSpec, Method, OutputFormat
from workers.tensor_source import TensorSource
from workers.validation import ModelInfo, check_against_model

REPORT_FILE = "eval.json"


def versions(spec: JobSpec | None = None) -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    found = {
        "quantfleet": version("quantfleet"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    formats = spec.formats if spec is not None else (OutputFormat.COMPRESSED_TENSORS,)
    if any(not f.is_gguf for f in formats):  # the packages whose layouts the job's files follow
        found["compressed-tensors"] = compressed_tensors.__version__
    if any(f.is_gguf for f in formats):
        found["gguf"] = version("gguf")
    return found


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"output directory {out_dir} already exists and is not empty; choose a new path or remove it")


def _publish(staging: Path, out_dir: Path) -> None:
    """Atomically move the finished staging directory to `out_dir` (an empty `out_dir` is replaced)."""
    if out_dir.exists():
        out_dir.rmdir()  # check_out_dir guaranteed it is empty
    staging.replace(out_dir)


def run_local(
    spec: JobSpec,
    out_dir: str | Path,
    on_progress: ProgressCallback = no_progress,
    should_cancel: CancelCheck = never_cancel,
    *,
    options: PipelineOptions | None = None,
    calibration_provider: CalibrationProvider | None = None,
) -> EngineReport:
    """Quantize `spec.model_dir` into `out_dir` and evaluate it; returns the report also saved as eval.json.

    `calibration_provider` replaces `calibration_windows` (same arguments, same result), e.g. with the
    object-store cache of workers/calibration_cache.py that lets the jobs of a batch tokenize once."""
    started = time.perf_counter()
    spec.validate()
    info = check_against_model(spec)
    out_dir = Path(out_dir).resolve()
    check_out_dir(out_dir)
    devices = resolve_devices(spec.device, spec.devices)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        report = _build(spec, info, staging, devices, on_progress, should_cancel, options, calibration_provider)
        report.timings_s["total"] = time.perf_counter() - started
        report.files = sorted([*(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()), REPORT_FILE])
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    resume.clear(options.resume_dir if options else None)  # the job is done: its per-layer resume state goes
    on_progress(Progress("done", message=str(out_dir)))
    return report


log = logging.getLogger(__name__)


def _start_warm_up(spec: JobSpec, devices: list[torch.device], dtype: torch.dtype) -> threading.Thread | None:
    """GPTQ on CUDA: compile the sweep and create solver handles on each device while the text is tokenized."""
    if not spec.method.sweeps or devices[0].type != "cuda":
        return None

    def run() -> None:
        for device in dict.fromkeys(devices):
            try:
                with torch.cuda.device(device):
                    log.debug("GPTQ warm-up on %s took %.2f s", device, warm_up(device, spec.scheme, dtype))
            except Exception:  # a warm-up problem must not fail the job; the real solve reports real errors
                log.warning("GPTQ warm-up on %s failed", device, exc_info=True)

    thread = threading.Thread(target=run, name="qf-warm-up", daemon=True)
    thread.start()
    return thread


def _build(
    spec: JobSpec,
    info: ModelInfo,
    staging: Path,
    devices: list[torch.device],
    on_progress: ProgressCallback,
    should_cancel: CancelCheck,
    options: PipelineOptions | None,
    calibration_provider: CalibrationProvider | None = None,
) -> EngineReport:
    report = EngineReport(
        model=str(info.model_dir),
        architecture=info.architecture.name,
        method=spec.method.value,
        bits=spec.scheme.bits,
        group_size=spec.scheme.group_size,
        symmetric=spec.scheme.symmetric,
        formats=[f.value for f in spec.formats],
        num_layers=info.num_layers,
        bytes_original=info.weight_bytes,
        versions=versions(spec),
    )
    timings = report.timings_s
    device = devices[0]  # the model, evaluation and peak memory live here; calibration spans all devices
    with PeakMemory(device) as memory:
        warming = _start_warm_up(spec, devices, info.dtype)
        mark = time.perf_counter()
        on_progress(Progress("load", num_layers=info.num_layers, message=str(info.model_dir)))
        model = LayerwiseModel(info.model_dir, device)
        weights = CheckpointWeights(TensorSource(info.model_dir, allow_pickle=spec.allow_pickle))
        tokenizer = load_tokenizer(info.model_dir) if spec.calibration.path or spec.eval else None
        timings["load"] = time.perf_counter() - mark

        mark = time.perf_counter()
        calibration, holdout = None, None
        if spec.calibration.path and tokenizer is not None and _calibrates(spec):
            on_progress(Progress("calibrate", num_layers=info.num_layers, message="tokenizing calibration text"))
            provide = calibration_provider or calibration_windows
            if spec.method is Method.AUTO:
                drawn = provide(auto.with_holdout(spec.calibration), tokenizer)
                calibration, holdout = auto.split_holdout(drawn, spec.calibration.num_samples)
            else:
                calibration = provide(spec.calibration, tokenizer)
        timings["calibrate"] = time.perf_counter() - mark

        mark = time.perf_counter()
        if warming is not None:
            warming.join()
        timings["write"] = 0.0  # the writes of `build`, inside the quantize step
        spec, measured = _mixed_precision_allocation(spec, model, weights, calibration, options, on_progress)
        build = partial(_quantize_into, model=model, weights=weights, info=info, calibration=calibration,
                        devices=devices, on_progress=on_progress, should_cancel=should_cancel, options=options,
                        timings=timings)
        if spec.method is Method.AUTO and holdout is not None:
            outputs, result = _choose_candidate(spec, info, staging, build, holdout, report, device, on_progress, should_cancel)
        else:
            outputs, result = build(spec, staging)
        report.module_errors, report.fallback_modules = outputs.module_errors(result), outputs.fallback_modules(result)
        timings["quantize"] = time.perf_counter() - mark - timings["write"]
        report.bytes_quantized, report.bits_per_weight = outputs.size(spec.formats[0])
        if spec.mixed_precision is not None:
            report.mixed_precision = _mixed_precision_report(spec, info, outputs.paths[0], measured)

        metrics = None
        if spec.eval is not None and tokenizer is not None:
            mark = time.perf_counter()
            batch = options.batch_tokens if options else PipelineOptions().batch_tokens
            metrics = evaluate_many(  # every grid in one pass of the original model
                info.model_dir, outputs.eval_sources(), spec.eval, tokenizer, device, on_progress,
                batch_tokens=batch, should_cancel=should_cancel,
            )
            report.eval = metrics[0]  # the primary format's
            timings["evaluate"] = time.perf_counter() - mark
        report.outputs = outputs.summary(metrics)
    report.peak_memory_bytes = memory.result()
    return report


def _calibrates(spec: JobSpec) -> bool:
    """RTN on GGUF grids alone reads no calibration (llama.cpp's own rules): its text is not even tokenized."""
    return not (spec.method is Method.RTN and all(f.is_gguf for f in spec.formats))


def _quantize_into(
    spec: JobSpec, root: Path, *, model: LayerwiseModel, weights: CheckpointWeights, info: ModelInfo,
    calibration: torch.Tensor | None, devices: list[torch.device], on_progress: ProgressCallback,
    should_cancel: CancelCheck, options: PipelineOptions | None, timings: dict[str, float],
) -> tuple[JobOutputs, PipelineResult]:
    """Quantize with `spec` and write every format of it under `root` (workers/outputs.py: layout, grids)."""
    outputs = JobOutputs(spec, info, root).open()
    try:
        result = quantize_model(
            model, weights, spec, outputs.sinks(), calibration,
            on_progress=on_progress, should_cancel=should_cancel, options=options, devices=devices,
        )
        mark = time.perf_counter()
        on_progress(Progress("write", message=str(root)))
        outputs.finalize()
    except BaseException:
        outputs.abort()
        raise
    timings["write"] += time.perf_counter() - mark
    return outputs, result


def _mixed_precision_allocation(
    spec: JobSpec, model: LayerwiseModel, weights: CheckpointWeights, calibration: torch.Tensor | None,
    options: PipelineOptions | None, on_progress: ProgressCallback,
) -> tuple[JobSpec, list[mixed_precision.GroupChoice]]:
    """Mixed precision by sensitivity: `spec` with the greedy allocation on each group's measured errors (one
    extra forward pass through the original model, workers/mixed_precision.py), and the measurements."""
    if spec.mixed_precision is None or not spec.mixed_precision.by_sensitivity:
        return spec, []
    if calibration is None:
        raise InputError("mixed precision by sensitivity needs calibration text")
    measured = mixed_precision.measure(model, weights, spec, calibration, options=options, on_progress=on_progress)
    return mixed_precision.with_allocation(spec, measured)[0], measured


def _mixed_precision_report(
    spec: JobSpec, info: ModelInfo, directory: Path, measured: list[mixed_precision.GroupChoice]
) -> dict[str, Any]:
    """eval.json's allocation, read back from the checkpoint's config groups."""
    written = schemes_from_config(json.loads((directory / "config.json").read_text())["quantization_config"])
    shapes = {name: shape for name, (_, shape) in TensorSource(info.model_dir).headers().items()}
    in_features = {m: shapes[f"{m}.weight"][1] for m in written}
    counts = {m: shapes[f"{m}.weight"][0] * shapes[f"{m}.weight"][1] for m in written}
    return mixed_precision.report(spec, written, in_features, counts, measured)


def _choose_candidate(
    spec: JobSpec, info: ModelInfo, staging: Path, build: Callable[[JobSpec, Path], tuple[JobOutputs, PipelineResult]],
    holdout: torch.Tensor, report: EngineReport, device: torch.device, on_progress: ProgressCallback,
    should_cancel: CancelCheck,
) -> tuple[JobOutputs, PipelineResult]:
    """Method auto (workers/auto.py): every candidate into a folder of its own, the best moved into `staging`."""
    pool = staging / ".candidates"
    built: dict[str, tuple[auto.Candidate, list[Path], PipelineResult, float]] = {}
    started = time.perf_counter()
    for candidate in auto.candidates(spec):
        if not auto.fits_budget(time.perf_counter() - started, len(built), spec.auto_budget_s):
            log.info("method auto: %s skipped, the time budget of %s s would be exceeded", candidate.name, spec.auto_budget_s)
            continue
        on_progress(Progress("quantize", message=f"auto candidate {candidate.name}"))
        mark = time.perf_counter()
        outputs, result = build(candidate.spec(spec), pool / str(len(built)))
        built[candidate.name] = (candidate, outputs.paths, result, time.perf_counter() - mark)
    on_progress(Progress("evaluate", message=f"held-out KL of {len(built)} candidates on {holdout.shape[0]} windows"))
    metrics = compare_on_windows(
        spec.model_dir, [dirs[0] for _, dirs, _, _ in built.values()], holdout, device, should_cancel=should_cancel
    )
    kl = {name: m.kl_mean for name, m in zip(built, metrics, strict=True)}
    chosen = auto.choose(kl)
    candidate, dirs, result, _ = built[chosen]
    for child in dirs[0].iterdir():
        child.replace(staging / child.name)
    shutil.rmtree(pool)
    report.method = candidate.method.value
    report.auto = {
        "chosen": chosen,
        "holdout_windows": int(holdout.shape[0]),
        "budget_s": spec.auto_budget_s,
        "candidates": [
            {"name": name, "method": c.method.value, "observer": c.observer, "kl_mean": m.kl_mean,
             "top1_agreement": m.top1_agreement, "delta_ppl_pct": m.delta_ppl_pct, "seconds": round(seconds, 2)}
            for (name, (c, _, _, seconds)), m in zip(built.items(), metrics, strict=True)
        ],
        "skipped": [c.name for c in auto.candidates(spec) if c.name not in built],
    }
    return JobOutputs(spec, info, staging), result  # the chosen candidate's files, now in `staging`
