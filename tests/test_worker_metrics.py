"""Workers' own metrics: a real worker process (prefork, one pool child) with a
multiprocess directory and a metrics port, scraped over HTTP after real tasks ran."""

from __future__ import annotations

import time
import urllib.request
import uuid
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailroom.app import create_app
from services.settings import load_settings
from tests.conftest import account_body, env_for, worker_env
from tests.servers.ports import free_port
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    total = 0.0
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()):
            total += value
    return total


@pytest.fixture
def metered_worker(base_values: dict[str, Any], tmp_path) -> Any:
    broker = RedisServer()
    broker.start()
    values = {**base_values, "broker_url": broker.url}
    port = free_port()
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = worker_env(env_for(values))
    env.update({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "MAILROOM_WORKER_METRICS_PORT": str(port)})
    worker = CeleryWorker(["sync"], env=env, name=f"metered-{uuid.uuid4().hex[:6]}")
    worker.start()
    try:
        yield values, port
    finally:
        worker.stop()
        broker.stop()


def test_worker_counts_outcomes_queue_wait_messages_and_mail_faults(
    kit, dovecot, smtp, mailbox_user, metered_worker
) -> None:
    values, port = metered_worker
    messages = [
        f"Subject: m{i}\r\nMessage-ID: <m{i}@example.test>\r\n\r\nbody {i}\r\n".encode() for i in range(3)
    ]
    dovecot.append_messages(*mailbox_user, "INBOX", messages)
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    good = api.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user)).get_json()
    bad = api.post(
        "/api/accounts", json=account_body(dovecot, smtp, (mailbox_user[0], "wrong-password"))
    ).get_json()
    synced = api.wait_task(api.post(f"/api/accounts/{good['id']}/sync").get_json()["task_id"])
    assert synced["state"] == "succeeded", synced
    refused = api.wait_task(api.post(f"/api/accounts/{bad['id']}/verify").get_json()["task_id"])
    assert refused["state"] == "failed" and refused["error"]["code"] == "mail_auth_failed"

    deadline = time.monotonic() + 10
    while True:  # the record is written before the attempt's metrics are: allow a moment
        samples = _scrape(port)
        if _value(samples, "mailroom_worker_tasks_total") >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _value(samples, "mailroom_worker_tasks_total", type="sync", queue="sync", outcome="succeeded") == 1
    assert _value(samples, "mailroom_worker_tasks_total", type="verify", queue="sync", outcome="failed") == 1
    assert _value(samples, "mailroom_queue_wait_seconds_count", queue="sync") == 2
    assert _value(samples, "mailroom_task_run_seconds_count", type="sync") == 1
    assert _value(samples, "mailroom_tasks_in_progress", queue="sync") == 0
    assert synced["result"]["new"] == 3
    assert _value(samples, "mailroom_worker_messages_total", action="synced") == 3
    assert _value(samples, "mailroom_mail_errors_total", protocol="imap", kind="auth") == 1
    # No secret, address or tenant in any label.
    text = repr(samples)
    for secret in (mailbox_user[1], mailbox_user[0], kit.tenant_id, kit.admin_key, good["id"]):
        assert secret not in text
