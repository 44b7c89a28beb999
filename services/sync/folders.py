"""The account's folder list: what the server has (LIST with special-use attributes), the
Folder rows that mirror it, and the order in which sync visits them."""

from __future__ import annotations

from dataclasses import dataclass

import imapclient
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.models import Folder

# RFC 6154 attributes → Folder.special_use.
SPECIAL_USE = {
    "\\sent": "sent",
    "\\drafts": "drafts",
    "\\trash": "trash",
    "\\junk": "junk",
    "\\archive": "archive",
}
# For servers without SPECIAL-USE: the names clients commonly give these folders.
NAME_FALLBACK = {
    "sent": "sent",
    "sent items": "sent",
    "sent messages": "sent",
    "sent mail": "sent",
    "drafts": "drafts",
    "draft": "drafts",
    "trash": "trash",
    "deleted items": "trash",
    "deleted messages": "trash",
    "junk": "junk",
    "junk e-mail": "junk",
    "spam": "junk",
    "archive": "archive",
    "archives": "archive",
}
VISIT_ORDER = ("inbox", "sent", "drafts", "archive", "junk", "trash")
NOT_SELECTABLE = {"\\noselect", "\\nonexistent"}


@dataclass(frozen=True)
class RemoteFolder:
    name: str
    delimiter: str | None
    flags: tuple[str, ...]
    special_use: str | None

    @property
    def selectable(self) -> bool:
        return not NOT_SELECTABLE.intersection(f.lower() for f in self.flags)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def list_remote_folders(client: imapclient.IMAPClient) -> list[RemoteFolder]:
    """Every folder the server lists, with its special use: INBOX is ``"inbox"``, RFC 6154
    attributes map to ``sent``/``drafts``/``trash``/``junk``/``archive``, and only when the
    server marks none of a kind do common names stand in for the attribute."""
    found: dict[str, RemoteFolder] = {}
    for flags, delimiter, raw_name in client.list_folders():
        name = _text(raw_name)
        flag_names = tuple(_text(f) for f in flags)
        use = "inbox" if name.upper() == "INBOX" else None
        for flag in flag_names:
            use = use or SPECIAL_USE.get(flag.lower())
        found.setdefault(name, RemoteFolder(name, _text(delimiter) if delimiter else None, flag_names, use))
    marked = {f.special_use for f in found.values() if f.special_use}
    for name, folder in list(found.items()):
        guess = NAME_FALLBACK.get(name.lower())
        if folder.special_use is None and guess and guess not in marked:
            found[name] = RemoteFolder(folder.name, folder.delimiter, folder.flags, guess)
    return list(found.values())


def store_folders(
    session: Session, *, tenant_id: str, account_id: str, remote: list[RemoteFolder]
) -> tuple[list[Folder], list[Folder]]:
    """Make the account's Folder rows match ``remote``: new ones created, attributes
    refreshed. Returns the rows (in visiting order) and the folders gone from the server,
    which are left in place: their messages may have been renamed or moved elsewhere, and
    the caller deletes them once the other folders had their chance to match them. Their
    sync state is cleared: should one come back before that (renamed back), some of its
    rows may have gone to another folder meanwhile, so it is rebuilt, not continued."""
    rows = {f.name: f for f in session.scalars(select(Folder).where(Folder.account_id == account_id))}
    wanted = {f.name: f for f in remote}
    gone = [rows[name] for name in rows if name not in wanted]
    for folder in gone:
        folder.uidvalidity = folder.uidnext = folder.highestmodseq = None
        folder.last_seen_uid = folder.backfill_below_uid = folder.server_message_count = None
    for name, info in wanted.items():
        row = rows.get(name)
        if row is None:
            row = Folder(
                tenant_id=tenant_id, account_id=account_id, name=name, message_count=0, unread_count=0
            )
            session.add(row)
            rows[name] = row
        row.delimiter = info.delimiter
        row.flags = list(info.flags)
        row.special_use = info.special_use
    session.flush()
    kept = [rows[name] for name in wanted]
    return sorted(kept, key=visit_key), gone


def visit_key(folder: Folder) -> tuple[int, str]:
    """INBOX first, then the other special-use folders, then the rest by name."""
    use = folder.special_use
    rank = VISIT_ORDER.index(use) if use in VISIT_ORDER else len(VISIT_ORDER)
    return rank, folder.name.lower()


def is_selectable(folder: Folder) -> bool:
    return not NOT_SELECTABLE.intersection(f.lower() for f in folder.flags or [])
