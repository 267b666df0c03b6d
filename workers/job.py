"""One job end to end on a worker: run the engine into a scratch directory, add eval.json and a model card,
upload every file, then write manifest.json LAST.

Execution is at-least-once (a retried or rescued job runs again), so this is idempotent: a re-run writes
the same keys, and because the manifest goes up last a half-uploaded job never looks complete. A re-run on
the same node resumes at the first decoder layer the earlier attempt did not finish (`resume_dir`, node-local:
workers/resume.py) and writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workers.errors import InputError, InvalidSpecError, JobCancelled
from workers.progress import CancelCheck, Progress, ProgressCallback, never_cancel, no_progress
from workers.report import EngineReport
from workers.spec import JobSpec
from workers.storage import ObjectStore, join_key

MANIFEST = "manifest.json"
MODEL_CARD = "README.md"
EVAL_FILE = "eval.json"
MANIFEST_FORMAT = "quantfleet-manifest/1"


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the job's output prefix
    uri: str
    sha256: str
    bytes: int
    kind: str


@dataclass
class JobResult:
    report: EngineReport
    manifest_uri: str
    files: list[StoredFile] = field(default_factory=list)  # every uploaded file, the manifest last


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_kind(path: str) -> str:
    name = Path(path).name
    if name == MANIFEST:
        return "manifest"
    if name == MODEL_CARD:
        return "model_card"
    if name == EVAL_FILE:
        return "eval"
    if name.endswith((".safetensors", ".safetensors.index.json", ".gguf")):  # .gguf: llama.cpp's one file
        return "weights"
    if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
        return "tokenizer"
    if name.endswith(".json"):
        return "config"
    return "other"


def run_job(
    spec: JobSpec,
    store: ObjectStore,
    prefix: str,
    on_progress: ProgressCallback = no_progress,
    should_cancel: CancelCheck = never_cancel,
    work_dir: Path | None = None,
    *,
    base_model: str | None = None,
    calibration_cache: ObjectStore | None = None,
    resume_dir: Path | None = None,
    checkpoint_every: int = 1,
) -> JobResult:
    """Quantize `spec` and publish the result under `prefix` in `store` (see module docstring).

    `calibration_cache`: a store in which prepared calibration tokens are cached by content hash (the
    service's own store), so jobs sharing a model and calibration set tokenize it once. `resume_dir`: where
    finished layers are kept for a retry (default: `<work_dir>/resume/<hash of the output location>`, which
    every attempt of one job shares), the next layer's inputs every `checkpoint_every` layers."""
    from workers import resume
    from workers.calibration_cache import CalibrationCache
    from workers.engine import run_local  # the engine pulls in torch/transformers; import only when running
    from workers.options import PipelineOptions

    if resume_dir is None:
        location = hashlib.sha256(store.uri(prefix).encode()).hexdigest()[:16]
        resume_dir = Path(work_dir or tempfile.gettempdir()) / "resume" / location
        resume.prune(resume_dir.parent)  # state of jobs that never came back (their last attempt failed)
    options = PipelineOptions(resume_dir=resume_dir, checkpoint_every=checkpoint_every)

    scratch = Path(tempfile.mkdtemp(prefix="qf-job-", dir=work_dir))
    try:
        out_dir = scratch / "out"
        out_dir.mkdir()

        def engine_progress(progress: Progress) -> None:
            if progress.stage != "done":  # the job is done only once its manifest is published
                on_progress(progress)

        provider = CalibrationCache(calibration_cache).provider(spec.model_dir) if calibration_cache else None
        try:
            report = run_local(spec, out_dir, engine_progress, should_cancel, options=options,
                               calibration_provider=provider)
        except (JobCancelled, InputError, InvalidSpecError):  # no retry resumes it: a cancel, or bad input
            resume.clear(resume_dir)
            raise
        if not (out_dir / EVAL_FILE).is_file():
            (out_dir / EVAL_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (out_dir / MODEL_CARD).write_text(model_card(spec, report, base_model or Path(spec.model_dir).name))
        return publish(out_dir, store, prefix, on_progress, should_cancel, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish(
    out_dir: Path,
    store: ObjectStore,
    prefix: str,
    on_progress: ProgressCallback,
    should_cancel: CancelCheck,
    report: EngineReport,
) -> JobResult:
    """Upload every file under `out_dir`, then the manifest listing them with sha256 and size."""
    paths = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    stored: list[StoredFile] = []
    for i, path in enumerate(paths):
        if should_cancel():
            raise JobCancelled("cancelled before all artifacts were uploaded")
        rel = path.relative_to(out_dir).as_posix()
        on_progress(Progress(stage="upload", layer=i, num_layers=len(paths), module=rel))
        key = join_key(prefix, rel)
        store.put_file(key, path)
        stored.append(StoredFile(rel, store.uri(key), sha256_file(path), path.stat().st_size, file_kind(rel)))
    if should_cancel():  # last chance for a fenced-off or cancelled attempt not to publish a manifest
        raise JobCancelled("cancelled before the manifest was written")
    manifest = build_manifest(report, stored)
    manifest_key = join_key(prefix, MANIFEST)
    store.put_bytes(manifest_key, manifest)
    digest = hashlib.sha256(manifest).hexdigest()
    stored.append(StoredFile(MANIFEST, store.uri(manifest_key), digest, len(manifest), "manifest"))
    on_progress(Progress(stage="done", message=f"{len(stored)} files published"))
    return JobResult(report=report, manifest_uri=store.uri(manifest_key), files=stored)


def build_manifest(report: EngineReport, files: list[StoredFile]) -> bytes:
    body: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": report.method,
        "bits": report.bits,
        "group_size": report.group_size,
        "symmetric": report.symmetric,
        "formats": report.formats,
        "outputs": report.outputs,  # each format's path, grid, size and evaluation (workers/outputs.py)
        "files": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in files],
    }
    return (json.dumps(body, indent=2) + "\n").encode()


def model_card(spec: JobSpec, report: EngineReport, base_model: str) -> str:
    """Hugging Face style card: YAML front matter (base_model, base_model_relation) plus the numbers."""
    method = report.method.upper()
    sym = "symmetric" if report.symmetric else "asymmetric"
    group = "per channel" if report.group_size == -1 else f"group {report.group_size}"
    tags = ["quantized", report.method, f"{report.bits}-bit", *report.formats, "quantfleet"]
    lines = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "base_model_relation: quantized",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {json.dumps(t)}" for t in tags),
        "---",
        "",
        f"# {base_model} · {method} W{report.bits} ({group}, {sym})",
        "",
        f"Weight-only integer quantization of `{base_model}` ({report.architecture}, {report.num_layers} layers)"
        " produced by QuantFleet.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method} |",
        f"| bits | {report.bits} |",
        f"| group size | {report.group_size} |",
        f"| symmetric | {'yes' if report.symmetric else 'no'} |",
        f"| formats | {', '.join(report.formats)} |",
    ]
    if spec.method.value != "rtn":
        cal = spec.calibration
        lines.append(
            f"| calibration | {cal.num_samples} × {cal.seq_len} tokens from `{Path(cal.path or '').name}` |"
        )
    if report.bytes_original and report.bytes_quantized:
        ratio = report.bytes_original / report.bytes_quantized
        lines.append(
            f"| weights size | {_mib(report.bytes_original)} → {_mib(report.bytes_quantized)} ({ratio:.2f}× smaller) |"
        )
    lines += ["", "## Evaluation", ""]
    ev = report.eval
    if ev is None:
        lines.append("Not evaluated (the job had no eval data).")
    else:
        lines += [
            f"Perplexity over {ev.windows} non-overlapping windows of {ev.seq_len} tokens ({ev.tokens} tokens);"
            " KL divergence and top-1 agreement of the quantized model's next-token distribution vs the original.",
            "",
            "| metric | value |",
            "|---|---|",
            f"| perplexity, original | {ev.ppl_original:.4f} |",
            f"| perplexity, quantized | {ev.ppl_quantized:.4f} |",
            f"| Δ perplexity | {ev.delta_ppl_pct:+.2f} % |",
            f"| KL divergence mean / p99 | {ev.kl_mean:.5f} / {ev.kl_p99:.5f} |",
            f"| top-1 agreement | {ev.top1_agreement:.2%} |",
        ]
    if report.fallback_modules:
        lines += [
            "",
            "Modules that fell back to round-to-nearest:",
            *(f"- {m}" for m in report.fallback_modules),
        ]
    if report.versions:
        lines += [
            "",
            "Written with " + ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items())) + ".",
        ]
    return "\n".join(lines) + "\n"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
