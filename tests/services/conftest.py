"""Fixtures for the service-layer tests: a real Dovecot (with a command log), a fresh
PostgreSQL database per test module migrated with Alembic, and a Mailroom account (tenant,
user, account) pointing at a fresh Dovecot user.

Nothing is mocked. Tests that break a server (kill it, change its capabilities) start a
private Dovecot of their own through :func:`private_dovecot`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, unrestricted_unsafe_sessions
from services.migrate import upgrade
from services.settings import Settings, load_settings
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import PostgresServer
from tests.services.mailboxes import Mailbox, new_mailbox

BATCH = 50


@pytest.fixture(scope="session")
def sync_dovecot() -> Iterator[DovecotServer]:
    """A Dovecot for the sync tests, logging every command clients send (rawlog)."""
    server = DovecotServer(rawlog=True)
    server.start()
    yield server
    server.stop()


def make_settings(database_url: str, secret_key: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "secret_key": secret_key,
        "allow_private_hosts": True,
        "mail_timeout_seconds": 5,
        "sync_batch_size": BATCH,
        **overrides,
    }
    return load_settings(**values)


@pytest.fixture(scope="session")
def fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@pytest.fixture(scope="module")
def db_engine(postgres: PostgresServer, fernet_key: str) -> Iterator[Engine]:
    """A new, migrated database for each test module on the session's PostgreSQL cluster
    (the ``postgres`` fixture of tests/conftest.py)."""
    name = "svc_" + uuid.uuid4().hex[:10]
    url = postgres.create_database(name)
    engine = make_engine(make_settings(url, fernet_key))
    upgrade(engine)
    yield engine
    engine.dispose()
    postgres.drop_database(name)


@pytest.fixture(scope="module")
def sync_settings(db_engine: Engine, fernet_key: str) -> Settings:
    return make_settings(db_engine.url.render_as_string(hide_password=False), fernet_key)


@pytest.fixture(scope="module")
def db_sessions(db_engine: Engine) -> sessionmaker[Session]:
    return unrestricted_unsafe_sessions(make_sessionmaker(db_engine))


@pytest.fixture(scope="module")
def box(fernet_key: str) -> SecretBox:
    return SecretBox(fernet_key)


@pytest.fixture
def mailbox(
    sync_dovecot: DovecotServer, db_sessions: sessionmaker[Session], sync_settings: Settings, box: SecretBox
) -> Mailbox:
    """A fresh mailbox on the shared sync Dovecot."""
    return new_mailbox(sync_dovecot, db_sessions, sync_settings, box)


@pytest.fixture
def private_dovecot() -> Iterator[Callable[..., DovecotServer]]:
    """Start Dovecot servers of one's own (``private_dovecot(server_class=…)``); all are
    stopped at the end of the test."""
    started: list[DovecotServer] = []

    def start(server_class: type[DovecotServer] = DovecotServer, **kwargs: Any) -> DovecotServer:
        server = server_class(**kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
