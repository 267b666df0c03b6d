"""The quantfleet command line: keys, migrations, and the --no-auth guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.auth import authenticate
from orchestrator.db import make_engine, migration_status, session_factory, transaction
from quantfleet.cli import is_loopback, main


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
