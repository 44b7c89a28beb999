"""``/api/accounts``: mail accounts, and the tasks that act on one (verify, sync)."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, url_for
from flask_openapi3 import APIBlueprint, Tag

from mailroom.api.common import ERRORS, SECURITY, page_info
from mailroom.auth import principal
from mailroom.context import db_session, state
from mailroom.schemas import (
    AccountCreate,
    AccountOut,
    AccountPage,
    AccountPatch,
    AccountPath,
    PageQuery,
    TaskAccepted,
)
from services import accounts, spam_store
from services.accounts import AccountInput, endpoint_view
from services.models import Account, TaskRecord
from services.task_inputs import SyncParams
from tasks.dispatch import dispatch

tag = Tag(name="accounts", description="Connected IMAP/SMTP mailboxes")
bp = APIBlueprint("accounts", __name__, url_prefix="/api/accounts", abp_tags=[tag], abp_security=SECURITY)


def account_out(account: Account) -> dict[str, Any]:
    return AccountOut(
        id=account.id,
        email=account.email,
        name=account.name,
        imap=endpoint_view(account, "imap"),  # type: ignore[arg-type]
        smtp=endpoint_view(account, "smtp"),  # type: ignore[arg-type]
        sync_interval=account.sync_interval,
        last_sync_at=account.last_sync_at,
        last_sync_error=account.last_sync_error,
        sync_task_id=account.sync_task_id,
        capabilities=account.capabilities,
        save_sent_copy=account.save_sent_copy,
        spam_auto_scan=account.spam_auto_scan,
        spam_move_to_junk=account.spam_move_to_junk,
        created_at=account.created_at,
        updated_at=account.updated_at,
    ).model_dump(mode="json")


@bp.post("", responses={201: AccountOut, **ERRORS})
def create_account(body: AccountCreate) -> tuple[Response, int]:
    """Connect a mailbox. Hosts on private networks are refused unless the operator allows them."""
    st = state()
    account = accounts.create_account(
        db_session(),
        principal(),
        AccountInput(
            email=body.email,
            name=body.name,
            imap=body.imap.model_dump(),
            smtp=body.smtp.model_dump(),
            sync_interval=body.sync_interval or st.settings.default_sync_interval,
        ),
        st.box,
        allow_private=st.settings.allow_private_hosts,
    )
    account.save_sent_copy = body.save_sent_copy
    spam_store.set_account_options(
        account, auto_scan=body.spam_auto_scan, move_to_junk=body.spam_move_to_junk
    )
    return jsonify(account_out(account)), 201


@bp.get("", responses={200: AccountPage, **ERRORS})
def list_accounts(query: PageQuery) -> Response:
    """The caller's accounts (an admin sees the whole tenant's), oldest first."""
    rows, total = accounts.list_accounts(db_session(), principal(), limit=query.limit, offset=query.offset)
    return jsonify({"items": [account_out(a) for a in rows], **page_info(total, query.limit, query.offset)})


@bp.get("/<account_id>", responses={200: AccountOut, **ERRORS})
def get_account(path: AccountPath) -> Response:
    """One account; secrets are never returned."""
    return jsonify(account_out(accounts.get_account(db_session(), path.account_id, principal())))


@bp.patch("/<account_id>", responses={200: AccountOut, **ERRORS})
def update_account(path: AccountPath, body: AccountPatch) -> Response:
    """Change some fields; endpoint fields merge with the stored ones."""
    st = state()
    session = db_session()
    account = accounts.get_account(session, path.account_id, principal())
    accounts.update_account(
        session,
        account,
        AccountInput(
            email=body.email,
            name=body.name,
            imap=body.imap.model_dump(exclude_none=True) if body.imap else None,
            smtp=body.smtp.model_dump(exclude_none=True) if body.smtp else None,
            sync_interval=body.sync_interval,
        ),
        st.box,
        allow_private=st.settings.allow_private_hosts,
    )
    if body.save_sent_copy is not None:
        account.save_sent_copy = body.save_sent_copy
    spam_store.set_account_options(
        account, auto_scan=body.spam_auto_scan, move_to_junk=body.spam_move_to_junk
    )
    return jsonify(account_out(account))


@bp.delete("/<account_id>", responses={204: None, **ERRORS})
def delete_account(path: AccountPath) -> tuple[str, int]:
    """Delete the account and everything synced from it."""
    session = db_session()
    accounts.delete_account(session, accounts.get_account(session, path.account_id, principal()))
    return "", 204


def accepted(
    record: TaskRecord,
    *,
    created: bool,
    model: type[TaskAccepted] = TaskAccepted,
    status: int = 202,
    **extra: Any,
) -> tuple[Response, int]:
    """The answer of a route that queued work: the task, where to poll it (also as
    ``Location``), and whether an equivalent task in flight was returned instead."""
    body = model(
        task_id=record.id,
        state=record.state,
        queue=record.queue,
        status_url=url_for("tasks.get_task", task_id=record.id),
        deduplicated=not created,
        **extra,
    )
    response = jsonify(body.model_dump())
    response.headers["Location"] = body.status_url
    return response, status


def queue_task(account_id: str, type: str, params: dict[str, Any]) -> tuple[Response, int]:
    """Check the account is the caller's, then record the task, commit and publish: one
    transaction on the request's session (one connection), the publish after the commit.
    Another's account is a 404; over the tenant's cap of tasks in flight on the queue, a
    429 with ``Retry-After``."""
    who = principal()
    st = state()
    result = dispatch(
        st.celery,
        db_session(),
        type=type,
        tenant_id=who.tenant_id,
        user_id=who.user_id,
        account_id=account_id,
        params=params,
        visible_to=who,  # the account check, in the same round trip as the cap
    )
    return accepted(result.record, created=result.created)


@bp.post("/<account_id>/verify", responses={202: TaskAccepted, **ERRORS})
def verify_account(path: AccountPath) -> tuple[Response, int]:
    """Queue a real login to the IMAP and SMTP servers; the task's result lists their
    capabilities, or its error says exactly what failed."""
    return queue_task(path.account_id, "verify", {})


@bp.post("/<account_id>/sync", responses={202: TaskAccepted, **ERRORS})
def sync_account(path: AccountPath, body: SyncParams) -> tuple[Response, int]:
    """Queue a sync. While one is in flight for the account, its task is returned instead
    (``deduplicated: true``)."""
    return queue_task(path.account_id, "sync", body.model_dump(exclude_defaults=True))
