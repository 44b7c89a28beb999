"""Exact counts and ids in IMAP sync, against a real Dovecot, read back through the API:
folder counts equal the stored rows after every committed batch (a sync cancelled
mid-folder included), expunges are found on servers without QRESYNC (and when the stored
rows do not add up to EXISTS), and a folder renamed on the server keeps every message id."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from imapclient.exceptions import LoginError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from services.accounts import AccountInput, create_account
from services.crypto import SecretBox
from services.db import transaction
from services.errors import TaskCancelled
from services.models import Folder
from services.settings import Settings
from services.tenancy import Principal
from tests.servers.dovecot import WITHOUT_QRESYNC, DovecotServer
from tests.services.mailboxes import Mailbox, make_messages
from tests.support import TenantKit

BATCH = 50


class ApiMailbox:
    """A Dovecot user read by an account of ``kit``: synced in-process, looked at through
    the API (the folder list and the message list, as a client sees them)."""

    def __init__(self, mailbox: Mailbox, kit: TenantKit) -> None:
        self.mailbox = mailbox
        self.kit = kit
        self.url = f"/api/accounts/{mailbox.account_id}"

    def folders(self) -> dict[str, dict[str, Any]]:
        response = self.kit.admin.get(f"{self.url}/folders")
        assert response.status_code == 200, response.get_json()
        return {f["name"]: f for f in response.get_json()["items"]}

    def messages(self, folder: str | None = None, **filters: str) -> list[dict[str, Any]]:
        """Every message the API lists (all pages)."""
        params = dict(filters, limit="500", **({"folder": folder} if folder else {}))
        found: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = dict(params, **({"cursor": cursor} if cursor else {}))
            response = self.kit.admin.get(f"{self.url}/messages", query_string=query)
            assert response.status_code == 200, response.get_json()
            body = response.get_json()
            found += body["items"]
            cursor = body["next_cursor"]
            if not cursor:
                return found

    def assert_counts_match_rows(self) -> None:
        """Every folder's counts are what the message list holds for it."""
        for name, folder in self.folders().items():
            listed = self.messages(name)
            unread = [m for m in listed if not m["seen"]]
            assert (folder["message_count"], folder["unread_count"]) == (len(listed), len(unread)), name


def reader_for(
    kit: TenantKit, server: DovecotServer, sessions: sessionmaker[Session], settings: Settings
) -> ApiMailbox:
    """A fresh user on ``server`` and an account of ``kit``'s admin reading it, synced in
    batches of 50."""
    tag = uuid.uuid4().hex[:10]
    user, password = f"u{tag}", f"pw-{tag}"
    server.add_user(user, password)
    box = SecretBox(settings.encryption_keys())
    principal = Principal(tenant_id=kit.tenant_id, user_id=kit.admin_id, role="admin")
    endpoint = {
        "host": "127.0.0.1",
        "port": server.port,
        "tls": "none",
        "username": user,
        "password": password,
    }
    with transaction(sessions) as session:
        account = create_account(
            session,
            principal,
            AccountInput(email=f"{user}@example.test", name="test", imap=endpoint, smtp=dict(endpoint)),
            box,
            allow_private=True,
        )
        account_id = account.id
    mailbox = Mailbox(
        server,
        user,
        password,
        account_id,
        principal,
        sessions,
        settings.model_copy(update={"sync_batch_size": BATCH}),
        box,
    )
    # The first login creates the special-use folders (a new user may be refused for a
    # moment while Dovecot notices the changed passwd file).
    deadline = time.monotonic() + 5
    while True:
        try:
            with mailbox.imap() as client:
                client.noop()
            break
        except LoginError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return ApiMailbox(mailbox, kit)


@pytest.fixture
def api_box(
    kit: TenantKit, dovecot: DovecotServer, sessions: sessionmaker[Session], settings: Settings
) -> ApiMailbox:
    return reader_for(kit, dovecot, sessions, settings)


def cancel_after(prefix: str, batches: int = 1) -> Callable[[float, str], None]:
    """A progress callback that cancels once ``batches`` batches of a stage starting with
    ``prefix`` were committed (progress is reported after each commit)."""
    seen: list[str] = []

    def progress(percent: float, stage: str) -> None:
        if stage.startswith(prefix) and not stage.startswith(f"{prefix}0 /"):
            seen.append(stage)
            if len(seen) >= batches:
                raise TaskCancelled()

    return progress


# --- counts after every committed batch ---------------------------------------------------


