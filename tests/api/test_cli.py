"""The quantfleet command line: keys, migrations, the --no-auth guard, and serve with several API processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from orchestrator.auth import authenticate
from orchestrator.db import make_engine, migration_status, session_factory, transaction
from quantfleet.cli import is_loopback, main
from tests.helpers import wait_until_up


def test_migrate_then_create_use_and_revoke_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["migrate", "--database-url", url]) == 0
    assert migration_status(make_engine(url)) == ("0004", "0004")

    assert main(["keys", "create", "--owner", "carol", "--scopes", "read,submit", "--database-url", url]) == 0
    out = capsys.readouterr()
    token = out.out.strip().splitlines()[-1]
    assert token.startswith("qf_") and "shown only once" in out.err
    sessions = session_factory(make_engine(url))
    with transaction(sessions) as s:
        principal = authenticate(s, token)
    assert principal is not None and principal.owner == "carol"
    assert principal.scopes == frozenset({"read", "submit"}) and not principal.is_admin

    key_id = token.split("_")[1]
    assert main(["keys", "revoke", key_id, "--database-url", url]) == 0
    with transaction(sessions) as s:
        assert authenticate(s, token) is None


def test_unknown_scope_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    main(["migrate", "--database-url", url])
    assert main(["keys", "create", "--owner", "x", "--scopes", "read,root", "--database-url", url]) == 2
    assert "subset of submit,read,admin" in capsys.readouterr().err


def test_no_auth_is_refused_on_a_public_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--no-auth"]) == 2
    assert "--no-auth is only allowed on a loopback address" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_quantize_is_handed_to_the_engine_cli(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("workers.cli", reason="the engine's CLI (workers/cli.py) is not in this checkout yet")
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "--help"])
    assert exit_.value.code == 0
    assert "--method" in capsys.readouterr().out


@pytest.mark.postgres
def test_serve_with_two_api_processes_answers_submits(
    clean_postgres_url: str, tiny_assets: dict, allowed_root: Path, tmp_path: Path
) -> None:
    """`quantfleet serve --workers 2`: two API processes, started with this command's flags (database URL,
    --no-auth), answer submits into the one database."""
    import subprocess
    import sys

    import httpx

    port = _free_port()
    env = {
        **os.environ,
        "QF_ALLOWED_ROOTS": str(allowed_root),
        "QF_OBJECT_STORE": str(tmp_path / "objects"),
        "QF_WORK_DIR": str(tmp_path / "work"),
        "QF_CACHE_DIR": str(tmp_path / "cache"),
    }
    command = [sys.executable, "-m", "quantfleet.cli", "serve", "--no-dispatcher", "--no-scheduler", "--no-auth"]
    command += ["--database-url", clean_postgres_url, "--port", str(port), "--workers", "2"]
    server = subprocess.Popen(command, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/readyz", server, 60, "serve --workers 2")
        body = {
            "model": str(tiny_assets["model"]),
            "method": "rtn",
            "bits": 4,
            "group_size": 32,
            "calibration": {"uri": str(tiny_assets["calibration"]), "num_samples": 8, "seq_len": 64},
        }
        workers = _api_processes(server.pid)
        assert len(workers) == 2
        ids = set()
        for _ in range(8):  # a fresh connection each
            r = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
            assert r.status_code == 202, r.text
            ids.add(r.json()["id"])
        assert len(ids) == 8
        jobs = httpx.get(f"{url}/v1/jobs", params={"limit": 50}, timeout=30).json()["jobs"]
        assert {j["id"] for j in jobs} == ids
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api_processes(parent: int) -> list[int]:
    """Worker processes uvicorn started for `parent` (spawned: multiprocessing's spawn_main)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    spawned = b"spawn_main" in f.read()
            except OSError:
                continue
            if ppid == parent and spawned:
                children.append(int(entry))
    return children
