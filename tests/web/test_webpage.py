"""Serving the web page: `/` and client routes answer index.html, assets are cached by
their hash, the API's own paths are never shadowed, and a page that was not built says so.

A built page is made here (a tiny index.html and asset in a temporary folder), so these
tests need neither Node nor a build; the app is the real one from create_app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from mailroom.app import create_app
from mailroom.errors import register_error_handlers
from mailroom.webpage import install_web_page, is_client_route
from services.settings import Settings

INDEX = b"<!doctype html><title>Mailroom</title><div id=root></div>"


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    (tmp_path / "static").mkdir()
    (tmp_path / "index.html").write_bytes(INDEX)
    (tmp_path / "static" / "index-abc123.js").write_text("console.log('page')")
    return tmp_path


def client_for(settings: Settings, dist: Path) -> Any:
    app = create_app(settings)
    install_web_page(app, dist)  # the same page, from this folder
    return app.test_client()


@pytest.mark.parametrize(
    "path", ["/", "/accounts", "/mail?account=x&folder=INBOX", "/tasks", "/admin", "/a/b/c"]
)
def test_client_routes_answer_the_page(settings: Settings, dist: Path, path: str) -> None:
    response = client_for(settings, dist).get(path)
    assert response.status_code == 200 and response.data == INDEX
    assert response.mimetype == "text/html"
    assert response.headers["Cache-Control"] == "no-cache"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_assets_are_served_and_cached_by_hash(settings: Settings, dist: Path) -> None:
    client = client_for(settings, dist)
    response = client.get("/static/index-abc123.js")
    assert response.status_code == 200 and b"console.log" in response.data
    assert "max-age=31536000" in response.headers["Cache-Control"]
    missing = client.get("/static/gone-123.js")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/no-such-route", 401),  # the API's own answer (no key), not the page
        ("/api/accounts", 401),
        ("/healthz", 200),
        ("/openapi.json", 200),
        ("/docs", 200),
        ("/favicon.ico", 404),
        ("/robots.txt", 404),
    ],
)
def test_the_api_paths_are_never_the_page(settings: Settings, dist: Path, path: str, status: int) -> None:
    response = client_for(settings, dist).get(path)
    assert response.status_code == status
    assert response.data != INDEX


def test_unknown_api_route_with_a_key_is_a_json_404(kit: Any, dist: Path) -> None:
    response = kit.admin.get("/api/no-such-route")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
    posted = kit.admin.post("/accounts")  # only GET and HEAD read the page
    assert posted.status_code == 404 and posted.get_json()["error"]["code"] == "not_found"


def test_a_page_not_built_says_how_to_build_it(settings: Settings, tmp_path: Path) -> None:
    client = client_for(settings, tmp_path / "empty")
    response = client.get("/mail")
    assert response.status_code == 200
    assert b"web page was not built" in response.data and b"make web" in response.data
    assert client.get("/healthz").status_code == 200
    asset = client.get("/static/index-abc123.js")
    assert asset.status_code == 404 and asset.get_json()["error"]["code"] == "not_found"


def test_an_app_without_a_static_route_gets_one(dist: Path) -> None:
    app = Flask(__name__, static_folder=None)
    register_error_handlers(app)
    install_web_page(app, dist)
    client = app.test_client()
    assert client.get("/static/index-abc123.js").status_code == 200
    assert client.get("/tasks").data == INDEX


def test_is_client_route() -> None:
    assert is_client_route("/accounts") and is_client_route("/")
    for path in ("/api", "/api/tasks", "/docs/swagger/x", "/metrics", "/readyz", "/static/a", "/x.png"):
        assert not is_client_route(path), path
    assert is_client_route("/apiary")  # a prefix only counts as a whole segment
