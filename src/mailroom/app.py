"""The Flask application factory."""

from __future__ import annotations

import json
from typing import Any

from flask import Request, Response, current_app, jsonify, request
from flask_openapi3 import Info, OpenAPI

from mailroom import __version__ as _version
from mailroom.auth import authenticate_request
from mailroom.context import AppState, install_request_session
from mailroom.errors import register_error_handlers, validation_error_response
from mailroom.input_guard import check_json_text, check_request_text
from mailroom.metrics import install_metrics
from mailroom.ratelimit import install_rate_limits
from mailroom.webpage import install_web_page
from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker
from services.errors import InvalidRequest, UnsupportedMediaType, ValidationFailed
from services.logs import configure_logging
from services.settings import Settings, load_settings
from tasks.celery_app import make_celery

MAX_BODY_BYTES = 1024 * 1024
BODY_METHODS = {"POST", "PUT", "PATCH"}
BODYLESS_ROUTES = "MAILROOM_BODYLESS_ROUTES"

DESCRIPTION = """Mailroom connects IMAP/SMTP mailboxes of many tenants and works on them
through queued tasks. Every `/api` route needs `Authorization: Bearer <api key>`, except
the inbound hook, which is signed with its account's hook secret instead.
Work is queued: such a route answers `202` with a `task_id`; poll `GET /api/tasks/{task_id}`
for state, progress (0–100) and result, or cancel it. Errors always look like
`{"error": {"code": "...", "message": "...", "details": ...}}`; another tenant's object is a 404."""


class ApiRequest(Request):
    """An empty body on POST/PATCH reads as ``{}``, so routes whose fields are all optional
    accept a bare request; anything else must be valid JSON (checked in ``_check_body``)."""

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        if self.method in BODY_METHODS and not self.get_data(cache=True):
            return {}
        return super().get_json(force=force, silent=silent, cache=cache)


def create_app(settings: Settings | None = None) -> OpenAPI:
    """Build the API for ``settings`` (read from the environment when omitted)."""
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = OpenAPI(
        __name__,
        info=Info(title="Mailroom API", version=_version, description=DESCRIPTION),
        security_schemes={
            "bearer": {"type": "http", "scheme": "bearer", "description": "A Mailroom API key"},
            "hook_signature": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Mailroom-Signature",
                "description": "Only POST /api/hooks/inbound/{account_id}: sha256=<hex HMAC-SHA256 of "
                '"<X-Mailroom-Timestamp>." + body, keyed with the account\'s hook secret>',
            },
        },
        validation_error_status=422,
        validation_error_callback=validation_error_response,
        doc_prefix="/docs",
        doc_url="/openapi.json",
    )
    app.request_class = ApiRequest
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    engine = make_engine(settings)
    app.extensions["mailroom"] = AppState(
        settings=settings,
        sessions=make_sessionmaker(engine),
        celery=make_celery(settings),
        box=SecretBox(settings.encryption_keys()),
    )

    install_metrics(app)
    from mailroom.api import send as send_api

    app.before_request(send_api.allow_large_send_bodies)  # before the body is first read
    app.before_request(_check_body)
    app.before_request(authenticate_request)
    install_rate_limits(app, settings)  # after authentication: it counts per tenant
    app.before_request(check_request_text)
    app.before_request(_refuse_fields_of_bodyless_routes)
    install_request_session(app)
    register_error_handlers(app)
    install_web_page(app)  # before the blueprints: `/` is the page

    from mailroom.api import accounts, admin, messages, probes, tasks

    for module in (accounts, messages, tasks, admin, probes):
        app.register_api(module.bp)
    from mailroom.api import delete as delete_api

    app.register_api(delete_api.bp)

    app.register_api(send_api.bp)
    from mailroom.api import spam as spam_api

    app.register_api(spam_api.bp)
    from mailroom.api import webhooks as webhooks_api

    app.register_api(webhooks_api.bp)
    app.register_api(webhooks_api.inbound_bp)

    @app.get("/openapi.json", doc_ui=False)
    def openapi_document() -> Response:
        return jsonify(app.api_doc)

    _document_refusals(app.api_doc)
    app.config[BODYLESS_ROUTES] = _bodyless_routes(app.api_doc)
    return app


def _bodyless_routes(doc: dict[str, Any]) -> frozenset[tuple[str, str]]:
    """The (Flask rule, method) of every /api POST, PUT or PATCH that takes no body."""
    return frozenset(
        (path.replace("{", "<").replace("}", ">"), method.upper())
        for path, operations in doc["paths"].items()
        if path.startswith("/api/")
        for method, operation in operations.items()
        if method.upper() in BODY_METHODS and "requestBody" not in operation
    )


def _refuse_fields_of_bodyless_routes() -> None:
    """A route without a body takes an empty body or ``{}``; any field sent to it is a 422
    like an unknown field of a route with a body, so that a misplaced field (a request
    meant for another route) never passes silently. Runs where the body of a route with
    one is validated: after authentication, before the route looks up its objects."""
    rule = request.url_rule
    if rule is None or (rule.rule, request.method) not in current_app.config.get(BODYLESS_ROUTES, ()):
        return
    parsed = request.get_json()
    if parsed:
        details = [
            {"loc": [str(key)], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
            for key in parsed
        ]
        first = details[0]
        raise ValidationFailed(f"{first['loc'][0]}: {first['msg']}", details=details)


def _document_refusals(doc: dict[str, Any]) -> None:
    """What flask-openapi3 cannot know: every 422 is in the error shape (the validation
    callback and the input guard both answer it), and any POST/PATCH under /api may be
    refused for its body before the route runs: too large (413) or not JSON (415)."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    invalid = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ValidationErrorResponse"}}}
    }
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if "422" in responses:
                responses["422"] = {"description": "Unprocessable Entity", **invalid}
            if path.startswith("/api/") and method.upper() in BODY_METHODS:
                responses.setdefault("413", {"description": "Request Entity Too Large", **error})
                responses.setdefault("415", {"description": "Unsupported Media Type", **error})
    doc.get("components", {}).get("schemas", {}).pop("ValidationErrorModel", None)


def _check_body() -> None:
    """Bodies must be JSON objects: malformed JSON is a 400, another media type a 415."""
    if request.method not in BODY_METHODS or not request.path.startswith("/api/"):
        return
    data = request.get_data(cache=True)
    if not data:
        return
    if not request.is_json:
        raise UnsupportedMediaType("request bodies must be JSON (Content-Type: application/json)")
    try:
        # Strict UTF-8 first: json.loads(bytes) would let an encoded surrogate (ED A0 80)
        # through as a lone surrogate, which PostgreSQL then refuses to store (a 500).
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    check_json_text(parsed, data)
