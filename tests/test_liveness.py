"""Worker liveness through a heartbeat file: it keeps being touched while the broker is
down, and the worker serves again once the broker is back."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from mailroom.app import create_app
from services.settings import load_settings
from tasks.liveness import HEARTBEAT_SECONDS
from tests.conftest import env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api

pytestmark = pytest.mark.slow


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def test_heartbeat_outlives_a_broker_outage_and_the_worker_serves_again(
    kit, account, base_values: dict[str, Any], tmp_path
) -> None:
    broker = RedisServer()
    broker.start()
    heartbeat = tmp_path / "heartbeat"
    values = {**base_values, "broker_url": broker.url, "worker_heartbeat_file": str(heartbeat)}
    worker = CeleryWorker(["sync"], env=worker_env(env_for(values)), name=f"live-{uuid.uuid4().hex[:6]}")
    worker.start()
    try:
        assert heartbeat.exists()
        broker.stop()
        down_at = time.time()
        time.sleep(2 * HEARTBEAT_SECONDS + 1)
        assert _mtime(heartbeat) > down_at  # touched during the outage: a probe passes
        assert worker.is_running()
        broker.start()
        api = Api(create_app(load_settings(**values)), kit.admin_key)
        task = api.wait_task(
            api.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"], timeout=90
        )
        assert task["state"] == "succeeded", task
    finally:
        worker.stop()
        broker.stop()
    assert not heartbeat.exists()  # a stopped worker leaves no fresh-looking file behind
