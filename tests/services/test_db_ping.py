"""The pool pings a connection only after it sat idle (services.db._ping_idle_connections),
against a real PostgreSQL whose backends are terminated under the pool's feet."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from services import db
from services.errors import is_database_fault
from tests.servers.postgres import PostgresServer
from tests.services.conftest import make_settings


@pytest.fixture
def engines(postgres: PostgresServer, fernet_key: str) -> Iterator[tuple[Engine, Engine]]:
    """An engine to test and another one that terminates the first one's backends."""
    name = "ping_" + uuid.uuid4().hex[:10]
    url = postgres.create_database(name)
    tested, killer = (db.make_engine(make_settings(url, fernet_key)) for _ in range(2))
    yield tested, killer
    tested.dispose()
    killer.dispose()
    postgres.drop_database(name)


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def terminate(killer: Engine, pid: int) -> None:
    with killer.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    time.sleep(0.1)  # the backend is gone once the server has handled the signal


def test_an_idle_connection_the_server_closed_is_replaced_at_checkout(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    tested, killer = engines
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.2)
    first = backend_pid(tested)
    terminate(killer, first)
    time.sleep(0.3)  # idle past PING_AFTER_IDLE: the checkout pings and reconnects
    assert backend_pid(tested) != first


def test_a_connection_used_just_now_is_not_pinged_and_a_dead_one_fails_once(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    tested, killer = engines
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 60.0)
    first = backend_pid(tested)
    terminate(killer, first)
    # Within PING_AFTER_IDLE no ping runs: the first statement meets the dead connection,
    # as a fault that a task retries (lifecycle: is_database_fault) ...
    with pytest.raises(OperationalError) as raised:
        backend_pid(tested)
    assert is_database_fault(raised.value)
    # ... and the pool, which discarded its connections then, connects afresh.
    assert backend_pid(tested) != first
