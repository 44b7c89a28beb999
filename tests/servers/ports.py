"""Free ports and waiting for a server to listen."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from .processes import ServerStartError, log_tail


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now.

    The kernel picks it (bind to port 0); between closing the probe socket and the server
    binding the port another process could take it, which is rare enough for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 20,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Block until ``host:port`` accepts a TCP connection.

    Raises ``TimeoutError`` after ``timeout`` seconds, and ``ServerStartError`` at once if
    ``process`` (the server being waited for) exits first; both messages name the address
    and quote the end of ``log_path`` when given, so a failed start explains itself.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if port_is_open(host, port):
            return
        if process is not None and process.poll() is not None:
            raise ServerStartError(
                f"{process.args!r} exited with code {process.returncode} before listening "
                f"on {host}:{port}\n{log_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"nothing accepted TCP connections on {host}:{port} within {timeout:g}s\n{log_tail(log_path)}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
