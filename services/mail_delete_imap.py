"""The IMAP commands of a move between folders, for deletes and for anything else that
moves messages (spam to ``\\Junk``): :func:`move_uids` and what it needs."""

from __future__ import annotations

from collections.abc import Iterable

import imapclient

from services.mail_delete_journal import expand_uid_set
from services.mail_delete_rows import DeleteRefused

#: UIDs per IMAP command: short command lines, and a cancel checkpoint every batch.
BATCH_SIZE = 500


def copyuid(client: imapclient.IMAPClient) -> dict[int, int]:
    """Source UID → new UID from the COPYUID response code(s) of the last command."""
    mapping: dict[int, int] = {}
    for raw in client._imap.untagged_responses.pop("COPYUID", []):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        _validity, src, dst = text.split()[:3]
        mapping.update(zip(expand_uid_set(src), expand_uid_set(dst), strict=True))
    return mapping


def drain(client: imapclient.IMAPClient) -> None:
    # imaplib keeps every untagged EXPUNGE/FETCH; a 5,000-message delete must not hoard them.
    for key in ("EXPUNGE", "FETCH", "COPYUID", "EXISTS", "RECENT"):
        client._imap.untagged_responses.pop(key, None)


def has_capability(client: imapclient.IMAPClient, capability: str) -> bool:
    return bool(client.has_capability(capability))


def move_uids(client: imapclient.IMAPClient, uids: Iterable[int], target: str) -> dict[int, int]:
    """Move the messages with these UIDs from the folder selected on ``client`` to the
    folder ``target``; return old UID → new UID (from COPYUID) for every message moved.

    ``UID MOVE`` where the server has MOVE; else ``UID COPY``, then ``\\Deleted`` and
    ``UID EXPUNGE`` of exactly the copied UIDs, so another ``\\Deleted`` message of the
    folder stays. UIDs the folder no longer has are simply absent from the map. Needs
    UIDPLUS (COPYUID and UID EXPUNGE): without it :class:`DeleteRefused` is raised and
    nothing is touched. Commands carry at most :data:`BATCH_SIZE` UIDs each. Leaves the
    folder selected, and never closes it (CLOSE would expunge every ``\\Deleted``
    message)."""
    if not has_capability(client, "UIDPLUS"):
        raise DeleteRefused(
            "the IMAP server lacks UIDPLUS: without COPYUID and UID EXPUNGE a move could not "
            "be followed or could take other \\Deleted messages with it; nothing was moved"
        )
    ordered = sorted(set(uids))
    mapping: dict[int, int] = {}
    for start in range(0, len(ordered), BATCH_SIZE):
        batch = ordered[start : start + BATCH_SIZE]
        drain(client)
        if has_capability(client, "MOVE"):
            client.move(batch, target)
            new = copyuid(client)
        else:
            client.copy(batch, target)
            new = copyuid(client)
            if new:
                client.add_flags(sorted(new), [b"\\Deleted"], silent=True)
                client.uid_expunge(sorted(new))
        drain(client)
        mapping.update(new)
    return mapping


def require_uidplus(client: imapclient.IMAPClient) -> None:
    if not has_capability(client, "UIDPLUS"):
        raise DeleteRefused(
            "the IMAP server lacks UIDPLUS: without UID EXPUNGE a delete could take other "
            "\\Deleted messages with it, so nothing was deleted"
        )
