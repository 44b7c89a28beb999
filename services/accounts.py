"""Mail accounts: create, change, delete, list; the encrypted secrets; the sync lock.

Secrets are write-only: they are encrypted on the way in and decrypted only inside a task
that talks to the mail server, never returned by the API and never logged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Row, Table, func, or_, select, update
from sqlalchemy.orm import Session

from services.crypto import SecretBox
from services.errors import NotFound, ValidationFailed
from services.mail.hosts import resolve_host
from services.mail.imap import ImapEndpoint, capabilities, imap_session
from services.mail.smtp import SmtpEndpoint, verify_smtp
from services.models import Account, TaskRecord, User, utcnow
from services.task_records import IN_FLIGHT
from services.tenancy import Principal, get_scoped, scoped, visible_account

ACCOUNTS = cast(Table, Account.__table__)
ENDPOINT_FIELDS = ("host", "port", "tls", "username")
#: Changing any of these points the stored password at another server (or sends it in
#: plain text), so a change must come with the password again.
PASSWORD_BOUND_FIELDS = ("host", "port", "tls", "username")


@dataclass(frozen=True)
class AccountInput:
    """Validated fields of a create or update request (None = leave unchanged)."""

    email: str | None = None
    name: str | None = None
    imap: dict[str, Any] | None = None
    smtp: dict[str, Any] | None = None
    sync_interval: int | None = None


def create_account(
    session: Session, principal: Principal, data: AccountInput, box: SecretBox, *, allow_private: bool
) -> Account:
    """Create an account owned by the caller; hosts are checked against the host policy."""
    assert data.email and data.imap and data.smtp
    _check_endpoints(data, allow_private)
    account = Account(
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        email=data.email,
        name=data.name or "",
        sync_interval=data.sync_interval or 900,
    )
    _apply_endpoint(account, "imap", data.imap, box, creating=True)
    _apply_endpoint(account, "smtp", data.smtp, box, creating=True)
    session.add(account)
    session.flush()
    return account


def update_account(
    session: Session, account: Account, data: AccountInput, box: SecretBox, *, allow_private: bool
) -> Account:
    """Change the given fields; endpoints are merged, so a PATCH may change just a port.

    A change of an endpoint's host, port, TLS mode or username needs that endpoint's
    password in the same request (422 naming ``imap.password`` / ``smtp.password``): the
    stored password never goes to a server, or over a channel, it was not given for."""
    for kind, patch in (("imap", data.imap), ("smtp", data.smtp)):
        _require_password_for_moves(account, kind, patch or {})
    merged = AccountInput(
        imap={**endpoint_view(account, "imap"), **(data.imap or {})} if data.imap else None,
        smtp={**endpoint_view(account, "smtp"), **(data.smtp or {})} if data.smtp else None,
    )
    _check_endpoints(merged, allow_private)
    if data.email is not None:
        account.email = data.email
    if data.name is not None:
        account.name = data.name
    if data.sync_interval is not None:
        account.sync_interval = data.sync_interval
    if data.imap:
        _apply_endpoint(account, "imap", data.imap, box, creating=False)
    if data.smtp:
        _apply_endpoint(account, "smtp", data.smtp, box, creating=False)
    account.updated_at = utcnow()
    session.flush()
    return account


def _require_password_for_moves(account: Account, kind: str, patch: dict[str, Any]) -> None:
    if patch.get("password") is not None:
        return
    changed = [
        field
        for field in PASSWORD_BOUND_FIELDS
        if patch.get(field) is not None and patch[field] != getattr(account, f"{kind}_{field}")
    ]
    if changed:
        raise ValidationFailed(
            f"{kind}.password is required when changing {', '.join(f'{kind}.{f}' for f in changed)}",
            field=f"{kind}.password",
        )


def _check_endpoints(data: AccountInput, allow_private: bool) -> None:
    """Host policy and the plain-text rule, through the same lookup the connection uses."""
    for kind, endpoint in (("imap", data.imap), ("smtp", data.smtp)):
        if endpoint:
            resolve_host(
                endpoint["host"],
                endpoint["port"],
                allow_private=allow_private,
                field=f"{kind}.host",
                tls=endpoint["tls"],
            )


def _apply_endpoint(
    account: Account, kind: str, values: dict[str, Any], box: SecretBox, *, creating: bool
) -> None:
    for field in ENDPOINT_FIELDS:
        if field in values and values[field] is not None:
            setattr(account, f"{kind}_{field}", values[field])
    password = values.get("password")
    if password is not None:
        setattr(account, f"{kind}_password_enc", box.encrypt(password))
    elif creating:
        raise ValidationFailed(f"{kind}.password is required", field=f"{kind}.password")


def endpoint_view(account: Account, kind: str) -> dict[str, Any]:
    """The endpoint's non-secret fields."""
    return {field: getattr(account, f"{kind}_{field}") for field in ENDPOINT_FIELDS}


def get_account(session: Session, account_id: str, principal: Principal) -> Account:
    return get_scoped(session, Account, account_id, principal, what="account")


