"""Filing the Sent copy: APPEND the exact bytes once to the SPECIAL-USE ``\\Sent`` folder,
flagged ``\\Seen``, and store it as a message row at once.

The row is stored with the message's real UID (from APPENDUID, or a SEARCH where the server
lacks UIDPLUS) in the folder row whose UIDVALIDITY matches, exactly as the sync's own FETCH
would make it: the next sync finds that UID stored already and skips it, so the copy keeps
its Mailroom id and is never listed twice. A Sent folder Mailroom has not synced yet (no
folder row, or another UIDVALIDITY) gets no row here; its first sync stores the copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import imapclient
from imapclient.imapclient import SENT
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.errors import PermanentMailError, TransientMailError
from services.models import Folder, Message, new_id, utcnow
from services.sync.fetch import fetch_messages, message_row

MESSAGES = cast(Table, Message.__table__)
FOLDERS = cast(Table, Folder.__table__)

# Core statements built once (every send runs them), each filtered by tenant explicitly.
#: The folder row holding this UIDVALIDITY, read FOR KEY SHARE (see store_copy).
_FOLDER_FOR_COPY = (
    select(FOLDERS.c.id)
    .where(
        FOLDERS.c.tenant_id == bindparam("owner"),
        FOLDERS.c.account_id == bindparam("account_id"),
        FOLDERS.c.name == bindparam("folder"),
        FOLDERS.c.uidvalidity == bindparam("uidvalidity"),
    )
    .with_for_update(read=True, key_share=True)
)
_STORED_ID = select(MESSAGES.c.id).where(
    MESSAGES.c.tenant_id == bindparam("owner"),
    MESSAGES.c.folder_id == bindparam("folder_id"),
    MESSAGES.c.uid == bindparam("uid"),
)
#: Count one more message (and ``:unread``) into the folder, unless its UIDVALIDITY moved.
_COUNT_IN = (
    update(FOLDERS)
    .where(
        FOLDERS.c.id == bindparam("folder_id"),
        FOLDERS.c.tenant_id == bindparam("owner"),
        FOLDERS.c.uidvalidity == bindparam("expected_uidvalidity"),
    )
    .values(
        message_count=FOLDERS.c.message_count + 1,
        unread_count=FOLDERS.c.unread_count + bindparam("unread"),
    )
    .returning(FOLDERS.c.id)
)

_APPENDUID = re.compile(rb"APPENDUID (\d+) (\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class FiledCopy:
    folder: str
    uidvalidity: int
    uid: int
    #: True when the copy was there already (filed by an earlier attempt or by the server).
    existed: bool


def sent_folder(client: imapclient.IMAPClient) -> str:
    folder = client.find_special_folder(SENT)
    if folder is None:
        raise PermanentMailError("the mailbox has no \\Sent folder (SPECIAL-USE); the message was sent")
    return str(folder)


def find_copy(
    client: imapclient.IMAPClient, folder: str, uidvalidity: int, message_id: str
) -> FiledCopy | None:
    """The message with ``message_id`` in ``folder`` (selected by the caller), if it is there."""
    found = client.search(["HEADER", "Message-ID", message_id])
    if not found:
        return None
    return FiledCopy(folder, uidvalidity, max(int(u) for u in found), existed=True)


def append_copy(
    client: imapclient.IMAPClient, folder: str, uidvalidity: int, raw: bytes, message_id: str
) -> FiledCopy:
    """APPEND ``raw`` flagged \\Seen to ``folder`` (selected by the caller); its UID from
    APPENDUID, else found by Message-ID."""
    answer = client.append(folder, raw, flags=[imapclient.SEEN])
    match = _APPENDUID.search(answer if isinstance(answer, bytes) else str(answer).encode())
    if match:
        return FiledCopy(folder, int(match.group(1)), int(match.group(2)), existed=False)
    copy = find_copy(client, folder, uidvalidity, message_id)
    if copy is None:
        raise PermanentMailError(f"the Sent copy of {message_id} was appended but cannot be found")
    return FiledCopy(copy.folder, copy.uidvalidity, copy.uid, existed=False)


def fetch_copy(client: imapclient.IMAPClient, copy: FiledCopy) -> dict[bytes, Any] | None:
    """What the sync's FETCH would read of the copy (its folder selected by the caller), or
    None if the server does not have it."""
    data: dict[int, dict[bytes, Any]] = fetch_messages(client, str(copy.uid), condstore=False)
    return data.get(copy.uid)


def store_copy(
    session: Session, copy: FiledCopy, fetched: dict[bytes, Any] | None, *, tenant_id: str, account_id: str
) -> StoredCopy | None:
    """Store the filed copy as a message row from ``fetched`` (see the module's docstring),
    or None when the folder is not one Mailroom has synced with this UIDVALIDITY. The
    folder's counts are not moved yet: the caller calls :meth:`StoredCopy.count` as the
    last statement of its transaction.

    The folder row is read FOR KEY SHARE: it cannot be deleted before the commit, while
    other sends' count updates of the same folder do not wait for this one. The INSERT
    skips a UID stored already (the sync got there first: its row stands, and counts).
    Every send of an account counts into its one Sent folder row, so that row's lock is
    taken last, just before the commit, and held for nothing else."""
    if fetched is None:
        return None
    row = message_row(copy.uid, fetched)
    folder_id = session.scalar(
        _FOLDER_FOR_COPY,
        {
            "owner": tenant_id,
            "account_id": account_id,
            "folder": copy.folder,
            "uidvalidity": copy.uidvalidity,
        },
    )
    if folder_id is None:
        return None
    now = utcnow()
    record = {
        **row,
        "id": new_id(),
        "tenant_id": tenant_id,
        "account_id": account_id,
        "folder_id": folder_id,
        "created_at": now,
        "updated_at": now,
    }
    stored: str | None = session.scalar(_insert_new(session), record)
    if stored is None:
        found = session.scalar(_STORED_ID, {"owner": tenant_id, "folder_id": folder_id, "uid": copy.uid})
        return StoredCopy(found, None, copy, 0, tenant_id)
    return StoredCopy(stored, folder_id, copy, 0 if row["seen"] else 1, tenant_id)


@dataclass
class StoredCopy:
    """The stored copy's message id, and what :meth:`count` needs to count it in."""

    message_id: str | None
    #: The folder the row was inserted into; None when the row was there already.
    folder_id: str | None
    copy: FiledCopy
    unread: int
    tenant_id: str

    def count(self, session: Session) -> None:
        """Count the inserted row into its folder (an UPDATE that locks the folder row, as
        the last statement before the commit). A sync that changed the folder's UIDVALIDITY
        since the row was inserted made the row stale: :class:`TransientMailError`, so that
        the transaction rolls back and the next attempt, which resumes at ``accepted``,
        finds the copy in Sent and stores it again."""
        if self.folder_id is None:
            return
        counted = session.scalar(
            _COUNT_IN,
            {
                "folder_id": self.folder_id,
                "owner": self.tenant_id,
                "expected_uidvalidity": self.copy.uidvalidity,
                "unread": self.unread,
            },
        )
        if counted is None:
            raise TransientMailError("the Sent folder changed while its copy was being stored; will retry")


def _insert_new_for(dialect: str) -> Any:
    """An INSERT into messages that skips a row whose (folder, UID) is stored already,
    returning the new row's id (None when skipped)."""
    key = ["folder_id", "uid"]
    statement: Any
    if dialect == "postgresql":
        statement = postgresql.insert(MESSAGES).on_conflict_do_nothing(index_elements=key)
    elif dialect == "sqlite":
        statement = sqlite.insert(MESSAGES).on_conflict_do_nothing(index_elements=key)
    else:
        statement = insert(MESSAGES)
    return statement.returning(MESSAGES.c.id)


_INSERT_NEW = {name: _insert_new_for(name) for name in ("postgresql", "sqlite")}


def _insert_new(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    statement = _INSERT_NEW.get(dialect)
    return statement if statement is not None else _insert_new_for(dialect)
