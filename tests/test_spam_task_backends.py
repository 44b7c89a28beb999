"""The spam check's service on PostgreSQL and on SQLite, against Dovecot: verdicts and moves
per batch, cancel between batches, learning under the tenant's row lock (two learners at
once lose nothing), a threshold change, and a sync that keeps a checked message's verdict
with its id when another client moves it (out of Junk: labelled ham)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services import spam_check, spam_store
from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.errors import TaskCancelled
from services.migrate import upgrade
from services.models import Account, SpamSettings, TaskRecord
from services.settings import Settings
from services.spam import SpamdClient
from services.task_inputs import SpamCheckParams
from tests.servers.dovecot import DovecotServer
from tests.servers.mailgen import message
from tests.servers.ports import free_port, port_is_open
from tests.servers.postgres import PostgresServer
from tests.servers.processes import running_as_root, terminate_group
from tests.services.conftest import make_settings
from tests.services.mailboxes import Mailbox, new_mailbox


@pytest.fixture(scope="module")
def secret() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def backend(
    request: pytest.FixtureRequest,
    postgres: PostgresServer,
    secret: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[sessionmaker[Session], Settings]]:
    """A migrated PostgreSQL database of its own, or a migrated SQLite file."""
    if request.param == "postgresql":
        url = postgres.create_database("spam_" + uuid.uuid4().hex[:8])
    else:
        path: Path = tmp_path_factory.mktemp("sqlite") / "mailroom.db"
        url = f"sqlite:///{path}"
    settings = make_settings(url, secret)
    engine = make_engine(settings)
    upgrade(engine)
    yield unrestricted_unsafe_sessions(make_sessionmaker(engine)), settings
    engine.dispose()


def mails(count: int, sender: str, subject: str, *, start: int = 0) -> list[bytes]:
    return [
        message(
            f"{subject} {i}",
            f"Text of {subject} number {i}.",
            sender=sender,
            to="reader@mailbox.example",
            message_id=f"<{subject.replace(' ', '')}-{i}@test>",
        )
        for i in range(start, start + count)
    ]


def new_mb(backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer, *, junk: bool) -> Mailbox:
    sessions, settings = backend
    mb = new_mailbox(dovecot, sessions, settings, SecretBox(settings.encryption_keys()))
    with transaction(sessions) as session:
        session.execute(update(Account).where(Account.id == mb.account_id).values(spam_move_to_junk=junk))
    return mb


def run(mb: Mailbox, progress: Any = None, batch_size: int = 200, **params: Any) -> dict[str, Any]:
    return spam_check.check_spam(
        mb.sessions,
        mb.account_id,
        SpamCheckParams.model_validate(params),
        task_id="00000000-0000-0000-0000-000000000000",
        box=mb.box,
        settings=mb.settings,
        progress=progress or (lambda percent, stage: None),
        batch_size=batch_size,
    )


def by_subject(mb: Mailbox) -> dict[str, Any]:
    folders = {f.id: name for name, f in mb.folders().items()}
    return {m.subject: (m, folders[m.folder_id]) for m in mb.messages()}


def test_verdicts_moves_and_cancel_between_batches(
    backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer
) -> None:
    mb = new_mb(backend, dovecot, junk=True)
    mb.append("INBOX", mails(4, "friend@partner.example", "Hello") + mails(3, "x@promo.example", "Promo"))
    mb.sync()
    with transaction(mb.sessions) as session:
        spam_store.update_settings(
            session, mb.principal.tenant_id, block=["promo.example"], allow=["partner.example"]
        )

    stops: list[float] = []

    def cancel_after_first(percent: float, stage: str) -> None:
        if 0 < percent < 100:
            stops.append(percent)
            raise TaskCancelled()

    with pytest.raises(TaskCancelled):
        run(mb, cancel_after_first, batch_size=2, folder="INBOX")
    first = [m for m, _f in by_subject(mb).values() if m.spam_checked_at is not None]
    assert len(first) == 2 and len(stops) == 1  # the first batch is stored, nothing after it

    before = {s: m.id for s, (m, _f) in by_subject(mb).items()}
    result = run(mb, batch_size=2, folder="INBOX", only_unscored=True)
    assert (result["scored"], result["spam"], result["moved"]) == (5, 3, 3)
    rows = by_subject(mb)
    assert {s: m.id for s, (m, _f) in rows.items()} == before
    for subject, (row, folder) in rows.items():
        assert row.spam_checked_at is not None and row.indicators is not None
        assert (folder, row.is_spam) == (("Junk", True) if subject.startswith("Promo") else ("INBOX", False))
    assert len(mb.server_uids("Junk")) == 3 and len(mb.server_uids("INBOX")) == 4
    assert mb.sync()["new"] == 0 and {s: m.id for s, (m, _f) in by_subject(mb).items()} == before

    # A new threshold re-judges stored scores; a user's label is kept.
    hello = rows["Hello 0"][0]
    with transaction(mb.sessions) as session:
        spam_store.record_label(session, mb.principal, hello.id, "spam")
        spam_store.update_settings(session, mb.principal.tenant_id, threshold=0.99)
    rows = by_subject(mb)
    assert rows["Hello 0"][0].is_spam is True and rows["Hello 1"][0].is_spam is False  # allowed: 0
    assert rows["Promo 2"][0].is_spam is True  # a block-listed sender scores 1


def test_two_learners_of_one_tenant_lose_nothing(
    backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer
) -> None:
    mb = new_mb(backend, dovecot, junk=False)
    mb.append("INBOX", mails(6, "billing@portal.example", "Invoice notice"))
    mb.sync()
    ids = [m.id for m in mb.messages("INBOX")]
    errors: list[BaseException] = []

    def learner(chunk: list[str]) -> None:
        try:
            for ident in chunk:
                run(mb, message_ids=[ident], learn="spam")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=learner, args=(ids[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    with transaction(mb.sessions) as session:
        row = session.get(SpamSettings, mb.principal.tenant_id)
        assert row is not None and row.learned == 6 and row.layer
        layer = row.layer
    # A lesson delivered again is not learned twice; the other label is a new lesson.
    assert run(mb, message_ids=ids[:2], learn="spam")["learned"] == 0
    with transaction(mb.sessions) as session:
        row = session.get(SpamSettings, mb.principal.tenant_id)
        assert row is not None and row.learned == 6 and row.layer == layer
    assert run(mb, message_ids=ids[:1], learn="ham")["learned"] == 1


def test_a_sync_keeps_verdicts_with_moved_ids_and_junk_exits_are_ham(
    backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer
) -> None:
    mb = new_mb(backend, dovecot, junk=True)
    mb.append("INBOX", mails(2, "news@letters.example", "Letter") + mails(2, "x@promo.example", "Promo"))
    mb.sync()
    with transaction(mb.sessions) as session:
        spam_store.update_settings(
            session, mb.principal.tenant_id, block=["promo.example"], allow=["letters.example"]
        )
    assert run(mb, folder="INBOX")["moved"] == 2
    checked = {s: (m.id, m.spam_score) for s, (m, _f) in by_subject(mb).items()}
    with mb.imap() as client:
        client.select_folder("INBOX")
        letter = client.search(["SUBJECT", "Letter 0"])
        client.move(letter, "Archive")  # synced after INBOX: its row is matched on insert
        client.select_folder("Junk")
        client.move(client.search(["SUBJECT", "Promo 1"]), "INBOX")  # matched on removal

    summary = mb.sync()
    assert summary["left_junk"] == [checked["Promo 1"][0]]
    rows = by_subject(mb)
    letter_row, letter_folder = rows["Letter 0"]
    assert letter_folder == "Archive" and letter_row.id == checked["Letter 0"][0]
    assert letter_row.spam_score == checked["Letter 0"][1] and letter_row.spam_label is None
    promo_row, promo_folder = rows["Promo 1"]
    assert promo_folder == "INBOX" and promo_row.id == checked["Promo 1"][0]
    assert promo_row.spam_label == "ham" and promo_row.is_spam is False
    assert promo_row.spam_score == checked["Promo 1"][1]
    stayed, stayed_folder = rows["Promo 0"]
    assert stayed_folder == "Junk" and stayed.spam_label is None and stayed.is_spam is True


@pytest.fixture(scope="module")
def spamd() -> Iterator[str]:
    """A private spamd (local rules only, no network tests) on a free port; its address."""
    binary = shutil.which("spamd") or ("/usr/sbin/spamd" if Path("/usr/sbin/spamd").exists() else None)
    if binary is None or not Path("/etc/spamassassin").is_dir():
        pytest.skip("spamd (Debian package spamassassin) is not installed")
    # Not under pytest's temporary root (mode 0700): spamd's children run as nobody and
    # must read the configuration.
    home = Path(tempfile.mkdtemp(prefix="mailroom-spamd-"))
    home.chmod(0o755)
    site = home / "site"
    site.mkdir()
    for source in Path("/etc/spamassassin").iterdir():
        if source.suffix in (".pre", ".cf"):
            shutil.copy(source, site / source.name)
    with (site / "local.cf").open("a") as local:
        local.write("\ndns_available no\nskip_rbl_checks 1\nbayes_auto_learn 0\nuse_bayes 0\n")
    port = free_port()
    argv = [binary, "-x", "-i", "127.0.0.1", "-p", str(port), "-m", "1"]
    argv += [f"--siteconfigpath={site}", "-s", str(home / "spamd.log")]
    if running_as_root():
        argv += ["-u", "nobody"]
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not port_is_open("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"spamd did not start: {(home / 'spamd.log').read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.2)
        address = f"spamd://127.0.0.1:{port}"
        # The first scans load rules lazily and may outlast the client's time budget.
        probe = SpamdClient.from_url(address, timeout=30)
        while probe.check(mails(1, "probe@letters.example", "Probe")[0]) is None:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"spamd does not answer: {(home / 'spamd.log').read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.5)
        yield address
    finally:
        terminate_group(process)
        shutil.rmtree(home, ignore_errors=True)


def test_spamd_joins_as_one_more_indicator(
    backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer, spamd: str
) -> None:
    mb = new_mb(backend, dovecot, junk=False)
    mb.append("INBOX", mails(2, "news@letters.example", "Letter"))
    mb.sync()
    result = run(mb, folder="INBOX")
    assert result["scored"] == 2
    assert all(not any(i["name"] == "spamassassin" for i in m.indicators or []) for m in mb.messages())
    mb.settings = mb.settings.model_copy(update={"spamd_url": spamd})
    run(mb, folder="INBOX")
    for row in mb.messages():
        names = [i["name"] for i in row.indicators or []]
        assert "spamassassin" in names, names


def test_moves_wait_while_a_sync_holds_the_account(
    backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer
) -> None:
    mb = new_mb(backend, dovecot, junk=True)
    mb.append("INBOX", mails(2, "x@promo.example", "Promo"))
    mb.sync()
    with transaction(mb.sessions) as session:
        spam_store.update_settings(session, mb.principal.tenant_id, block=["promo.example"])
        sync_task = TaskRecord(
            tenant_id=mb.principal.tenant_id,
            account_id=mb.account_id,
            type="sync",
            queue="sync",
            state="running",
        )
        session.add(sync_task)
        session.flush()
        session.execute(update(Account).where(Account.id == mb.account_id).values(sync_task_id=sync_task.id))
    result = run(mb, folder="INBOX")
    assert (result["spam"], result["moved"], result["move_deferred"]) == (2, 0, 2)
    assert len(mb.server_uids("INBOX")) == 2 and all(m.is_spam for m in mb.messages("INBOX"))
    with transaction(mb.sessions) as session:
        session.execute(update(TaskRecord).where(TaskRecord.id == sync_task.id).values(state="succeeded"))
    # The sync has ended: the next check moves them, and gives the lock back.
    result = run(mb, folder="INBOX")
    assert (result["moved"], result["move_deferred"]) == (2, 0)
    assert len(mb.server_uids("Junk")) == 2
    with transaction(mb.sessions) as session:
        account = session.get(Account, mb.account_id)
        assert account is not None and account.sync_task_id is None
