"""Test-side handles on a mailbox: the Dovecot user, the Mailroom account reading it, and
ways to seed it and to look at what sync stored."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from imapclient.exceptions import LoginError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services import mail_delete, tenancy
from services.accounts import AccountInput, create_account
from services.crypto import SecretBox
from services.db import transaction
from services.models import Folder, Message
from services.settings import Settings
from services.sync import SyncOptions, sync_account
from services.tenancy import Principal
from tests.servers import mailgen
from tests.servers.dovecot import DovecotServer


@dataclass
class Mailbox:
    """A Dovecot user and the Mailroom account (with its tenant and owner) that reads it."""

    server: DovecotServer
    user: str
    password: str
    account_id: str
    principal: Principal
    sessions: sessionmaker[Session]
    settings: Settings
    box: SecretBox
    reports: list[tuple[float, str]] = field(default_factory=list)

    # -- the server side ---------------------------------------------------------------

    def append(self, folder: str, messages: Sequence[bytes], flags: Sequence[str] = ()) -> list[int]:
        return self.server.append_messages(self.user, self.password, folder, list(messages), flags=flags)

    def imap(self) -> Any:
        return self.server.client(self.user, self.password)

    def server_uids(self, folder: str) -> list[int]:
        return self.server.uids(self.user, self.password, folder)

    # -- Mailroom ------------------------------------------------------------------------

    def sync(
        self,
        *,
        folders: list[str] | None = None,
        full: bool = False,
        progress: Callable[[float, str], None] | None = None,
        settings: Settings | None = None,
    ) -> dict[str, Any]:
        self.reports.clear()

        def record(percent: float, stage: str) -> None:
            self.reports.append((percent, stage))
            if progress is not None:
                progress(percent, stage)

        return sync_account(
            self.sessions,
            self.account_id,
            box=self.box,
            settings=settings or self.settings,
            options=SyncOptions(folders=folders, full=full),
            progress=record,
        )

    def delete(
        self,
        ids: list[str],
        *,
        permanent: bool,
        progress: Callable[[float, str], None] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """services.mail_delete.delete_messages on this account (``options``: its batch size,
        report and finish hooks)."""
        return mail_delete.delete_messages(
            self.sessions,
            self.account_id,
            ids,
            permanent=permanent,
            box=self.box,
            settings=self.settings,
            progress=progress or (lambda percent, stage: None),
            **options,
        )

    def folder(self, name: str) -> Folder:
        with transaction(self.sessions) as session:
            row = session.scalar(
                select(Folder).where(Folder.account_id == self.account_id, Folder.name == name)
            )
            assert row is not None, f"no folder row {name!r}"
            return row

    def folders(self) -> dict[str, Folder]:
        with transaction(self.sessions) as session:
            rows = session.scalars(select(Folder).where(Folder.account_id == self.account_id))
            return {f.name: f for f in rows}

    def messages(self, folder: str | None = None) -> list[Message]:
        with transaction(self.sessions) as session:
            query = select(Message).where(Message.account_id == self.account_id)
            if folder is not None:
                query = query.join(Folder, Folder.id == Message.folder_id).where(Folder.name == folder)
            return list(session.scalars(query.order_by(Message.uid)))

    def ids_by_message_id(self, folder: str) -> dict[str | None, str]:
        return {m.message_id_header: m.id for m in self.messages(folder)}


def new_mailbox(
    server: DovecotServer,
    sessions: sessionmaker[Session],
    settings: Settings,
    box: SecretBox,
    *,
    password: str | None = None,
    role: str = "admin",
) -> Mailbox:
    """A fresh Dovecot user and a fresh tenant/user/account reading it (``password``
    overrides the one stored in Mailroom, to test a wrong one)."""
    tag = uuid.uuid4().hex[:10]
    user, real_password = f"u{tag}", f"pw-{tag}"
    server.add_user(user, real_password)
    # The first login creates the special-use folders. Dovecot's passwd-file driver looks
    # for a changed file at most about once a second, so a brand-new user may be refused
    # for a moment.
    deadline = time.monotonic() + 5
    while True:
        try:
            with server.client(user, real_password) as client:
                client.noop()
            break
        except LoginError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return new_reader(
        server, sessions, settings, box, user, real_password, stored_password=password, role=role
    )


def new_reader(
    server: DovecotServer,
    sessions: sessionmaker[Session],
    settings: Settings,
    box: SecretBox,
    user: str,
    password: str,
    *,
    stored_password: str | None = None,
    role: str = "admin",
) -> Mailbox:
    """A fresh tenant, owner and Mailroom account reading the existing IMAP ``user``."""
    tag = uuid.uuid4().hex[:10]
    with transaction(sessions) as session:
        tenant = tenancy.create_tenant(session, name=f"Tenant {tag}", slug=f"t-{tag}")
        owner = tenancy.create_user(session, tenant_id=tenant.id, email=f"owner@{tag}.test", role=role)
        principal = Principal(tenant_id=tenant.id, user_id=owner.id, role=owner.role)
        endpoint = {
            "host": "127.0.0.1",
            "port": server.port,
            "tls": "none",
            "username": user,
            "password": stored_password or password,
        }
        account = create_account(
            session,
            principal,
            AccountInput(email=f"{user}@example.test", name="test", imap=endpoint, smtp=dict(endpoint)),
            box,
            allow_private=True,
        )
        account_id = account.id
    return Mailbox(server, user, password, account_id, principal, sessions, settings, box)


BASE_DATE = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def make_messages(
    count: int, *, prefix: str = "msg", start: int = 0, size_hint: int | None = None
) -> list[bytes]:
    """``count`` distinct messages, one minute apart, with Message-IDs ``<prefix-N@test>``."""
    return [
        mailgen.message(
            f"{prefix} number {n}",
            f"Body of {prefix} {n}.\nSecond line.",
            sender=f"Sender {n % 7} <sender{n % 7}@example.com>",
            to="owner@example.test",
            date=BASE_DATE + timedelta(minutes=n),
            message_id=f"<{prefix}-{n}@test>",
            size_hint=size_hint,
        )
        for n in range(start, start + count)
    ]


class LimitedDovecot(DovecotServer):
    """A Dovecot that announces only ``capability`` after login, to exercise the paths
    for servers without QRESYNC or without CONDSTORE (``imap_capability`` replaces the
    list Dovecot would announce)."""

    def __init__(self, *, capability: str, **kwargs: Any) -> None:
        super().__init__(imap_capability=capability, **kwargs)


BASIC_CAPABILITIES = "IMAP4rev1 SASL-IR LITERAL+ ENABLE IDLE UIDPLUS MOVE SPECIAL-USE MULTIAPPEND UNSELECT"