def test_counts_match_stored_rows_after_a_cancel_mid_folder(api_box: ApiMailbox) -> None:
    box = api_box.mailbox
    uids = box.append("INBOX", make_messages(3 * BATCH))
    box.server.set_flags(box.user, box.password, "INBOX", uids[-10:], ["\\Seen"])

    # The first sync, cancelled after two batches of INBOX's walk.
    with pytest.raises(TaskCancelled):
        box.sync(progress=cancel_after("INBOX: ", 2))
    assert len(api_box.messages("INBOX")) == 2 * BATCH
    api_box.assert_counts_match_rows()
    assert api_box.folders()["INBOX"]["unread_count"] == 2 * BATCH - 10

    # A full rebuild cancelled mid-walk: rows taken over, the rest still pending.
    box.sync()
    box.server.set_flags(box.user, box.password, "INBOX", uids[-20:], ["\\Seen"])
    with pytest.raises(TaskCancelled):
        box.sync(full=True, progress=cancel_after("INBOX: ", 1))
    api_box.assert_counts_match_rows()

    # New mail arriving in several batches, cancelled after the first one.
    box.sync()
    box.append("INBOX", make_messages(3 * BATCH, start=1000))
    with pytest.raises(TaskCancelled):
        box.sync(progress=cancel_after("INBOX: ", 1))
    assert len(api_box.messages("INBOX")) == 4 * BATCH
    api_box.assert_counts_match_rows()

    # Flag changes and expunges, then a sync that completes.
    box.server.set_flags(box.user, box.password, "INBOX", uids[:5], ["\\Seen"])
    box.server.expunge(box.user, box.password, "INBOX", uids[5:9] + uids[-3:])
    summary = box.sync()
    assert summary["removed"] == 7
    api_box.assert_counts_match_rows()
    inbox = api_box.folders()["INBOX"]
    assert inbox["message_count"] == 6 * BATCH - 7 == len(box.server_uids("INBOX"))


def test_counts_written_wrong_earlier_are_repaired_by_the_next_sync(api_box: ApiMailbox) -> None:
    box = api_box.mailbox
    box.append("INBOX", make_messages(30))
    box.sync()
    with transaction(box.sessions) as session:
        session.execute(
            update(Folder)
            .where(Folder.account_id == box.account_id, Folder.name == "INBOX")
            .values(message_count=0, unread_count=0)
        )
    box.sync()  # nothing changed on the server
    api_box.assert_counts_match_rows()
    assert api_box.folders()["INBOX"]["message_count"] == 30


# --- expunges without QRESYNC -------------------------------------------------------------


@pytest.fixture(scope="module")
def condstore_dovecot() -> Iterator[DovecotServer]:
    """A Dovecot announcing CONDSTORE but not QRESYNC."""
    server = DovecotServer(imap_capability=WITHOUT_QRESYNC)
    server.start()
    yield server
    server.stop()


def _server_status(box: Mailbox, folder: str) -> dict[bytes, int]:
    with box.imap() as client:
        return client.folder_status(folder, [b"MESSAGES", b"HIGHESTMODSEQ"])  # type: ignore[no-any-return]


def _as_if_the_expunge_left_highestmodseq(box: Mailbox, folder: str, *, exists_too: bool) -> None:
    """Store the server's current HIGHESTMODSEQ (and, with ``exists_too``, MESSAGES) as the
    folder's state: what a sync sees from a server whose expunge does not raise
    HIGHESTMODSEQ (allowed without QRESYNC), caught when the count matched. Dovecot
    itself always raises it, so the state is set here."""
    status = _server_status(box, folder)
    values: dict[str, Any] = {"highestmodseq": int(status[b"HIGHESTMODSEQ"])}
    if exists_too:
        values["server_message_count"] = int(status[b"MESSAGES"])
    with transaction(box.sessions) as session:
        session.execute(
            update(Folder).where(Folder.account_id == box.account_id, Folder.name == folder).values(**values)
        )


@pytest.mark.parametrize("exists_too", [False, True], ids=["exists-changed", "status-looks-unchanged"])
def test_condstore_without_qresync_finds_an_expunge_that_left_highestmodseq(
    kit: TenantKit,
    condstore_dovecot: DovecotServer,
    sessions: sessionmaker[Session],
    settings: Settings,
    exists_too: bool,
) -> None:
    api = reader_for(kit, condstore_dovecot, sessions, settings)
    box = api.mailbox
    uids = box.append("INBOX", make_messages(20))
    first = box.sync()
    assert first["capabilities"] == {"condstore": True, "qresync": False}

    box.server.expunge(box.user, box.password, "INBOX", uids[3:5])
    _as_if_the_expunge_left_highestmodseq(box, "INBOX", exists_too=exists_too)
    summary = box.sync()

    assert summary["removed"] == 2
    assert {m["uid"] for m in api.messages("INBOX")} == set(box.server_uids("INBOX"))
    api.assert_counts_match_rows()


