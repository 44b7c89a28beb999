"""Spam: check messages, teach the tenant's filter, and the tenant's spam settings."""

from __future__ import annotations

from typing import Literal

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from mailroom.api.accounts import accepted, queue_task
from mailroom.api.common import ERRORS, SECURITY
from mailroom.auth import principal, require_admin
from mailroom.context import db_session, state
from mailroom.schemas import AccountPath, MessagePath, Strict, TaskAccepted
from services import accounts, spam_store
from services.spam_store import MAX_LIST_ENTRIES, TenantSpam
from services.task_inputs import SpamCheckParams, SpamCheckRequest
from tasks.dispatch import dispatch

tag = Tag(name="spam", description="Spam scoring, the tenant's filter and its settings")
bp = APIBlueprint("spam", __name__, url_prefix="/api", abp_tags=[tag], abp_security=SECURITY)

ListEntry = Field(min_length=1, max_length=320)


class SpamLabelAccepted(TaskAccepted):
    message_id: str
    label: Literal["spam", "ham"]


class SpamSettingsOut(BaseModel):
    threshold: float = Field(description="Messages scoring at or above it are spam.")
    allow: list[str] = Field(description="Senders (addresses or domains) never judged spam.")
    block: list[str] = Field(description="Senders always judged spam; wins over allow.")
    learned: int = Field(description="Messages the tenant's filter has learned from.")


class SpamSettingsPatch(Strict):
    threshold: float | None = Field(default=None, ge=0.01, le=0.99)
    allow: list[str] | None = Field(
        default=None,
        max_length=MAX_LIST_ENTRIES,
        description=f"Replaces the allow-list: addresses or domains, at most {MAX_LIST_ENTRIES}.",
    )
    block: list[str] | None = Field(
        default=None,
        max_length=MAX_LIST_ENTRIES,
        description=f"Replaces the block-list: addresses or domains, at most {MAX_LIST_ENTRIES}.",
    )


def settings_out(spam: TenantSpam) -> dict[str, object]:
    return SpamSettingsOut(
        threshold=spam.threshold, allow=spam.allow, block=spam.block, learned=spam.learned
    ).model_dump()


@bp.post("/accounts/<account_id>/spam-check", responses={202: TaskAccepted, **ERRORS})
def check_spam(path: AccountPath, body: SpamCheckRequest) -> tuple[Response, int]:
    """Queue a spam check of up to 1,000 message ids of this account, or of a folder
    (`only_unscored`: only its messages never checked). The task fetches each message
    (bounded size), stores `spam_score`, `is_spam` and `indicators` on it, and with the
    account's `spam_move_to_junk` moves spam to `\\Junk` keeping its id. Any id that is not
    a message of this account visible to the caller makes the request a 404. The task's
    result: `scored`, `spam`, `moved`, `gone`, `truncated`, `junk_folder`, and for ids each
    message's `spam_score` and `is_spam`."""
    session = db_session()
    if body.message_ids is not None:
        spam_store.check_targets(session, principal(), path.account_id, body.message_ids)
        body.message_ids = list(dict.fromkeys(body.message_ids))
    else:
        account = accounts.get_account(session, path.account_id, principal())
        spam_store.folder_of(session, account.id, body.folder or "")
    params = SpamCheckParams.model_validate(body.model_dump())
    return queue_task(path.account_id, "spam_check", params.model_dump(exclude_defaults=True))


def _label(message_id: str, label: Literal["spam", "ham"]) -> tuple[Response, int]:
    session = db_session()
    who = principal()
    message = spam_store.record_label(session, who, message_id, label)
    result = dispatch(
        state().celery,
        session,  # the label and the task record commit together, before the publish
        type="spam_check",
        tenant_id=who.tenant_id,
        user_id=who.user_id,
        account_id=message.account_id,
        params={"message_ids": [message.id], "learn": label},
        visible_to=who,
    )
    return accepted(
        result.record, created=result.created, model=SpamLabelAccepted, message_id=message.id, label=label
    )


@bp.post("/messages/<message_id>/spam", responses={202: SpamLabelAccepted, **ERRORS})
def mark_spam(path: MessagePath) -> tuple[Response, int]:
    """Say the message is spam: its `spam_label` and `is_spam` change at once; a
    `check_spam` task then teaches the tenant's filter (never another tenant's), scores the
    message again and, with the account's `spam_move_to_junk`, moves it to `\\Junk`."""
    return _label(path.message_id, "spam")


@bp.post("/messages/<message_id>/ham", responses={202: SpamLabelAccepted, **ERRORS})
def mark_ham(path: MessagePath) -> tuple[Response, int]:
    """Say the message is not spam: as `/spam`, and with the account's `spam_move_to_junk`
    a message in `\\Junk` goes back to INBOX."""
    return _label(path.message_id, "ham")


@bp.get("/spam/settings", responses={200: SpamSettingsOut, **ERRORS})
def get_settings() -> Response:
    """The tenant's spam threshold and allow- and block-lists (any member may read them)."""
    return jsonify(settings_out(spam_store.read_settings(db_session(), principal().tenant_id)))


@bp.patch("/spam/settings", responses={200: SpamSettingsOut, **ERRORS})
def update_settings(body: SpamSettingsPatch) -> Response:
    """Change the threshold or replace a list (admin role). Entries are email addresses or
    domains (a domain covers its subdomains), stored lower-cased. A new threshold re-judges
    the tenant's checked messages at once; the lists apply from the next check."""
    who = require_admin()
    spam = spam_store.update_settings(
        db_session(), who.tenant_id, threshold=body.threshold, allow=body.allow, block=body.block
    )
    return jsonify(settings_out(spam))
