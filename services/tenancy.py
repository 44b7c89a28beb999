"""Tenants, users, API keys, and the tenant-scoped path every read and write goes through.

The tenant rule is enforced by the session (see :mod:`services.db`): a session bound to a
tenant sees only that tenant's rows whatever the query says, and an unbound one refuses
tenant reads. On top of it :func:`scoped` adds the user rule (members see only what they
own). Reaching across tenants is possible only through :func:`unrestricted_unsafe` (one
statement) or ``services.db.unrestricted_unsafe_sessions`` (a factory), so each such place
(Beat, operators' commands, the API-key lookup) can be found with one grep.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import typing
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Boolean, Select, Table, bindparam, or_, select, update
from sqlalchemy.orm import Session

from services.db import UNRESTRICTED_KEY
from services.errors import Conflict, NotFound, Unauthorized, ValidationFailed
from services.models import Account, ApiKey, Role, Tenant, User, utcnow

KEY_PREFIX = "mr_"
_KEY_RE = re.compile(r"^mr_[A-Za-z0-9_-]{40,60}$")
_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")
# Writing last_used_at on every request would turn each read into a write.
LAST_USED_RESOLUTION = timedelta(seconds=60)

M = TypeVar("M")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant, the user, the user's role and the key used."""

    tenant_id: str
    user_id: str
    role: str
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN.value


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_tenant(session: Session, *, name: str, slug: str | None = None) -> Tenant:
    """Create a tenant; the slug (derived from the name when omitted) must be unique."""
    name = name.strip()
    if not name:
        raise ValidationFailed("name: must not be empty", field="name")
    slug = slug or re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63] or "tenant"
    if not _SLUG_RE.match(slug):
        raise ValidationFailed("slug: must be lowercase letters, digits and dashes", field="slug")
    if session.scalar(unrestricted_unsafe(Tenant).where(Tenant.slug == slug)) is not None:
        raise Conflict(f"a tenant with slug {slug!r} exists already")
    tenant = Tenant(name=name, slug=slug)
    session.add(tenant)
    session.flush()
    return tenant


def find_tenant(session: Session, ref: str) -> Tenant:
    """A tenant by id or slug (operators' commands)."""
    tenant = session.scalar(unrestricted_unsafe(Tenant).where((Tenant.id == ref) | (Tenant.slug == ref)))
    if tenant is None:
        raise NotFound(f"no tenant {ref!r}")
    return tenant


def create_user(
    session: Session, *, tenant_id: str, email: str, name: str = "", role: str = "member"
) -> User:
    """Create a user in a tenant with role ``member`` or ``admin``."""
    email = email.strip().lower()
    if not _EMAIL_RE.match(email):
        raise ValidationFailed(f"email: not an email address: {email!r}", field="email")
    if role not in {r.value for r in Role}:
        raise ValidationFailed("role: must be 'member' or 'admin'", field="role")
    existing = session.scalar(
        unrestricted_unsafe(User).where(User.tenant_id == tenant_id, User.email == email)
    )
    if existing is not None:
        raise Conflict(f"user {email} exists already in this tenant")
    user = User(tenant_id=tenant_id, email=email, name=name, role=role)
    session.add(user)
    session.flush()
    return user


def find_user(session: Session, tenant_id: str, ref: str) -> User:
    user = session.scalar(
        unrestricted_unsafe(User).where(
            User.tenant_id == tenant_id, (User.id == ref) | (User.email == ref.lower())
        )
    )
    if user is None:
        raise NotFound(f"no user {ref!r} in this tenant")
    return user