def test_qresync_server_compares_uids_when_rows_do_not_add_up_to_exists(api_box: ApiMailbox) -> None:
    box = api_box.mailbox
    uids = box.append("INBOX", make_messages(20))
    assert box.sync()["capabilities"]["qresync"] is True

    # The expunge is not named by VANISHED (CHANGEDSINCE is not even asked: the stored
    # HIGHESTMODSEQ is current), yet EXISTS is two below the stored rows.
    box.server.expunge(box.user, box.password, "INBOX", uids[:2])
    _as_if_the_expunge_left_highestmodseq(box, "INBOX", exists_too=False)
    summary = box.sync()

    assert summary["removed"] == 2
    assert {m["uid"] for m in api_box.messages("INBOX")} == set(box.server_uids("INBOX"))
    api_box.assert_counts_match_rows()


# --- a renamed folder keeps every message id ----------------------------------------------


def _ids_by_folder(api: ApiMailbox) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for message in api.messages():
        found.setdefault(message["folder"], set()).add(message["id"])
    return found


@pytest.mark.parametrize("doveadm", [False, True], ids=["imap-rename", "doveadm-rename"])
def test_a_renamed_folder_keeps_every_message_id(api_box: ApiMailbox, doveadm: bool) -> None:
    box = api_box.mailbox
    box.server.create_folder(box.user, box.password, "Projects")
    uids = box.append("Projects", make_messages(2 * BATCH + 5, prefix="proj"))
    box.server.set_flags(box.user, box.password, "Projects", uids[:7], ["\\Seen"])
    box.append("INBOX", make_messages(3))
    box.sync()
    before = _ids_by_folder(api_box)
    assert len(before["Projects"]) == 2 * BATCH + 5

    box.server.rename_folder(box.user, box.password, "Projects", "Clients", doveadm=doveadm)
    summary = box.sync()

    after = _ids_by_folder(api_box)
    assert "Projects" not in after and "Projects" not in api_box.folders()
    assert after["Clients"] == before["Projects"]
    assert after["INBOX"] == before["INBOX"]
    assert summary["kept_ids"] == 2 * BATCH + 5 and summary["new"] == 0
    assert summary["deleted_folders"] == ["Projects"]
    api_box.assert_counts_match_rows()
    assert api_box.folders()["Clients"]["unread_count"] == 2 * BATCH + 5 - 7


def test_a_rename_interrupted_half_way_keeps_every_id_on_the_next_sync(api_box: ApiMailbox) -> None:
    box = api_box.mailbox
    box.server.create_folder(box.user, box.password, "Projects")
    box.append("Projects", make_messages(3 * BATCH, prefix="proj"))
    box.sync()
    before = _ids_by_folder(api_box)["Projects"]

    box.server.rename_folder(box.user, box.password, "Projects", "Clients")
    with pytest.raises(TaskCancelled):
        box.sync(progress=cancel_after("Clients: ", 1))
    # Half-way: the old folder is still listed with the messages not yet matched, and
    # every folder's counts agree with its rows.
    half = _ids_by_folder(api_box)
    assert half["Clients"] | half["Projects"] == before and not half["Clients"] & half["Projects"]
    assert len(half["Clients"]) == BATCH
    api_box.assert_counts_match_rows()

    # A sync of only the renamed folder goes on matching; the old folder waits for a sync
    # of every folder to be deleted.
    box.sync(folders=["Clients"])
    assert _ids_by_folder(api_box) == {"Clients": before}
    box.sync()
    assert "Projects" not in api_box.folders()
    assert _ids_by_folder(api_box) == {"Clients": before}
    api_box.assert_counts_match_rows()


def test_a_folder_deleted_on_the_server_goes_with_its_messages(api_box: ApiMailbox) -> None:
    box = api_box.mailbox
    box.server.create_folder(box.user, box.password, "Old")
    box.append("Old", make_messages(3, prefix="old"))
    box.sync()
    box.server.delete_folder(box.user, box.password, "Old")

    summary = box.sync()

    assert summary["deleted_folders"] == ["Old"] and summary["removed"] == 0
    assert "Old" not in api_box.folders()
    assert api_box.messages() == []
    with transaction(box.sessions) as session:
        assert (
            session.scalar(select(Folder.id).where(Folder.account_id == box.account_id, Folder.name == "Old"))
            is None
        )
