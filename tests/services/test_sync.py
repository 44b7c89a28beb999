"""sync_account against a real Dovecot and a real PostgreSQL database."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select

from services.db import transaction
from services.errors import AuthenticationFailed, TaskCancelled, TransientMailError
from services.models import Account, Message
from tests.servers import mailgen
from tests.servers.dovecot import DovecotServer
from tests.services.conftest import BATCH
from tests.services.mailboxes import (
    BASE_DATE,
    BASIC_CAPABILITIES,
    LimitedDovecot,
    Mailbox,
    make_messages,
    new_mailbox,
)

FETCHING = {"FETCH", "SELECT", "EXAMINE", "SEARCH"}


def assert_mirrors_server(mailbox: Mailbox, folder: str) -> None:
    """The stored rows of ``folder`` are exactly the server's messages, with its flags."""
    with mailbox.imap() as client:
        client.select_folder(folder, readonly=True)
        # imapclient 4 fetches only explicit UID lists (not "1:*"), hence the SEARCH.
        answer = client.fetch(client.search(["ALL"]), ["FLAGS"])
        server = {
            uid: sorted(f.decode() for f in d[b"FLAGS"] if f != b"\\Recent") for uid, d in answer.items()
        }
    stored = {m.uid: sorted(m.flags) for m in mailbox.messages(folder)}
    assert stored == server
    row = mailbox.folder(folder)
    assert row.message_count == len(server)
    assert row.unread_count == sum(1 for f in server.values() if "\\Seen" not in f)
    assert row.backfill_below_uid is None


def commands(summary: dict[str, Any]) -> Counter[str]:
    return Counter(summary["imap_commands"]["by_command"])


# --- first sync ---------------------------------------------------------------------------


def test_first_sync_stores_every_folder_with_special_use(mailbox: Mailbox) -> None:
    mailbox.append("INBOX", make_messages(2 * BATCH + 20))
    mailbox.append("Sent", make_messages(3, prefix="sent"), flags=["\\Seen"])
    mailbox.append("Archive", make_messages(2, prefix="archived"))
    mailbox.server.create_folder(mailbox.user, mailbox.password, "Projects/2024")
    mailbox.append("Projects/2024", make_messages(1, prefix="project"))
    mailbox.server.create_folder(mailbox.user, mailbox.password, "Empty")

    summary = mailbox.sync()

    assert summary["new"] == 2 * BATCH + 20 + 3 + 2 + 1
    assert summary["failed_folders"] == []
    folders = mailbox.folders()
    uses = {name: f.special_use for name, f in folders.items()}
    assert uses["INBOX"] == "inbox"
    assert uses["Sent"] == "sent"
    assert uses["Drafts"] == "drafts"
    assert uses["Trash"] == "trash"
    assert uses["Junk"] == "junk"
    assert uses["Archive"] == "archive"
    assert uses["Projects/2024"] is None
    assert uses["Empty"] is None
    # Maildir++ shows the parent of a nested folder that was never created as \Noselect:
    # stored, not synced.
    assert "\\Noselect" in folders["Projects"].flags or "\\NonExistent" in folders["Projects"].flags
    assert folders["Projects"].uidvalidity is None
    for name in ("INBOX", "Sent", "Archive", "Projects/2024", "Empty", "Drafts"):
        assert_mirrors_server(mailbox, name)
        folder = folders[name]
        assert folder.uidvalidity is not None and folder.highestmodseq is not None
        assert folder.last_synced_at is not None and folder.last_error is None
    assert folders["INBOX"].message_count == 2 * BATCH + 20
    assert folders["Sent"].unread_count == 0

    # INBOX goes first, newest first, in batches; progress moves forward to 100.
    stages = [stage for _, stage in mailbox.reports if ": " in stage]
    assert stages[0].startswith("INBOX: ")
    assert "INBOX: 50 / 120" in stages and "INBOX: 100 / 120" in stages
    percents = [p for p, _ in mailbox.reports]
    assert percents == sorted(percents) and percents[-1] == 100
    inbox = mailbox.messages("INBOX")
    first_batch = sorted(m.uid for m in inbox)[-BATCH:]
    created = {m.uid: m.created_at for m in inbox}
    assert max(created[u] for u in first_batch) <= min(created[u] for u in sorted(created)[:BATCH])

    with transaction(mailbox.sessions) as session:
        account = session.get(Account, mailbox.account_id)
        assert account is not None and account.last_sync_at is not None and account.last_sync_error is None
        assert "QRESYNC" in (account.capabilities or [])


