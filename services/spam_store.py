"""What spam scoring reads and writes in the database (:mod:`services.spam_check` does the
IMAP side; :mod:`services.spam` scores, with no database).

Promises:

* A tenant's settings (threshold, allow- and block-list) and its learned layer live in one
  ``spam_settings`` row, made on first write; a tenant without one reads the defaults.
  List entries are lower-cased addresses or domains, at most :data:`MAX_LIST_ENTRIES` each.
* A message's ``is_spam`` is its score at the tenant's threshold, unless a user labelled it:
  the label wins. Changing the threshold re-judges the tenant's checked messages in one
  statement, so the list filter and the views agree with the new threshold at once.
* Learning updates the tenant's layer under a lock of its row (``SELECT … FOR UPDATE`` on
  PostgreSQL; SQLite serialises writers, and the row is written before it is read), so two
  workers learning for one tenant never lose an update. Another tenant's layer is never
  read or written.
* Like :mod:`services.sync.state`, the writers run inside the caller's transaction and
  never commit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import JSON, Boolean, Table, bindparam, case, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.errors import NotFound, ValidationFailed
from services.mail_delete_rows import check_deletable
from services.models import (
    Account,
    Folder,
    Message,
    SpamSettings,
    TaskRecord,
    TaskState,
    UTCDateTime,
    utcnow,
)
from services.spam import DEFAULT_THRESHOLD, SenderLists, Verdict
from services.tenancy import Principal, get_scoped, scoped

#: Entries one list may hold.
MAX_LIST_ENTRIES = 5000
#: Indicators stored per message (the strongest first).
MAX_INDICATORS = 20

LABELS = ("spam", "ham")

_DOMAIN = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}"
_ENTRY = re.compile(rf"^(?:[^@\s<>(),;:\"\[\]]{{1,64}}@)?{_DOMAIN}$")


@dataclass(frozen=True)
class TenantSpam:
    threshold: float
    allow: list[str]
    block: list[str]
    layer: bytes | None = None
    learned: int = 0
    updated_at: datetime | None = None

    def lists(self) -> SenderLists:
        return SenderLists(allow=frozenset(self.allow), block=frozenset(self.block))


def _of(row: SpamSettings | None) -> TenantSpam:
    if row is None:
        return TenantSpam(threshold=DEFAULT_THRESHOLD, allow=[], block=[])
    return TenantSpam(
        threshold=row.threshold,
        allow=list(row.allow or []),
        block=list(row.block or []),
        layer=row.layer,
        learned=row.learned,
        updated_at=row.updated_at,
    )


def read_settings(session: Session, tenant_id: str) -> TenantSpam:
    """The tenant's spam settings and layer (the defaults when it has none yet)."""
    return _of(session.get(SpamSettings, tenant_id))


def normalize_entries(entries: Sequence[str], field: str) -> list[str]:
    """Lower-cased, de-duplicated (first occurrence kept) addresses or domains; anything
    else, or more than :data:`MAX_LIST_ENTRIES`, is a :class:`ValidationFailed` naming it."""
    out: dict[str, None] = {}
    bad: list[str] = []
    for entry in entries:
        value = entry.strip().lower().rstrip(".")
        if len(value) > 320 or not _ENTRY.match(value):
            bad.append(entry[:100])
        else:
            out[value] = None
    if bad:
        raise ValidationFailed(
            f"{field}: entries must be email addresses or domain names",
            field=field,
            context={"invalid": bad[:20]},
        )
    if len(out) > MAX_LIST_ENTRIES:
        raise ValidationFailed(
            f"{field}: at most {MAX_LIST_ENTRIES} entries",
            field=field,
            context={"limit": MAX_LIST_ENTRIES},
        )
    return list(out)


