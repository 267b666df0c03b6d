"""Checks a submitted job before a row is written: URIs inside the allow-list and present, the engine's
own spec rules, the model-dependent rules of workers.validation (for local models), and that an
output.uri lies in the submitting owner's own folder (orchestrator.outputs).

Raises InvalidSpecError / InputError with the engine's message; the API turns them into 422s.
S3 models are only probed for config.json here (downloading a model to validate a request would make
submission slow and expensive); the worker runs the full model check before quantizing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.outputs import check_output_uri
from orchestrator.settings import Settings
from orchestrator.specs import engine_spec
from workers.errors import InputError
from workers.uris import LocalInput, check_input_exists


def validate_submission(spec: dict[str, Any], settings: Settings, *, owner: str) -> None:
    """`owner`: who the job will belong to (its output.uri must lie in that owner's folder)."""
    policy = settings.input_policy()
    model_is_local = True

    def resolve(uri: str, kind: str, what: str) -> str:
        nonlocal model_is_local
        try:
            found = check_input_exists(uri, policy, kind=kind, what=what)
        except OSError as e:  # e.g. a path segment over 255 bytes: the file system's answer, as a 422
            raise InputError(f"{what} path {uri!r} cannot be used: {e.strerror or e}") from e
        if isinstance(found, LocalInput):
            return str(found.path)
        if what == "model":
            model_is_local = False
        return uri  # not read here: the worker downloads it

    output_uri = (spec.get("output") or {}).get("uri")
    if output_uri:
        try:
            check_output_uri(output_uri, owner, settings.output_policy(), settings.object_store)
        except OSError as e:
            raise InputError(f"output path {output_uri!r} cannot be used: {e.strerror or e}") from e
    job = engine_spec(spec, resolve)
    if model_is_local:
        _check_model_size(Path(job.model_dir), settings.max_model_bytes)
        from workers.validation import check_against_model

        check_against_model(job)


def _check_model_size(model_dir: Path, limit: int) -> None:
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    if size > limit:
        raise InputError(
            f"model weights are {size / 2**30:.1f} GiB, above this service's limit of {limit / 2**30:.1f} GiB"
        )