def test_message_fields_are_parsed(mailbox: Mailbox) -> None:
    mailbox.append(
        "INBOX",
        [
            mailgen.message(
                "Grüße aus Köln — café ☕",
                "Héllo wörld, this is the body.\n\nSecond paragraph.",
                sender="Jörg Müller <joerg@example.de>",
                to=["Ann <ann@example.com>", "bob@example.com"],
                cc="Zoë <zoe@example.com>",
                date=BASE_DATE,
                message_id="<fields-1@test>",
                attachment=("résumé.pdf", b"%PDF-1.4 fake"),
                headers={"In-Reply-To": "<parent@test>"},
            ),
            # Raw 8-bit Latin-1 in the headers, an unknown charset and a broken body:
            # stored as well as possible, never a failure.
            b"From: =?x-unknown?q?Odd?= <odd@example.com>\r\nSubject: caf\xe9 cr\xe8me\r\n"
            b"Date: not a date\r\nMessage-ID: <odd-1@test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=x-nonsense\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"!!!not base64!!!\r\n",
            b"Subject: no date, no id\r\nFrom: someone@example.com\r\n\r\n<p>html-less text</p>\r\n",
        ],
    )
    mailbox.sync()
    by_id = {m.message_id_header: m for m in mailbox.messages("INBOX")}
    nice = by_id["<fields-1@test>"]
    assert nice.subject == "Grüße aus Köln — café ☕"
    assert nice.from_addr == "Jörg Müller <joerg@example.de>"
    assert nice.to_addrs == ["Ann <ann@example.com>", "bob@example.com"]
    assert nice.cc_addrs == ["Zoë <zoe@example.com>"]
    assert nice.in_reply_to == "<parent@test>"
    assert nice.date == BASE_DATE
    assert nice.attachments == ["résumé.pdf"]
    assert nice.snippet.startswith("Héllo wörld, this is the body. Second paragraph.")
    assert nice.size > 0 and nice.internal_date is not None and not nice.seen

    odd = by_id["<odd-1@test>"]
    assert odd.subject == "café crème"
    assert odd.from_addr.endswith("<odd@example.com>")
    assert odd.date == odd.internal_date  # no usable Date: the arrival time stands in
    bare = by_id[None]
    assert bare.subject == "no date, no id" and bare.snippet == "<p>html-less text</p>"


# --- incremental sync ---------------------------------------------------------------------


def test_unchanged_account_costs_no_select_or_fetch(mailbox: Mailbox) -> None:
    mailbox.append("INBOX", make_messages(30))
    mailbox.append("Sent", make_messages(5, prefix="sent"))
    mailbox.sync()
    mark = mailbox.server.rawlog_mark(mailbox.user)

    summary = mailbox.sync()

    assert summary["new"] == summary["updated_flags"] == summary["removed"] == 0
    assert summary["folders_unchanged"] == summary["folders_synced"] == 6
    counted = commands(summary)
    assert not FETCHING & set(counted), counted
    assert counted["STATUS"] == 6
    # The server's own log agrees: nothing but LIST and STATUS (and ENABLE, LOGOUT).
    seen_by_server = mailbox.server.imap_command_counts(mailbox.user, since=mark)
    assert not {"SELECT", "EXAMINE", "UID FETCH", "FETCH", "UID SEARCH"} & set(seen_by_server), seen_by_server
    assert_mirrors_server(mailbox, "INBOX")


def test_new_mail_flag_changes_and_expunges_are_picked_up(mailbox: Mailbox) -> None:
    uids = mailbox.append("INBOX", make_messages(40))
    mailbox.sync()
    ids = {m.uid: m.id for m in mailbox.messages("INBOX")}

    mailbox.append("INBOX", make_messages(3, start=100))
    mailbox.server.set_flags(mailbox.user, mailbox.password, "INBOX", uids[:2], ["\\Seen", "\\Flagged"])
    mailbox.server.expunge(mailbox.user, mailbox.password, "INBOX", uids[5:7])

    summary = mailbox.sync()

    assert (summary["new"], summary["updated_flags"], summary["removed"]) == (3, 2, 2)
    assert_mirrors_server(mailbox, "INBOX")
    stored = {m.uid: m for m in mailbox.messages("INBOX")}
    assert stored[uids[0]].seen and stored[uids[0]].flagged
    assert all(stored[u].id == ids[u] for u in uids if u in stored)  # ids survive
    counted = commands(summary)
    # QRESYNC: one EXAMINE, one FETCH of the new mail, one FETCH CHANGEDSINCE … VANISHED.
    assert counted["EXAMINE"] == 1 and counted["FETCH"] == 2 and "SEARCH" not in counted
    assert mailbox.folder("INBOX").unread_count == 40 + 3 - 2 - 2  # two expunged, two read

    # And once more: nothing left to do.
    assert not FETCHING & set(commands(mailbox.sync()))