def _ensure_row(session: Session, tenant_id: str) -> None:
    """Make the tenant's row if it has none; a concurrent maker wins harmlessly."""
    values = {
        "tenant_id": tenant_id,
        "threshold": DEFAULT_THRESHOLD,
        "allow": [],
        "block": [],
        "learned": 0,
        "updated_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(postgresql.insert(SpamSettings).values(values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        session.execute(sqlite.insert(SpamSettings).values(values).on_conflict_do_nothing())
    elif session.get(SpamSettings, tenant_id) is None:
        session.execute(insert(SpamSettings).values(values))


def _locked_row(session: Session, tenant_id: str) -> SpamSettings:
    """The tenant's row, locked until the transaction ends."""
    _ensure_row(session, tenant_id)
    if session.get_bind().dialect.name != "postgresql":
        # SQLite has no row locks: a write first takes the database's write lock, so a
        # second learner waits here until this transaction commits, then reads its result.
        session.execute(
            update(SpamSettings)
            .where(SpamSettings.tenant_id == tenant_id)
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    row = session.scalar(
        select(SpamSettings)
        .where(SpamSettings.tenant_id == tenant_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert row is not None
    return row


def update_settings(
    session: Session,
    tenant_id: str,
    *,
    threshold: float | None = None,
    allow: Sequence[str] | None = None,
    block: Sequence[str] | None = None,
) -> TenantSpam:
    """Change the given settings (lists are replaced whole, after :func:`normalize_entries`).
    A new threshold re-judges every checked, unlabelled message of the tenant."""
    allow_list = normalize_entries(allow, "allow") if allow is not None else None
    block_list = normalize_entries(block, "block") if block is not None else None
    row = _locked_row(session, tenant_id)
    if allow_list is not None:
        row.allow = allow_list
    if block_list is not None:
        row.block = block_list
    if threshold is not None and threshold != row.threshold:
        row.threshold = threshold
        session.execute(
            update(Message)
            .where(
                Message.tenant_id == tenant_id, Message.spam_score.is_not(None), Message.spam_label.is_(None)
            )
            .values(is_spam=Message.spam_score >= threshold)
            .execution_options(synchronize_session=False)
        )
    row.updated_at = utcnow()
    session.flush()
    return _of(row)


def set_account_options(account: Account, *, auto_scan: bool | None, move_to_junk: bool | None) -> None:
    """The account's spam options (None leaves one unchanged)."""
    if auto_scan is not None:
        account.spam_auto_scan = auto_scan
    if move_to_junk is not None:
        account.spam_move_to_junk = move_to_junk


# --- labels and learning ---------------------------------------------------------------------


def record_label(session: Session, principal: Principal, message_id: str, label: str) -> Message:
    """Record a user's label on a message the caller may see (else :class:`NotFound`): the
    verdict shown follows the label at once; the learning is the task's."""
    assert label in LABELS
    message: Message | None = session.scalar(scoped(Message, principal).where(Message.id == str(message_id)))
    if message is None:
        raise NotFound("message not found")
    try:
        get_scoped(session, Account, message.account_id, principal, what="account")
    except NotFound:
        raise NotFound("message not found") from None
    message.spam_label = label
    message.is_spam = label == "spam"
    session.flush()
    return message


def learn(
    session: Session,
    tenant_id: str,
    label: str,
    raws: dict[str, bytes],
    teach: Callable[[bytes | None, list[bytes]], bytes],
) -> tuple[bytes | None, int]:
    """Teach the tenant's layer ``label`` from the messages ``raws`` (id → raw) that it has
    not learned that label from yet: ``teach(current layer, raws)`` returns the new layer.
    Under the tenant's row lock, so learners take turns and a retried or redelivered lesson
    is not learned twice. Returns the layer and how many messages it learned from."""
    assert label in LABELS
    row = _locked_row(session, tenant_id)
    done = set(
        session.scalars(select(Message.id).where(Message.id.in_(list(raws)), Message.spam_learned == label))
    )
    todo = [i for i in raws if i not in done]
    if todo:
        row.layer = teach(row.layer, [raws[i] for i in todo])
        row.learned = (row.learned or 0) + len(todo)
        row.updated_at = utcnow()
        session.execute(
            update(Message)
            .where(Message.id.in_(todo))
            .values(spam_learned=label)
            .execution_options(synchronize_session=False)
        )
        session.flush()
    return row.layer, len(todo)


# --- verdicts --------------------------------------------------------------------------------


def verdict_values(verdict: Verdict, threshold: float) -> dict[str, Any]:
    """The columns a verdict sets (``is_spam`` before any user label is applied)."""
    ranked = sorted(verdict.indicators, key=lambda i: abs(i.weight), reverse=True)[:MAX_INDICATORS]
    score = min(1.0, max(0.0, float(verdict.score)))
    return {
        "spam_score": score,
        "is_spam": verdict.is_spam(threshold),
        "indicators": [i.as_dict() for i in ranked],
    }


_MESSAGES = cast(Table, Message.__table__)
_c = _MESSAGES.c
# Core, executed once with every message's parameters (one round trip a batch, not one a
# message). A labelled message keeps its label's verdict, whatever the score says.
_STORE_VERDICT = (
    update(_MESSAGES)
    .where(_c.id == bindparam("b_id"), _c.tenant_id == bindparam("b_tenant"))
    .values(
        spam_score=bindparam("b_score"),
        indicators=bindparam("b_indicators", type_=JSON),
        is_spam=case(
            (_c.spam_label == "spam", True),
            (_c.spam_label == "ham", False),
            else_=bindparam("b_is_spam", type_=Boolean),
        ),
        spam_checked_at=bindparam("b_now", type_=UTCDateTime()),
    )
)


def store_verdicts(session: Session, tenant_id: str, verdicts: dict[str, Verdict], threshold: float) -> None:
    """Write each of the tenant's messages' verdict, in the caller's transaction. A labelled
    message keeps its label's verdict."""
    if not verdicts:
        return
    now = utcnow()
    params = []
    for message_id, verdict in verdicts.items():
        values = verdict_values(verdict, threshold)
        params.append(
            {
                "b_id": message_id,
                "b_tenant": tenant_id,
                "b_score": values["spam_score"],
                "b_indicators": values["indicators"],
                "b_is_spam": values["is_spam"],
                "b_now": now,
            }
        )
    session.execute(_STORE_VERDICT, params)


# --- what a check works on -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    id: str
    folder_id: str
    uid: int
    size: int
    seen: bool
    label: str | None


def check_targets(
    session: Session, principal: Principal, account_id: str, message_ids: Sequence[str]
) -> None:
    """The API's check that every id is a message of ``account_id`` the caller may see
    (else :class:`NotFound` naming the unknown ones); nothing is queued otherwise."""
    check_deletable(session, principal, account_id, message_ids)


def folder_of(session: Session, account_id: str, name: str) -> Folder:
    folder = session.scalar(select(Folder).where(Folder.account_id == account_id, Folder.name == name))
    if folder is None:
        raise NotFound(f"folder {name!r} not found in this account (sync it first)")
    return folder


def plan_targets(
    session: Session,
    account_id: str,
    *,
    message_ids: Sequence[str] | None,
    folder: str | None,
    only_unscored: bool,
) -> tuple[list[Target], list[str]]:
    """The stored messages a check works on, by folder then UID, and the requested ids
    that are no longer stored (``gone``)."""
    m = Message
    query = select(m.id, m.folder_id, m.uid, m.size, m.seen, m.spam_label).where(
        m.account_id == account_id, m.uid > 0
    )
    if message_ids is not None:
        query = query.where(m.id.in_(list(message_ids)))
    else:
        assert folder is not None
        query = query.where(m.folder_id == folder_of(session, account_id, folder).id)
    if only_unscored:
        query = query.where(m.spam_checked_at.is_(None))
    targets = [
        Target(r.id, r.folder_id, r.uid, r.size or 0, bool(r.seen), r.spam_label)
        for r in session.execute(query)
    ]
    targets.sort(key=lambda t: (t.folder_id, t.uid))
    found = {t.id for t in targets}
    gone = [i for i in message_ids or [] if i not in found]
    return targets, gone


def auto_scan_queued(session: Session, account_id: str) -> bool:
    """Whether an automatic check of the account's new mail is queued and not started: a
    second one would find the same messages."""
    found = session.scalar(
        select(func.count())
        .select_from(TaskRecord)
        .where(
            TaskRecord.account_id == account_id,
            TaskRecord.type == "spam_check",
            TaskRecord.origin == AUTO_SCAN_ORIGIN,
            TaskRecord.state == TaskState.QUEUED.value,
        )
    )
    return bool(found)


#: The ``origin`` of a check queued by a sync for an account with ``spam_auto_scan``.
AUTO_SCAN_ORIGIN = "auto_scan"
