"""PostgreSQL through PgBouncer in transaction pooling mode, for real: migrations, the API
and a worker's sync all work when every transaction may land on another server
connection, with MAILROOM_DATABASE_PGBOUNCER on."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from mailroom.app import create_app
from services.db import make_engine, make_sessionmaker, unrestricted_unsafe_sessions
from services.migrate import upgrade
from services.settings import load_settings
from tests.conftest import account_body, env_for, worker_env
from tests.servers.pgbouncer import PgBouncerServer
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api, make_tenant

pytestmark = pytest.mark.slow


def test_api_and_worker_through_pgbouncer_in_transaction_mode(
    postgres, base_values: dict[str, Any], dovecot, smtp, mailbox_user
) -> None:
    name = "mailroom_pgb_" + uuid.uuid4().hex[:6]
    postgres.create_database(name)
    bouncer = PgBouncerServer(postgres, pool_size=2).start()
    broker = RedisServer().start()
    worker = None
    try:
        values = {
            **base_values,
            "database_url": bouncer.database_url(name),
            "database_pgbouncer": True,
            "broker_url": broker.url,
        }
        settings = load_settings(**values)
        upgrade(make_engine(settings))  # migrations through PgBouncer too
        app = create_app(settings)
        sessions = unrestricted_unsafe_sessions(make_sessionmaker(make_engine(settings)))
        with sessions() as session:
            kit = make_tenant(session, app)
            session.commit()
        api = Api(app, kit.admin_key)
        messages = [
            f"Subject: m{i}\r\nMessage-ID: <pgb{i}@x>\r\n\r\nbody {i}\r\n".encode() for i in range(30)
        ]
        dovecot.append_messages(*mailbox_user, "INBOX", messages)
        account = api.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user)).get_json()
        worker = CeleryWorker(["sync"], env=worker_env(env_for(values)), name=f"pgb-{uuid.uuid4().hex[:6]}")
        worker.start()
        for _ in range(3):  # the same statements many times: psycopg would prepare them by now
            task = api.wait_task(api.post(f"/api/accounts/{account['id']}/sync").get_json()["task_id"])
            assert task["state"] == "succeeded", task
        listed = [api.get(f"/api/accounts/{account['id']}/messages?limit=5").get_json() for _ in range(12)]
        assert all(len(page["items"]) == 5 for page in listed)
        assert task["result"]["folders_synced"] >= 1
        assert "prepared statement" not in worker.log_text()
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()
        bouncer.stop()
