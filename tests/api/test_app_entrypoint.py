"""`uvicorn api.main:app` (the container images' command) finds an app built from the QF_* environment, and
the app is ready for its first submit when it starts serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from uvicorn.importer import import_from_string

import api.main

REPO = Path(__file__).resolve().parents[2]


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


def test_the_api_imports_what_the_model_check_needs_before_it_serves(tmp_path: Path) -> None:
    """The first submit of a server process must not spend seconds importing torch and transformers: the
    app's startup does it (a fresh interpreter, so nothing was imported before)."""
    script = f"""
import sys
from fastapi.testclient import TestClient
from api.main import create_app
from orchestrator.settings import Settings

app = create_app(Settings(database_url="sqlite:///{tmp_path / 'q.db'}"))
before = "transformers" in sys.modules or "workers.validation" in sys.modules
with TestClient(app) as client:
    assert client.get("/healthz").status_code == 200
    print(before, "transformers" in sys.modules and "workers.validation" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
