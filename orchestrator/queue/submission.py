"""Checks a submitted job before a row is written: URIs inside the allow-list and present, the engine's
own spec rules, the model-dependent rules of workers.validation (for local models), and that an
output.uri lies in the submitting owner's own folder (orchestrator.queue.outputs).

Raises InvalidSpecError / InputError with the engine's message; the API turns them into 422s. For a local
model, returns the engine's preflight plan (workers.preflight.JobPlan as a dict), which the job stores.
S3 models are only probed for config.json here (downloading a model to validate a request would make
submission slow and expensive); the worker runs the full model check before quantizing.

Messages name only what the caller sent: the allowed folders are not listed (only the setting that names
them), and a server path the engine's message carries (a symlink's target, the object store, an allowed
root the caller did not name) is shown as the caller's own URI or as a placeholder.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

from orchestrator.queue.outputs import check_output_uri
from orchestrator.queue.specs import engine_spec
from orchestrator.settings import Settings
from workers.errors import InputError, InvalidSpecError
from workers.uris import InputPolicy, LocalInput, check_parsed_input_exists, parse_input_uri


class _PublicPolicy(InputPolicy):
    """The policy, described without the server's folders."""

    setting: ClassVar[str] = "QF_ALLOWED_ROOTS"

    def describe(self) -> str:
        buckets = ", ".join(f"s3://{b}" for b in self.allowed_buckets) or "none"
        return (
            f"local paths must lie in a folder named by the service's {self.setting}, which its operator "
            f"can tell you; allowed buckets: {buckets}"
        )


class _PublicOutputPolicy(_PublicPolicy):
    setting: ClassVar[str] = "QF_ALLOWED_OUTPUT_ROOTS"


def _public(policy: InputPolicy, kind: type[_PublicPolicy]) -> _PublicPolicy:
    return kind(policy.allowed_roots, policy.allowed_buckets, policy.s3_endpoint_url)


def _without_server_paths(
    message: str, sent: list[str], resolved: dict[str, str], hidden: dict[str, str]
) -> str:
    """`message` with each resolved input path shown as the URI the caller gave for it, and each server
    folder the caller did not name themselves as a placeholder."""
    for path, given in sorted(resolved.items(), key=lambda kv: -len(kv[0])):
        if path not in given:
            message = message.replace(path, given)
    for path, placeholder in sorted(hidden.items(), key=lambda kv: -len(kv[0])):
        if path and path != "/" and not any(path in value for value in sent):
            message = message.replace(path, placeholder)
    return message


def _server_folders(settings: Settings) -> dict[str, str]:
    folders: dict[str, str] = {}
    for placeholder, paths in (
        ("<allowed folder>", [*settings.allowed_roots, *settings.allowed_output_roots]),
        ("<object store>", [] if "://" in settings.object_store else [Path(settings.object_store)]),
        ("<server folder>", [settings.cache_dir, settings.work_dir, Path.cwd()]),
    ):
        for path in paths:
            folders[str(path)] = placeholder
            folders[str(Path(path).resolve())] = placeholder
    return folders


def validate_submission(spec: dict[str, Any], settings: Settings, *, owner: str) -> dict[str, Any] | None:
    """`owner`: who the job will belong to (its output.uri must lie in that owner's folder). Returns the
    preflight plan of a local model (None for a model the worker downloads: it is not read here)."""
    resolved: dict[str, str] = {}
    sent: list[str] = []
    try:
        return _validate(spec, settings, owner, resolved, sent)
    except (InputError, InvalidSpecError) as e:
        message = _without_server_paths(str(e), sent, resolved, _server_folders(settings))
        if message == str(e):
            raise
        raise type(e)(message) from e


def _validate(
    spec: dict[str, Any], settings: Settings, owner: str, resolved: dict[str, str], sent: list[str]
) -> dict[str, Any] | None:
    policy = _public(settings.input_policy(), _PublicPolicy)
    model_is_local = True

    def resolve(uri: str, kind: str, what: str) -> str:
        nonlocal model_is_local
        sent.append(uri)
        try:
            parsed = parse_input_uri(uri, policy, what=what)
            if isinstance(parsed, LocalInput):
                resolved[str(parsed.path)] = uri.removeprefix("file://")
            found = check_parsed_input_exists(uri, parsed, policy, kind=kind, what=what)
        except OSError as e:  # e.g. a path segment over 255 bytes: the file system's answer, as a 422
            raise InputError(f"{what} path {uri!r} cannot be used: {e.strerror or e}") from e
        if isinstance(found, LocalInput):
            return str(found.path)
        if what == "model":
            model_is_local = False
        return uri  # not read here: the worker downloads it

    output_uri = (spec.get("output") or {}).get("uri")
    if output_uri:
        sent.append(output_uri)
        try:
            output_policy = _public(settings.output_policy(), _PublicOutputPolicy)
            check_output_uri(output_uri, owner, output_policy, settings.object_store)
        except OSError as e:
            raise InputError(f"output path {output_uri!r} cannot be used: {e.strerror or e}") from e
    job = engine_spec(spec, resolve)
    if not model_is_local:
        return None
    _check_model_size(Path(job.model_dir), settings.max_model_bytes)
    return _checked_against_model(job)  # the plan names no path: nothing of the server's to hide


def preload_model_checks() -> None:
    """Import what the model check runs on (torch, transformers and the engine's model readers): seconds of
    CPU that a server's first submit would otherwise spend, while it is being waited for. The API does it
    at startup, before it serves."""
    import workers.moe  # noqa: F401
    import workers.preflight  # noqa: F401
    import workers.tensor_source  # noqa: F401
    import workers.validation  # noqa: F401


MODEL_CHECKS_KEPT = 256
_passed_model_checks: OrderedDict[tuple[str, tuple[Any, ...]], str] = OrderedDict()  # the plans as JSON
_passed_lock = threading.Lock()


def _files_signature(job: Any) -> tuple[Any, ...]:
    """What the model check reads, as (name, size, mtime) of every file of the model folder and the text
    inputs: a changed, added or removed file gives another signature."""
    model_dir = Path(job.model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    texts = [Path(p) for p in (job.calibration.path, job.eval.path if job.eval else None) if p]
    return tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in [*files, *texts])


def _checked_against_model(job: Any) -> dict[str, Any]:
    """The preflight (workers.preflight.plan_job: workers.validation.check_against_model, then the plan),
    skipped when the same spec already passed it against the same files (a batch or a nightly schedule
    submits one model many times). Building the model's skeleton takes tens of milliseconds of CPU, which
    would otherwise bound the submit rate. Only passes (their plans) are kept; the worker checks the model
    again before quantizing."""
    from workers.preflight import plan_job

    try:
        key = (repr(job), _files_signature(job))
    except OSError:
        return plan_job(job).to_dict()  # let the check itself say what is missing
    with _passed_lock:
        if key in _passed_model_checks:
            _passed_model_checks.move_to_end(key)
            return dict(json.loads(_passed_model_checks[key]))  # the caller's own copy
    text = json.dumps(plan_job(job).to_dict())
    with _passed_lock:
        _passed_model_checks[key] = text
        while len(_passed_model_checks) > MODEL_CHECKS_KEPT:
            _passed_model_checks.popitem(last=False)
    return dict(json.loads(text))  # as stored: the same from the cache


def _check_model_size(model_dir: Path, limit: int) -> None:
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    if size > limit:
        raise InputError(
            f"model weights are {size / 2**30:.1f} GiB, above this service's limit of {limit / 2**30:.1f} GiB"
        )
