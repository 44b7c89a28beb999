"""The per-account send rate: sends beyond it wait their turn (never fail), across every
process of the send workers, while the account's connection is reused."""

from __future__ import annotations

import uuid
from itertools import pairwise
from typing import Any

import pytest

from tests.conftest import account_body, env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api
from tests.test_send import delivered


@pytest.mark.slow
def test_sends_beyond_the_account_rate_wait_their_turn(
    kit, dovecot, smtp, mailbox_user, base_values: dict[str, Any]
) -> None:
    from mailroom.app import create_app
    from services.settings import load_settings

    broker = RedisServer()
    broker.start()
    values = {**base_values, "broker_url": broker.url, "send_rate_per_account": "2"}
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    account = api.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user)).get_json()
    worker = CeleryWorker(
        ["send"], env=worker_env(env_for(values)), concurrency=2, name=f"rate-{uuid.uuid4().hex[:6]}"
    )
    try:
        worker.start()
        body = {"to": ["a@example.test"], "text": "paced", "save_sent": False}
        accepted = [api.post(f"/api/accounts/{account['id']}/send", json=body).get_json() for _ in range(6)]
        for item in accepted:
            task = api.wait_task(item["task_id"], timeout=60)
            assert task["state"] == "succeeded" and task["attempts"] == 1, task
        times = sorted(delivered(smtp, item["message_id"])[0]["time"] for item in accepted)
        gaps = [b - a for a, b in pairwise(times)]
        assert min(gaps) >= 0.4, gaps  # 2 per second: 0.5 s apart, less the SMTP round trip
        assert times[-1] - times[0] >= 2.3
    finally:
        worker.stop()
        broker.stop()
