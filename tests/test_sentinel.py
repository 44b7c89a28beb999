"""Broker and result backend behind Redis Sentinel, for real: a master, a replica and a
sentinel; tasks queued while no worker runs survive the master's death and the replica's
promotion, and the API, the rate limiter and the workers follow the new master."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis

from mailroom.app import create_app
from services.settings import load_settings
from tests.conftest import env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.sentinel import SentinelServer
from tests.servers.workers import CeleryWorker
from tests.support import Api

pytestmark = pytest.mark.slow


def test_a_failover_during_queued_work_loses_no_task(kit, account, base_values: dict[str, Any]) -> None:
    password = "sentinel-pw-" + uuid.uuid4().hex[:8]
    master = RedisServer(password).start()
    replica = RedisServer(password, replica_of=master).start()
    sentinel = SentinelServer(master).start()
    worker = None
    try:
        sentinel.wait_for_replicas(1)
        values = {
            **base_values,
            "broker_url": f"{sentinel.url}/0",
            "broker_password": password,
            "result_backend_url": f"{sentinel.url}/1",
            "result_backend_password": password,
        }
        api = Api(create_app(load_settings(**values)), kit.admin_key)
        before = [api.post(f"/api/accounts/{account['id']}/verify") for _ in range(12)]
        assert all(r.status_code == 202 for r in before), before[0].get_json()
        # Every queued message is on the replica before the master dies (replication is
        # asynchronous: Redis Sentinel promises no more than what reached the replica).
        old = redis.Redis(host=master.host, port=master.port, password=password)
        assert old.execute_command("WAIT", 1, 5000) == 1
        master.kill()
        sentinel.wait_for_master((replica.host, replica.port))

        # A client keeps going: while the API still reached for the dead master it answered
        # 503 and nothing was queued; once it follows the new master, 202 and queued.
        after = []
        deadline = time.monotonic() + 30
        while len(after) < 4 and time.monotonic() < deadline:
            response = api.post(f"/api/accounts/{account['id']}/verify")
            assert response.status_code in (202, 503), response.get_json()
            if response.status_code == 202:
                after.append(response)
            else:
                refused = api.task(response.get_json()["error"]["details"]["task_id"])
                assert refused["state"] == "failed", refused
                time.sleep(0.5)
        assert len(after) == 4
        assert api.get("/readyz").status_code == 200
        worker = CeleryWorker(
            ["sync"], env=worker_env(env_for(values)), name=f"sentinel-{uuid.uuid4().hex[:6]}"
        )
        worker.start()
        for response in [*before, *after]:
            task = api.wait_task(response.get_json()["task_id"], timeout=90)
            assert task["state"] == "succeeded", task
        promoted = redis.Redis(host=replica.host, port=replica.port, password=password)
        assert promoted.info("replication")["role"] == "master"
    finally:
        if worker is not None:
            worker.stop()
        sentinel.stop()
        replica.stop()
        master.stop()