def test_many_new_messages_arrive_in_batches(mailbox: Mailbox) -> None:
    mailbox.append("INBOX", make_messages(10))
    mailbox.sync()
    mailbox.append("INBOX", make_messages(2 * BATCH + 1, start=10))
    summary = mailbox.sync()
    assert summary["new"] == 2 * BATCH + 1
    # ceil(101 / 50) batches, and one CHANGEDSINCE: appending raised HIGHESTMODSEQ.
    assert commands(summary)["FETCH"] == 4
    assert_mirrors_server(mailbox, "INBOX")


# --- UIDVALIDITY and full rebuilds keep ids -----------------------------------------------


def test_uidvalidity_change_rebuilds_and_keeps_matched_ids(mailbox: Mailbox) -> None:
    messages = make_messages(60)
    uids = mailbox.append("INBOX", messages)
    mailbox.sync()
    before = mailbox.ids_by_message_id("INBOX")
    old_validity = mailbox.folder("INBOX").uidvalidity

    # The server loses its UIDs: INBOX emptied, a new UIDVALIDITY, mail appended again in
    # another order (so new UIDs), minus one message and plus a new one.
    mailbox.server.expunge(mailbox.user, mailbox.password, "INBOX", uids)
    mailbox.server.set_uidvalidity(mailbox.user, "INBOX", (old_validity or 0) + 1000)
    kept = messages[1:]
    mailbox.append("INBOX", list(reversed(kept)) + make_messages(1, start=500))

    summary = mailbox.sync()

    assert summary["folders"]["INBOX"]["rebuilt"] is True
    assert summary["kept_ids"] == 59 and summary["new"] == 1 and summary["removed"] == 1
    after = mailbox.ids_by_message_id("INBOX")
    assert len(after) == 60
    assert all(after[key] == before[key] for key in before if key != "<msg-0@test>")
    assert "<msg-0@test>" not in after
    assert mailbox.folder("INBOX").uidvalidity == (old_validity or 0) + 1000
    assert_mirrors_server(mailbox, "INBOX")


def test_full_sync_rebuilds_and_keeps_every_id(mailbox: Mailbox) -> None:
    mailbox.append("INBOX", make_messages(70))
    # Two identical copies: each must keep its own row and id.
    mailbox.append("INBOX", make_messages(1, prefix="twin") * 2)
    mailbox.sync()
    before = {m.uid: m.id for m in mailbox.messages("INBOX")}

    summary = mailbox.sync(full=True)

    assert summary["kept_ids"] == 72 and summary["new"] == 0 and summary["removed"] == 0
    assert {m.uid: m.id for m in mailbox.messages("INBOX")} == before
    assert_mirrors_server(mailbox, "INBOX")


def test_a_moved_message_keeps_its_id(mailbox: Mailbox) -> None:
    uids = mailbox.append("INBOX", make_messages(5))
    mailbox.append("Archive", make_messages(1, prefix="old"))
    mailbox.sync()
    moving = next(m for m in mailbox.messages("INBOX") if m.uid == uids[2])
    with mailbox.imap() as client:
        client.select_folder("INBOX")
        client.move([uids[2]], "Archive")

    summary = mailbox.sync()

    assert summary["removed"] == 1 and summary["kept_ids"] == 1
    archived = {m.message_id_header: m.id for m in mailbox.messages("Archive")}
    assert archived[moving.message_id_header] == moving.id


def test_folders_gone_from_the_server_are_deleted_with_their_messages(mailbox: Mailbox) -> None:
    mailbox.server.create_folder(mailbox.user, mailbox.password, "Old")
    mailbox.append("Old", make_messages(3, prefix="old"))
    mailbox.sync()
    assert len(mailbox.messages("Old")) == 3
    mailbox.server.delete_folder(mailbox.user, mailbox.password, "Old")

    summary = mailbox.sync()

    assert summary["deleted_folders"] == ["Old"]
    assert "Old" not in mailbox.folders()
    with transaction(mailbox.sessions) as session:
        orphans = session.scalar(
            select(func.count()).select_from(Message).where(Message.account_id == mailbox.account_id)
        )
    assert orphans == 0


