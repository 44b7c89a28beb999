"""`mailroom flower`, for real: behind the basic auth of MAILROOM_FLOWER_BASIC_AUTH, its API
lists the worker of every queue; without a login it refuses to listen beyond loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import env_for
from tests.servers.ports import free_port
from tests.servers.processes import kill_group

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("workers")]


def _flower(values: dict[str, Any], *args: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILROOM_", "FLOWER_"))}
    env.update(env_for(values))
    env.update(extra)
    return subprocess.Popen(
        [sys.executable, "-m", "mailroom.cli", "flower", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_flower_asks_for_its_login_and_lists_every_queues_worker(base_values: dict[str, Any]) -> None:
    password = "flower-" + uuid.uuid4().hex[:8]
    port = free_port()
    proc = _flower(base_values, f"--port={port}", extra={"MAILROOM_FLOWER_BASIC_AUTH": f"ops:{password}"})
    try:
        url = f"http://127.0.0.1:{port}/api/workers?refresh=1"
        deadline, workers = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            try:
                assert requests.get(url, timeout=5).status_code == 401
                answer = requests.get(url, auth=("ops", password), timeout=15)
            except requests.ConnectionError:
                time.sleep(0.5)
                continue
            assert answer.status_code == 200
            workers = answer.json()
            queues = {q["name"] for info in workers.values() for q in info.get("active_queues") or []}
            if queues >= {"sync", "send", "delete", "spam", "periodic"}:
                break
            time.sleep(1)
        queues = {q["name"] for info in workers.values() for q in info.get("active_queues") or []}
        assert queues >= {"sync", "send", "delete", "spam", "periodic"}, workers
        assert requests.get(url, auth=("ops", "wrong"), timeout=5).status_code == 401
        assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        kill_group(proc)


def test_flower_without_a_login_refuses_to_listen_beyond_loopback(base_values: dict[str, Any]) -> None:
    proc = _flower(base_values, "--address=0.0.0.0", f"--port={free_port()}", extra={})
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"set MAILROOM_FLOWER_BASIC_AUTH" in output