#: What a send needs of its account, if the principal may see it (built once: every send
#: request reads it).
_SENDING_ACCOUNT = visible_account(
    ACCOUNTS.c.id, ACCOUNTS.c.email, ACCOUNTS.c.name, ACCOUNTS.c.save_sent_copy
)


def sending_account(session: Session, account_id: str, principal: Principal) -> Any:
    """The account's id, email, name and save_sent_copy for a send, if the principal may
    see it (else :class:`NotFound`, as :func:`get_account`)."""
    row = session.execute(
        _SENDING_ACCOUNT,
        {
            "account_id": account_id,
            "tenant_id": principal.tenant_id,
            "is_admin": principal.is_admin,
            "viewer_id": principal.user_id,
        },
    ).first()
    if row is None:
        raise NotFound("account not found")
    return row


def list_accounts(
    session: Session, principal: Principal, *, limit: int, offset: int
) -> tuple[list[Account], int]:
    query = scoped(Account, principal)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Account.created_at, Account.id).limit(limit).offset(offset))
    return list(rows), total


def delete_account(session: Session, account: Account) -> None:
    """Delete the account and what was synced from it (folders, messages cascade)."""
    session.delete(account)
    session.flush()


def imap_endpoint(account: Account | Row[Any], box: SecretBox) -> ImapEndpoint:
    # An Account, or a Core row with the same columns (services.send.deliver reads one).
    return ImapEndpoint(
        host=account.imap_host,
        port=account.imap_port,
        tls=account.imap_tls,
        username=account.imap_username,
        password=box.decrypt(account.imap_password_enc),
    )


def smtp_endpoint(account: Account | Row[Any], box: SecretBox) -> SmtpEndpoint:
    return SmtpEndpoint(
        host=account.smtp_host,
        port=account.smtp_port,
        tls=account.smtp_tls,
        username=account.smtp_username,
        password=box.decrypt(account.smtp_password_enc),
    )


def verify_account(
    account: Account, box: SecretBox, *, timeout: float, allow_private: bool
) -> dict[str, Any]:
    """Log in to IMAP and to SMTP for real; return both servers' capabilities.

    Raises the first failure, classified (bad login → permanent, network → transient)."""
    with imap_session(imap_endpoint(account, box), timeout=timeout, allow_private=allow_private) as client:
        imap_caps = capabilities(client)
    smtp_caps = verify_smtp(smtp_endpoint(account, box), timeout=timeout, allow_private=allow_private)
    return {"imap": {"ok": True, "capabilities": imap_caps}, "smtp": {"ok": True, "extensions": smtp_caps}}


def check_ownership(session: Session, account_id: str | None, tenant_id: str, user_id: str | None) -> Account:
    """The account, if it still belongs to the tenant and the user may act on it.

    Every task calls this before it touches a mailbox: the account or the user may have been
    deleted, or the account given to someone else, since the request was accepted."""
    account = session.get(Account, account_id) if account_id else None
    user = None
    if account is not None and user_id is not None and account.user_id != user_id:
        user = session.get(User, user_id)
    refusal = owner_refusal(
        account.tenant_id if account is not None else None,
        account.user_id if account is not None else None,
        user.tenant_id if user is not None else None,
        user.role if user is not None else None,
        tenant_id=tenant_id,
        user_id=user_id,
    )
    if refusal is not None:
        raise refusal
    assert account is not None
    return account


def owner_refusal(
    account_tenant: str | None,
    account_user: str | None,
    user_tenant: str | None,
    user_role: str | None,
    *,
    tenant_id: str,
    user_id: str | None,
) -> NotFound | None:
    """:func:`check_ownership`'s decision from the account's tenant and owner and the acting
    user's tenant and role (None where there is no such account or user): the refusal, or
    None when ``user_id`` of ``tenant_id`` may act on the account. For a task attempt,
    which reads these with its record (task_records.load_for_attempt)."""
    if account_tenant is None or account_tenant != tenant_id:
        return NotFound("account not found (deleted, or not this tenant's)")
    admin = user_tenant == tenant_id and user_role == "admin"
    if user_id is not None and account_user != user_id and not admin:
        return NotFound("account not found for this user")
    return None


# --- the sync lock ---------------------------------------------------------------------------
#
# One sync per account. The lock is the account's ``sync_task_id``, and it is held exactly
# as long as that task's record is in flight (queued, running or retrying): it has no clock
# of its own, so a sync that waits in the queue for hours, or waits to retry, keeps its
# account. The one clock that ends a lost holder is the stale-record sweep
# (``task_records.fail_stuck``), which waits longer than the broker's visibility timeout, so
# a task whose worker died is redelivered and resumed before anyone calls it lost.


def _sync_lock_free(task_id: str | None = None) -> ColumnElement[bool]:
    """The account's sync lock is unset, held by ``task_id`` itself, or held by a task
    that is no longer in flight (finished, or its record is gone)."""
    holder_in_flight = (
        select(TaskRecord.id)
        .where(TaskRecord.id == Account.sync_task_id, TaskRecord.state.in_(IN_FLIGHT))
        .exists()
    )
    free = [Account.sync_task_id.is_(None), ~holder_in_flight]
    if task_id is not None:
        free.append(Account.sync_task_id == task_id)
    return or_(*free)