# --- faults, cancel, options --------------------------------------------------------------


@pytest.mark.slow
def test_server_dies_mid_sync_then_the_next_sync_resumes(private_dovecot: Any, mailbox: Mailbox) -> None:
    server: DovecotServer = private_dovecot()
    box = new_mailbox(server, mailbox.sessions, mailbox.settings, mailbox.box)
    box.append("INBOX", make_messages(4 * BATCH))

    def kill_after_first_batch(percent: float, stage: str) -> None:
        if stage.startswith(f"INBOX: {BATCH} /"):
            server.kill()

    with pytest.raises(TransientMailError):
        box.sync(progress=kill_after_first_batch)
    inbox = box.folder("INBOX")
    stored = box.messages("INBOX")
    # The batch fetched before the kill is still committed (the writer overlaps the fetch
    # of the next one); the batch whose FETCH was cut off is not.
    assert len(stored) in (BATCH, 2 * BATCH)
    # State never runs ahead of the data: the walk says where it stopped, and the counts
    # are those of the rows committed.
    assert inbox.backfill_below_uid == min(m.uid for m in stored)
    assert (inbox.message_count, inbox.unread_count) == (len(stored), len(stored))
    with transaction(box.sessions) as session:
        account = session.get(Account, box.account_id)
        assert account is not None and "IMAP connection failed" in (account.last_sync_error or "")

    server.restart()
    summary = box.sync()

    assert summary["new"] == 4 * BATCH - len(stored)
    assert len(box.messages("INBOX")) == 4 * BATCH  # no duplicates, nothing missing
    assert_mirrors_server(box, "INBOX")


def test_cancel_stops_within_one_batch_and_a_later_sync_completes(mailbox: Mailbox) -> None:
    mailbox.append("INBOX", make_messages(3 * BATCH))

    def cancel_after_first_batch(percent: float, stage: str) -> None:
        if stage.startswith("INBOX: ") and not stage.startswith("INBOX: 0 /"):
            raise TaskCancelled()

    with pytest.raises(TaskCancelled):
        mailbox.sync(progress=cancel_after_first_batch)
    stored = mailbox.messages("INBOX")
    assert len(stored) == BATCH
    inbox = mailbox.folder("INBOX")
    assert inbox.backfill_below_uid == min(m.uid for m in stored)
    assert (inbox.message_count, inbox.unread_count) == (BATCH, BATCH)
    assert max(m.uid for m in stored) == max(mailbox.server_uids("INBOX"))  # newest first

    summary = mailbox.sync()
    assert summary["new"] == 2 * BATCH
    assert_mirrors_server(mailbox, "INBOX")


def test_wrong_password_fails_at_once(sync_dovecot: DovecotServer, mailbox: Mailbox) -> None:
    wrong = new_mailbox(sync_dovecot, mailbox.sessions, mailbox.settings, mailbox.box, password="nope")
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed) as caught:
        wrong.sync()
    assert time.monotonic() - started < 3
    # The server's words as text, not as Python bytes notation (b'...').
    assert caught.value.message == (
        "login: the IMAP server refused the login: [AUTHENTICATIONFAILED] Authentication failed."
    )
    assert wrong.folders() == {}


def test_a_refused_folder_does_not_stop_the_others(mailbox: Mailbox) -> None:
    mailbox.append("INBOX", make_messages(5))
    mailbox.append("Archive", make_messages(2, prefix="archived"))
    mailbox.append("Sent", make_messages(2, prefix="sent"))
    mailbox.server.make_folder_unselectable(mailbox.user, "Archive")
    try:
        summary = mailbox.sync()
    finally:
        mailbox.server.make_folder_selectable(mailbox.user, "Archive")

    assert [f["folder"] for f in summary["failed_folders"]] == ["Archive"]
    assert mailbox.folder("Archive").last_error
    assert len(mailbox.messages("INBOX")) == 5 and len(mailbox.messages("Sent")) == 2

    summary = mailbox.sync()
    assert summary["failed_folders"] == []
    assert mailbox.folder("Archive").last_error is None
    assert_mirrors_server(mailbox, "Archive")


