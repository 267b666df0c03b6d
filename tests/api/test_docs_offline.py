"""/docs and /redoc work without internet access: every script, style and icon they load is served by the
API itself. And 422 messages show no server path: not the allowed folders, not a symlink's target, not the
object store, only what the caller sent."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from orchestrator.settings import Settings


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_api(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text)
    urls += re.findall(r"""(?:url|spec-url)[:=]\s*["']([^"']+)["']""", r.text)
    assert urls, r.text
    external = [u for u in urls if re.match(r"^(https?:)?//", u)]
    assert external == [], external
    assert "cdn" not in r.text.lower() and "fonts.googleapis" not in r.text
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        if url.endswith(".js"):
            assert len(asset.content) > 100_000, url  # the real bundle, not a stub
    assert "openapi" in client.get("/openapi.json").json()


def _bad_bodies(link: Path, body: dict[str, Any], store: Path) -> list[dict[str, Any]]:
    calibration = body["calibration"]
    return [
        {**body, "model": "/etc"},  # outside the allowed folders
        {**body, "model": "models/x"},  # relative
        {**body, "model": "http://example.com/m"},
        {**body, "model": "s3://not-allowed/m"},
        {**body, "model": str(link)},  # a folder without config.json, through the symlink
        {**body, "model": str(link / "missing")},
        {**body, "calibration": {**calibration, "uri": str(link / "missing.txt")}},
        {**body, "output": {"uri": "/etc/out"}},
        {**body, "output": {"uri": str(store.parent / "elsewhere")}},
        {**body, "group_size": 128},
    ]


def test_422_messages_show_no_server_paths(
    settings: Settings, keys: dict, job_body: dict, allowed_root: Path, tmp_path: Path
) -> None:
    """The allowed folder is reached through a symlink: its target is a server path the caller never saw."""
    link = tmp_path / "models-link"
    link.symlink_to(allowed_root, target_is_directory=True)
    body = {
        **job_body,
        "model": job_body["model"].replace(str(allowed_root), str(link)),
        "calibration": {
            **job_body["calibration"],
            "uri": job_body["calibration"]["uri"].replace(str(allowed_root), str(link)),
        },
    }
    store = Path(settings.object_store).resolve()
    served = settings.model_copy(update={"allowed_roots": [link], "allowed_output_roots": [tmp_path / "out"]})
    server_paths = [str(allowed_root), str(store), str(tmp_path / "out"), str(Path.cwd())]
    with TestClient(create_app(served)) as client:
        assert client.post("/v1/jobs", json=body, headers=keys["alice"]).status_code == 202
        for bad in _bad_bodies(link, body, store):
            r = client.post("/v1/jobs", json=bad, headers=keys["alice"])
            assert r.status_code == 422, (bad, r.text)
            detail = r.json()["detail"]
            leaked = [p for p in server_paths if p in detail]
            assert leaked == [], detail
        # still useful: the caller's own URI and what to change
        r = client.post("/v1/jobs", json={**body, "model": str(link)}, headers=keys["alice"])
        assert f"model '{link}' is not a model directory (no config.json at {link})" in r.json()["detail"]
        r = client.post("/v1/jobs", json={**body, "model": "/etc"}, headers=keys["alice"])
        assert "outside the allowed roots" in r.json()["detail"] and "QF_ALLOWED_ROOTS" in r.json()["detail"]
        assert "s3://qf-allowed" in r.json()["detail"]