def claim_sync_lock(session: Session, account_id: str, task_id: str) -> str | None:
    """Make ``task_id`` the account's one sync, or confirm that it is. Returns None on
    success, or the id of the other sync in flight. The API claims at dispatch; the worker
    claims again when an attempt starts, so a sync whose lock went to another task (its
    record was swept as lost meanwhile) stops instead of running beside it."""
    # Lock the account row first, in a statement of its own. A claim that had to wait for
    # another transaction's claim would otherwise decide, under READ COMMITTED, with the
    # snapshot its UPDATE started with, in which the winner's record is not yet visible
    # ("the holder is not in flight"), and claim the account a second time. After this
    # wait, the claim below is a new statement and sees the winner's committed record.
    # FOR NO KEY UPDATE, the lock the claim's UPDATE takes anyway: it does not conflict
    # with the KEY SHARE lock a task INSERT holds through its foreign key, so two
    # dispatches cannot deadlock on it. (SQLite serialises writers and ignores it.)
    session.execute(select(ACCOUNTS.c.id).where(ACCOUNTS.c.id == account_id).with_for_update(key_share=True))
    result = session.execute(
        update(Account)
        .where(Account.id == account_id, _sync_lock_free(task_id))
        .values(sync_task_id=task_id)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    if result.rowcount == 1:
        return None
    return session.scalar(select(Account.sync_task_id).where(Account.id == account_id))


def release_sync_lock(session: Session, account_id: str, task_id: str) -> None:
    """Give the lock back (only if ``task_id`` holds it). Not strictly needed, since a
    finished holder frees the lock, but it keeps ``sync_task_id`` meaning "in flight"."""
    session.execute(
        update(Account)
        .where(Account.id == account_id, Account.sync_task_id == task_id)
        .values(sync_task_id=None)
        .execution_options(synchronize_session=False)
    )


def sync_phase(account_id: str, interval: int) -> float:
    """The account's fixed place in its sync interval, in seconds from 0 to ``interval``: a
    stable hash of its id (the same in every process and release), so accounts spread
    evenly over the interval whenever they were created or last synced."""
    digest = hashlib.blake2b(account_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * interval


def next_sync_at(
    account_id: str, last_sync_at: datetime | None, interval: int, *, tick_seconds: float = 0.0
) -> datetime | None:
    """When Beat should next sync the account (None: now, it never synced).

    With at least two Beat ticks per interval, the account's syncs sit on a grid of its
    own: ``k * interval + sync_phase`` seconds since the epoch, and the next one is the
    grid point nearest ``last_sync_at + interval``. Accounts synced together (created
    together, or after an outage) thus fall due at different ticks, spread evenly over the
    interval, instead of staying one burst for good; an account's gap is its interval
    exactly once it is on its grid, and between half and one and a half intervals on the
    way there (after its first sync, or one a user asked for). With fewer ticks per
    interval there is nothing to spread over: the next sync is ``last_sync_at + interval``."""
    if last_sync_at is None:
        return None
    wanted = last_sync_at + timedelta(seconds=interval)
    if interval < 2 * tick_seconds:
        return wanted
    phase = sync_phase(account_id, interval)
    k = round((wanted.timestamp() - phase) / interval)
    return datetime.fromtimestamp(k * interval + phase, UTC)


@dataclass(frozen=True)
class DueAccount:
    id: str
    tenant_id: str
    user_id: str


def due_accounts(session: Session, now: datetime, *, tick_seconds: float = 0.0) -> list[DueAccount]:
    """Accounts whose next sync (:func:`next_sync_at`) comes before the middle of the next
    tick, and whose sync lock is free (all tenants: Beat), with their tenant and user, in
    one query.

    Beat only looks every ``tick_seconds``: counting an account as due only once its time
    has passed would sync it up to a whole tick late. Taking accounts due within half a
    tick syncs each at the tick nearest its time, never more than half a tick early.
    Time arithmetic is done here, not in SQL, so it reads the same on SQLite and
    PostgreSQL; five columns per account are loaded."""
    rows = session.execute(
        select(
            Account.id, Account.tenant_id, Account.user_id, Account.last_sync_at, Account.sync_interval
        ).where(_sync_lock_free())
    ).all()
    horizon = now + timedelta(seconds=tick_seconds / 2)
    due = []
    for account_id, tenant_id, user_id, last_sync_at, interval in rows:
        at = next_sync_at(account_id, last_sync_at, interval, tick_seconds=tick_seconds)
        if at is None or at <= horizon:
            due.append(DueAccount(account_id, tenant_id, user_id))
    return due


def due_account_ids(session: Session, now: datetime, *, tick_seconds: float = 0.0) -> list[str]:
    """The ids of :func:`due_accounts`."""
    return [account.id for account in due_accounts(session, now, tick_seconds=tick_seconds)]
