"""Bearer-key authentication for every ``/api`` route."""

from __future__ import annotations

from flask import g, request

from mailroom.context import db_session
from mailroom.ratelimit import count_unauthenticated
from services import tenancy, webhooks
from services.db import bind_tenant
from services.errors import Forbidden, Unauthorized
from services.models import is_id
from services.tenancy import Principal

#: The inbound hook carries no API key: its signature is checked by its route.
HOOK_PATH_PREFIX = "/api/hooks/inbound/"


def authenticate_request() -> None:
    """``before_request`` for /api: a missing, malformed, unknown or revoked key is a 401."""
    if not request.path.startswith("/api/") and request.path != "/api":
        return
    if request.path.startswith(HOOK_PATH_PREFIX):
        # Signed with the account's hook secret instead (services.webhooks). A malformed id
        # is refused here like an unknown one, before the path check would make it a 404.
        if not is_id(request.path.removeprefix(HOOK_PATH_PREFIX)):
            count_unauthenticated()
            raise webhooks.unauthorized()
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        count_unauthenticated()
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <api key>'")
    if scheme.lower() != "bearer" or not token.strip():
        count_unauthenticated()
        raise Unauthorized("malformed Authorization header; expected 'Bearer <api key>'")
    session = db_session()
    try:
        who = tenancy.authenticate(session, token.strip())
    except Unauthorized:
        count_unauthenticated()
        raise
    # From here on every read of this request's session is limited to the caller's tenant.
    bind_tenant(session, who.tenant_id)
    g.principal = who


def principal() -> Principal:
    return g.principal  # type: ignore[no-any-return]


def require_admin() -> Principal:
    who = principal()
    if not who.is_admin:
        raise Forbidden("this route needs the admin role")
    return who
