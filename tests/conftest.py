"""Session-wide real servers and the pieces most tests share.

One PostgreSQL cluster, a broker Redis and a separate result-backend Redis, one Dovecot,
one aiosmtpd and one real Celery worker process per queue serve the whole session. Tests
isolate themselves by tenant — every test makes its own tenant, users and keys — which is
exactly the isolation Mailroom promises its users. Tests that break a server (kill a
worker, stop the broker) start private ones instead.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy.orm import Session, sessionmaker

from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.migrate import upgrade
from services.settings import Settings, load_settings
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import PostgresServer
from tests.servers.redis import RedisServer
from tests.servers.smtp import SmtpServer
from tests.servers.workers import CeleryWorker
from tests.support import Api, TenantKit, make_tenant

ROOT = Path(__file__).resolve().parent.parent
QUEUES = ["sync", "send", "delete", "spam", "periodic", "webhooks"]

#: Settings every test process and worker shares. Retries back off from 0.5 s instead of 5 s
#: so retry paths finish in seconds; the policy (doubling, cap, jitter) is the same.
TEST_SETTINGS: dict[str, str] = {
    "allow_private_hosts": "true",
    "retry_base_seconds": "0.5",
    "retry_max_seconds": "4",
    "mail_timeout_seconds": "5",
    "sync_batch_size": "100",
    # The delete fault tests stop a worker between batches of this size.
    "delete_batch_size": "500",
    "log_level": "INFO",
    # Tests fire requests far faster than a client would, many from one address; the
    # limits themselves are tested with their own low values (tests/api/test_ratelimit.py).
    "rate_limit_per_second": "100000",
    "rate_limit_per_minute": "1000000",
    "rate_limit_queue_per_minute": "1000000",
}


def env_for(values: dict[str, Any]) -> dict[str, str]:
    """``MAILROOM_*`` environment variables for a worker, from setting names."""
    return {f"MAILROOM_{k.upper()}": str(v) for k, v in values.items()}


def worker_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a worker subprocess: ours, minus any MAILROOM_* of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def broker() -> Iterator[RedisServer]:
    server = RedisServer(password="broker-secret")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def result_redis() -> Iterator[RedisServer]:
    server = RedisServer(password="results-secret")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer(require_auth=("smtpuser", "smtppass"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def secret_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture(scope="session")
def base_values(
    postgres: PostgresServer, broker: RedisServer, result_redis: RedisServer, secret_key: str
) -> dict[str, Any]:
    """Setting values (by field name) for the shared database, broker and backend."""
    database_url = postgres.create_database("mailroom_" + uuid.uuid4().hex[:8])
    upgrade(make_engine(load_settings(database_url=database_url, secret_key=secret_key)))
    return {
        **TEST_SETTINGS,
        "database_url": database_url,
        "broker_url": broker.url,
        "result_backend_url": result_redis.url,
        "secret_key": secret_key,
    }


@pytest.fixture(scope="session")
def settings(base_values: dict[str, Any]) -> Settings:
    return load_settings(**base_values)


@pytest.fixture(scope="session")
def sessions(settings: Settings) -> sessionmaker[Session]:
    # Tests set up and inspect several tenants' rows: the explicit cross-tenant escape.
    return unrestricted_unsafe_sessions(make_sessionmaker(make_engine(settings)))


@pytest.fixture(scope="session")
def workers(
    base_values: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, CeleryWorker]]:
    """One real worker process per queue, each consuming only its own queue."""
    env = worker_env(env_for(base_values))
    started = {q: CeleryWorker([q], env=env, name=q, cwd=ROOT) for q in QUEUES}
    for worker in started.values():
        worker.start(wait_ready=False)
    for worker in started.values():
        worker.wait_for_log(worker.ready_pattern, timeout=90)
    yield started
    # Stopped together: each warm shutdown takes a few seconds, one after another ~4 s each.
    stoppers = [threading.Thread(target=worker.stop) for worker in started.values()]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()


@pytest.fixture(scope="session")
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from mailroom.app import create_app

    return create_app(settings)


@pytest.fixture
def kit(app: Any, sessions: sessionmaker[Session]) -> TenantKit:
    """A fresh tenant with an admin and a member, each with a key and an API client."""
    with transaction(sessions) as session:
        return make_tenant(session, app)


@pytest.fixture
def other_kit(app: Any, sessions: sessionmaker[Session]) -> TenantKit:
    """A second, unrelated tenant."""
    with transaction(sessions) as session:
        return make_tenant(session, app)


@pytest.fixture
def mailbox_user(dovecot: DovecotServer) -> tuple[str, str]:
    """A fresh IMAP user (name, password) on the shared Dovecot."""
    name = "u" + uuid.uuid4().hex[:10]
    dovecot.add_user(name, "pw-" + name)
    return name, "pw-" + name


def account_body(
    dovecot: DovecotServer, smtp: SmtpServer, user: tuple[str, str], **overrides: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "email": f"{user[0]}@example.test",
        "name": "Test mailbox",
        "imap": {
            "host": "127.0.0.1",
            "port": dovecot.port,
            "tls": "none",
            "username": user[0],
            "password": user[1],
        },
        "smtp": {
            "host": "127.0.0.1",
            "port": smtp.port,
            "tls": "none",
            "username": "smtpuser",
            "password": "smtppass",
        },
    }
    body.update(overrides)
    return body


@pytest.fixture
def account(
    kit: TenantKit, dovecot: DovecotServer, smtp: SmtpServer, mailbox_user: tuple[str, str]
) -> dict[str, Any]:
    """An account of ``kit``'s admin pointing at a fresh Dovecot user and the SMTP server."""
    response = kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user))
    assert response.status_code == 201, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


__all__ = ["Api"]
