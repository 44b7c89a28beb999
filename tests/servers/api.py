"""The API as deploy/api.yaml runs it: gunicorn with the container's own command line (only
the bind address changed), in its own process group, for tests and benchmarks."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from tests.servers.ports import free_port
from tests.servers.processes import kill_group

REPO_ROOT = Path(__file__).resolve().parents[2]


def shipped_gunicorn_argv(bind: str) -> list[str]:
    """The API container's gunicorn command from deploy/api.yaml (the one ``mailroom run``
    mirrors), with only the bind address changed."""
    manifest = yaml.safe_load_all((REPO_ROOT / "deploy" / "api.yaml").read_text())
    for doc in manifest:
        pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            if container.get("name") == "api":
                argv = list(container["command"])
                argv[argv.index("--bind") + 1] = bind
                return argv
    raise LookupError("deploy/api.yaml has no api container")


class ApiServer:
    """``python -m gunicorn`` serving the API with the shipped command, ``env`` as its whole
    environment, its output in ``directory``/gunicorn.log. ``start()`` returns once
    ``/healthz`` answers 200."""

    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "gunicorn.log"
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", *shipped_gunicorn_argv(f"127.0.0.1:{self.port}")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gunicorn did not answer /healthz within 60 s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