def create_api_key(session: Session, user: User, *, name: str = "") -> tuple[ApiKey, str]:
    """Create a key for ``user``; returns the row and the plaintext, which is never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=user.tenant_id,
        user_id=user.id,
        name=name,
        prefix=plaintext[:12],
        key_hash=hash_key(plaintext),
    )
    session.add(key)
    session.flush()
    return key, plaintext


def revoke_api_key(session: Session, ref: str, *, tenant_id: str | None = None) -> ApiKey:
    """Revoke a key by id or by its shown prefix; revoking twice is harmless."""
    query = unrestricted_unsafe(ApiKey).where((ApiKey.id == ref) | (ApiKey.prefix == ref))
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    keys = list(session.scalars(query))
    if not keys:
        raise NotFound(f"no API key {ref!r}")
    if len(keys) > 1:
        raise Conflict(f"{ref!r} matches several keys; use the key id")
    key = keys[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    session.flush()
    return key


# The key lookup runs on every request: built once, reading plain columns (no ORM entities
# to build), and across tenants on purpose: the one read that must run before any tenant is
# known, since the key decides the tenant.
_KEYS = typing.cast(Table, ApiKey.__table__)
_USERS = typing.cast(Table, User.__table__)
_KEY_LOOKUP = (
    select(
        _KEYS.c.id,
        _KEYS.c.tenant_id,
        _KEYS.c.user_id,
        _KEYS.c.revoked_at,
        _KEYS.c.last_used_at,
        _USERS.c.role,
    )
    .join(_USERS, _USERS.c.id == _KEYS.c.user_id)
    .where(_KEYS.c.key_hash == bindparam("key_hash"))
    .execution_options(**{UNRESTRICTED_KEY: True})
)


def authenticate(session: Session, token: str) -> Principal:
    """The principal behind a bearer token; a malformed, unknown or revoked key is refused.
    One indexed query; ``last_used_at`` is written at most once a minute."""
    if not _KEY_RE.match(token):
        raise Unauthorized("malformed API key")
    key = session.execute(_KEY_LOOKUP, {"key_hash": hash_key(token)}).first()
    if key is None:
        raise Unauthorized("unknown API key")
    if key.revoked_at is not None:
        raise Unauthorized("this API key has been revoked")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(_KEYS).where(_KEYS.c.id == key.id).values(last_used_at=now))
    return Principal(tenant_id=key.tenant_id, user_id=key.user_id, role=key.role, key_id=key.id)


# --- the scoped path ---------------------------------------------------------------------


def scoped(model: type[M], principal: Principal, *, owned: bool = True) -> Select[M]:
    """A SELECT of ``model`` limited to the principal's tenant and, for members, to rows
    they own (admins see the whole tenant)."""
    query: Select[M] = select(model).where(model.tenant_id == principal.tenant_id)  # type: ignore[attr-defined]
    if owned and not principal.is_admin and hasattr(model, "user_id"):
        query = query.where(model.user_id == principal.user_id)  # type: ignore[attr-defined]
    return query


_ACCOUNTS = typing.cast(Table, Account.__table__)


def visible_account(*columns: Any) -> Select[Any]:
    """:func:`scoped`'s rule for one account as a Core SELECT of ``columns`` (the id when
    none) to build once: the account ``:account_id`` if ``:viewer_id`` may see it, that is
    in the caller's tenant ``:tenant_id``, and for a member only the accounts they own (an
    admin, ``:is_admin``, sees the whole tenant's)."""
    return select(*(columns or (_ACCOUNTS.c.id,))).where(
        _ACCOUNTS.c.id == bindparam("account_id"),
        _ACCOUNTS.c.tenant_id == bindparam("tenant_id"),
        or_(bindparam("is_admin", type_=Boolean), _ACCOUNTS.c.user_id == bindparam("viewer_id")),
    )


def get_scoped(session: Session, model: type[M], ident: Any, principal: Principal, *, what: str) -> M:
    """One row the principal may see, or :class:`NotFound` (never a hint that it exists)."""
    query = scoped(model, principal).where(model.id == str(ident))  # type: ignore[attr-defined]
    row: M | None = session.scalar(query)  # type: ignore[arg-type]
    if row is None:
        raise NotFound(f"{what} not found")
    return row


def unrestricted_unsafe(model: type[M]) -> Select[M]:
    """A SELECT across all tenants, even in a tenant-bound session. Only the key lookup,
    Beat, and operators' commands may use this."""
    return select(model).execution_options(**{UNRESTRICTED_KEY: True})