def test_folder_subset_and_unknown_names(mailbox: Mailbox) -> None:
    mailbox.append("INBOX", make_messages(4))
    mailbox.append("Sent", make_messages(2, prefix="sent"))

    summary = mailbox.sync(folders=["Sent", "No Such Folder"])

    unknown = {"folder": "No Such Folder", "error": "no such folder on the server"}
    assert summary["failed_folders"] == [unknown]
    assert summary["folders_synced"] == 1
    assert len(mailbox.messages("Sent")) == 2
    assert mailbox.messages("INBOX") == []
    assert mailbox.folder("INBOX").uidvalidity is None
    with transaction(mailbox.sessions) as session:
        account = session.get(Account, mailbox.account_id)
        assert account is not None and account.last_sync_at is None  # not a whole-account sync


def test_a_sync_of_one_folder_that_sees_half_a_move_goes_on_into_the_others(mailbox: Mailbox) -> None:
    """Another client moved messages from INBOX to Archive; a sync of Archive alone (the
    watcher's, for the folder it heard about first) finds them stored in INBOX, syncs the
    other folders in the same run and so keeps their ids; its progress never goes back."""
    mailbox.append("INBOX", make_messages(3))
    mailbox.sync()
    before = {m.subject: m.id for m in mailbox.messages("INBOX")}
    with mailbox.server.client(mailbox.user, mailbox.password) as client:
        client.select_folder("INBOX")
        client.move(client.search(["ALL"])[:2], "Archive")

    summary = mailbox.sync(folders=["Archive"])

    assert {"Archive", "INBOX"} <= set(summary["folders"]), summary
    archived = {m.subject: m.id for m in mailbox.messages("Archive")}
    assert archived == {s: i for s, i in before.items() if s in archived}  # the same ids
    assert len(mailbox.messages("Archive")) == 2 and len(mailbox.messages("INBOX")) == 1
    percents = [p for p, _ in mailbox.reports]
    assert percents == sorted(percents), percents
    assert_mirrors_server(mailbox, "INBOX")
    assert_mirrors_server(mailbox, "Archive")


def test_progress_is_weighted_by_folder_size(mailbox: Mailbox) -> None:
    mailbox.append("INBOX", make_messages(2 * BATCH))
    mailbox.append("Archive", make_messages(2 * BATCH, prefix="archived"))
    mailbox.sync()
    percent_after_inbox = next(
        p for p, stage in mailbox.reports if stage == f"INBOX: {2 * BATCH} / {2 * BATCH}"
    )
    assert 45 <= percent_after_inbox <= 55  # half the messages, half the way
    steps = [p for p, _ in mailbox.reports]
    assert max(b - a for a, b in itertools.pairwise(steps)) <= 30  # no big jumps


# --- servers without QRESYNC or without CONDSTORE -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("capability", "condstore"),
    [(BASIC_CAPABILITIES + " CONDSTORE", True), (BASIC_CAPABILITIES, False)],
    ids=["condstore-without-qresync", "no-condstore"],
)
def test_servers_without_qresync_or_condstore(
    private_dovecot: Any, mailbox: Mailbox, capability: str, condstore: bool
) -> None:
    server = private_dovecot(LimitedDovecot, capability=capability)
    box = new_mailbox(server, mailbox.sessions, mailbox.settings, mailbox.box)
    uids = box.append("INBOX", make_messages(BATCH + 10))
    first = box.sync()
    assert first["capabilities"] == {"condstore": condstore, "qresync": False}
    assert_mirrors_server(box, "INBOX")

    box.append("INBOX", make_messages(2, start=100))
    server.set_flags(box.user, box.password, "INBOX", uids[:3], ["\\Seen"])
    server.expunge(box.user, box.password, "INBOX", uids[10:14])
    summary = box.sync()

    assert (summary["new"], summary["updated_flags"], summary["removed"]) == (2, 3, 4)
    assert_mirrors_server(box, "INBOX")
    # Without QRESYNC expunges are found by comparing UID sets: a SEARCH with CONDSTORE,
    # the FLAGS answer for every stored UID without it.
    assert ("SEARCH" in commands(summary)) is condstore

    unchanged = commands(box.sync())
    if condstore:
        assert not FETCHING & set(unchanged)
    else:
        # Flag changes are invisible to STATUS without mod-sequences: every folder is
        # examined and its flags compared.
        assert unchanged["EXAMINE"] == 6 and "SEARCH" not in unchanged
