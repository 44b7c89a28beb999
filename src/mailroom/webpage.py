"""The web page (``web/``, built by Vite into ``web/dist``), served by the API itself.

``/`` and every client route (``/accounts``, ``/mail?…``, ``/tasks``, ``/admin``) answer the
page's ``index.html``; its hashed files are the app's static files under ``/static/``. The
API's own paths (``/api``, ``/docs``, ``/openapi.json``, ``/healthz``, ``/readyz``,
``/metrics``) are never answered with the page: an unknown one stays a 404 in the one error
shape. Client routes are served from the 404 handler rather than a catch-all rule, so the
URL map holds only what the OpenAPI document describes.

When the page was not built (a clone without ``make run``), ``/`` says so and how to build
it instead of failing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flask import Flask, Response, request, send_from_directory
from werkzeug.exceptions import NotFound

from mailroom.errors import error_response

#: Paths that belong to the API and never fall back to the page.
RESERVED_PREFIXES = ("/api", "/docs", "/openapi.json", "/healthz", "/readyz", "/metrics", "/static")
STATIC_PREFIX = "/static"
EXTENSION = "mailroom.webpage"
#: The page may change on every deploy; its hashed assets never do.
INDEX_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-src 'self' about:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
}

NOT_BUILT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Mailroom: web page not built</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem">
<h1>Mailroom is running, but its web page was not built</h1>
<p>The API works: see <a href="/docs">/docs</a>. To build the page, run <code>make web</code>
(or <code>make run</code>, which builds it when its sources changed), or
<code>cd web &amp;&amp; npm ci &amp;&amp; npm run build</code>, then reload.</p>
<p>Looked for <code>index.html</code> in: {places}</p>
</body></html>
"""


def default_dist_dirs() -> list[Path]:
    """Where a built page may be: the image's copy (``<prefix>/share/mailroom/web``, see the
    Dockerfile), then ``web/dist`` of the source tree this module runs from."""
    return [
        Path(sys.prefix) / "share" / "mailroom" / "web",
        Path(__file__).resolve().parents[2] / "web" / "dist",
    ]


def find_dist(candidates: list[Path]) -> Path | None:
    return next((d for d in candidates if (d / "index.html").is_file()), None)


def is_client_route(path: str) -> bool:
    """A path the page's router handles: not the API's, and not a file (no dot in its last
    segment), so a missing asset stays a 404 instead of becoming the page."""
    if any(path == p or path.startswith(p + "/") for p in RESERVED_PREFIXES):
        return False
    return "." not in path.rsplit("/", 1)[-1]


def install_web_page(app: Flask, dist: Path | None = None) -> None:
    """Serve the built page from ``dist`` (found with :func:`default_dist_dirs` when
    omitted). Register before the blueprints, so ``/`` is the page's, not a redirect.
    Called again on the same app, it only changes where the page is looked for."""
    candidates = [dist] if dist is not None else default_dist_dirs()
    if EXTENSION in app.extensions:
        app.extensions[EXTENSION] = candidates
        return
    app.extensions[EXTENSION] = candidates

    def current_dist() -> Path | None:
        # Looked up per request, so `make web` while the server runs needs no restart.
        return find_dist(app.extensions[EXTENSION])

    def index() -> Response:
        found = current_dist()
        if found is None:
            places = ", ".join(f"<code>{c}</code>" for c in app.extensions[EXTENSION])
            page = NOT_BUILT_PAGE.replace("{places}", places)
            return Response(
                page, content_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
            )
        response = send_from_directory(found, "index.html", max_age=0)
        response.headers.update(INDEX_HEADERS)
        return response

    def static_file(filename: str) -> Response:
        found = current_dist()
        if found is None:
            raise NotFound("the web page was not built")
        # Vite names every asset after its content hash: safe to cache for a year.
        return send_from_directory(found / "static", filename, max_age=365 * 86400)

    app.add_url_rule("/", "webpage.index", index, methods=["GET"])
    # The app's static route (Flask's default, /static/<path:filename>) serves the page's assets.
    if "static" in app.view_functions:
        app.view_functions["static"] = static_file
    else:
        app.add_url_rule(f"{STATIC_PREFIX}/<path:filename>", "static", static_file, methods=["GET"])

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> Response:
        if request.method in ("GET", "HEAD") and is_client_route(request.path):
            return index()
        return error_response(404, "not_found", exc.description or "not found")
