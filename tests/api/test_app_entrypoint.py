"""`uvicorn api.main:app` (the container images' command) finds an app built from the QF_* environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from uvicorn.importer import import_from_string

import api.main


def test_uvicorn_finds_the_app_built_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'entry.db'}"
    monkeypatch.setenv("QF_DATABASE_URL", url)
    api.main._environment_app.cache_clear()
    try:
        app = import_from_string("api.main:app")
        assert isinstance(app, FastAPI) and app.state.settings.database_url == url
        assert api.main.app is app  # built once
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            _ = api.main.nope  # type: ignore[attr-defined]
    finally:
        api.main._environment_app.cache_clear()
