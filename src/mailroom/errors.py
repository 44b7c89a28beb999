"""One error shape for every failure: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Flask, Response, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from services.errors import MailroomError

log = logging.getLogger("mailroom.api")

HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    422: "validation_error",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message, "details": details}})
    response.status_code = status
    return response


def validation_error_response(exc: ValidationError) -> Response:
    """flask-openapi3 hands request validation failures here: a 422 in the error shape."""
    details = [
        {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid"}
    where = ".".join(first["loc"]) or "request"
    return error_response(422, "validation_error", f"{where}: {first['msg']}", details)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(MailroomError)
    def _domain(exc: MailroomError) -> Response:
        if exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        if exc.response is not None and exc.response.mimetype == "application/json":
            return exc.response  # type: ignore[return-value]  # already in the error shape
        status = exc.code or 500
        response = error_response(status, HTTP_CODES.get(status, "error"), exc.description or exc.name)
        for name, value in exc.get_headers():  # e.g. a 405's Allow
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # The client gets a reference, never the exception's text (SQL, parameters, paths).
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error (reference %s)", ref)
        return error_response(500, "internal_error", f"internal error (reference {ref})", {"reference": ref})
