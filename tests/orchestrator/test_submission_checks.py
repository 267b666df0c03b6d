"""Submission runs the model check once per spec and set of files: repeated submits of one model (batches,
schedules) skip it, and any change to the model's files or the spec runs it again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import workers.validation
from api.schemas import JobCreate
from orchestrator.queue import submission
from orchestrator.settings import Settings
from workers.errors import InputError


def test_a_passed_model_check_is_reused_until_a_file_changes(
    tiny_assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model)
    settings = Settings(database_url="sqlite://", allowed_roots=[tmp_path, tiny_assets["calibration"].parent])
    body = {
        "model": str(model),
        "method": "gptq",
        "group_size": 32,
        "calibration": {"uri": str(tiny_assets["calibration"]), "num_samples": 8, "seq_len": 64},
    }
    spec = JobCreate.model_validate(body).model_dump(mode="json")
    calls: list[Any] = []
    check = workers.validation.check_against_model
    monkeypatch.setattr(
        workers.validation, "check_against_model", lambda job: calls.append(job) or check(job)
    )
    monkeypatch.setattr(submission, "_passed_model_checks", type(submission._passed_model_checks)())

    for _ in range(3):
        submission.validate_submission(spec, settings, owner="alice")
    assert len(calls) == 1
    other = JobCreate.model_validate({**body, "group_size": 64}).model_dump(mode="json")
    submission.validate_submission(other, settings, owner="alice")
    assert len(calls) == 2  # another spec is checked on its own

    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = "many"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="num_hidden_layers"):
        submission.validate_submission(spec, settings, owner="alice")
    assert len(calls) == 3
