"""The IMAP commands of a move between folders, for deletes and for anything else that
moves messages (spam to ``\\Junk``): :func:`move_uids` and what it needs."""

from __future__ import annotations

from collections.abc import Iterable

import imapclient

from services.mail_delete_journal import expand_uid_set
from services.mail_delete_rows import DeleteRefused
from services.sync.commands import uid_set

#: Messages per batch of a delete (services.mail_delete; the setting
#: ``delete_batch_size`` for the task): a batch's rows commit together and a cancel is
#: honoured between batches. 2,000 are about a tenth of a second of Dovecot's work in
#: bench/bench_delete.py; each batch costs a command and a commit, and 5,000 messages
#: moved in batches of 500 took a quarter longer there.
BATCH_SIZE = 2000
#: The longest UID set one command carries, in octets: RFC 7162 (section 4) asks clients
#: to keep a command line within 8,192 octets, which every server accepts. Sets are
#: written as ranges (``1:2000``), so a batch of neighbouring UIDs is one short command.
MAX_UID_SET = 8000


def copyuid(client: imapclient.IMAPClient) -> dict[int, int]:
    """Source UID → new UID from the COPYUID response code(s) of the last command."""
    mapping: dict[int, int] = {}
    for raw in client._imap.untagged_responses.pop("COPYUID", []):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        _validity, src, dst = text.split()[:3]
        mapping.update(zip(expand_uid_set(src), expand_uid_set(dst), strict=True))
    return mapping


def uid_sets(uids: Iterable[int], limit: int = MAX_UID_SET) -> list[str]:
    """``uids`` as compact UID sets (``"1:5,9"``, ascending) of at most ``limit`` octets
    each: one command's worth each."""
    sets: list[str] = []
    current = ""
    for part in uid_set(uids).split(","):
        if not part:
            continue
        if current and len(current) + 1 + len(part) > limit:
            sets.append(current)
            current = part
        else:
            current = f"{current},{part}" if current else part
    if current:
        sets.append(current)
    return sets


def drain(client: imapclient.IMAPClient) -> None:
    # imaplib keeps every untagged EXPUNGE/FETCH; a 5,000-message delete must not hoard them.
    for key in ("EXPUNGE", "VANISHED", "FETCH", "COPYUID", "EXISTS", "RECENT"):
        client._imap.untagged_responses.pop(key, None)


def expunges_as_ranges(client: imapclient.IMAPClient) -> None:
    """Where the server offers QRESYNC, enable it: the server then answers a MOVE or UID
    EXPUNGE of 2,000 messages with one ``VANISHED`` line of UID ranges instead of 2,000
    ``EXPUNGE`` lines (RFC 7162, section 3.2.10), less for it to write and for this client to
    read. Must come before the first SELECT. Nothing here reads the expunge answers."""
    if has_capability(client, "QRESYNC") and has_capability(client, "ENABLE"):
        client.enable("QRESYNC")


def has_capability(client: imapclient.IMAPClient, capability: str) -> bool:
    return bool(client.has_capability(capability))


def move_uids(client: imapclient.IMAPClient, uids: Iterable[int], target: str) -> dict[int, int]:
    """Move the messages with these UIDs from the folder selected on ``client`` to the
    folder ``target``; return old UID → new UID (from COPYUID) for every message moved.

    ``UID MOVE`` where the server has MOVE; else ``UID COPY``, then ``\\Deleted`` and
    ``UID EXPUNGE`` of exactly the copied UIDs, so another ``\\Deleted`` message of the
    folder stays. UIDs the folder no longer has are simply absent from the map. Needs
    UIDPLUS (COPYUID and UID EXPUNGE): without it :class:`DeleteRefused` is raised and
    nothing is touched. Commands carry UID sets of at most :data:`MAX_UID_SET` octets.
    Leaves the folder selected, and never closes it (CLOSE would expunge every
    ``\\Deleted`` message)."""
    if not has_capability(client, "UIDPLUS"):
        raise DeleteRefused(
            "the IMAP server lacks UIDPLUS: without COPYUID and UID EXPUNGE a move could not "
            "be followed or could take other \\Deleted messages with it; nothing was moved"
        )
    mapping: dict[int, int] = {}
    for command_set in uid_sets(uids):
        drain(client)
        if has_capability(client, "MOVE"):
            client.move(command_set, target)
            new = copyuid(client)
        else:
            client.copy(command_set, target)
            new = copyuid(client)
            for copied in uid_sets(new):
                client.add_flags(copied, [b"\\Deleted"], silent=True)
                client.uid_expunge(copied)
        drain(client)
        mapping.update(new)
    return mapping


def require_uidplus(client: imapclient.IMAPClient) -> None:
    if not has_capability(client, "UIDPLUS"):
        raise DeleteRefused(
            "the IMAP server lacks UIDPLUS: without UID EXPUNGE a delete could take other "
            "\\Deleted messages with it, so nothing was deleted"
        )
