"""A private SMTP server for tests: aiosmtpd in a subprocess, recording what it receives."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, Self

from .ports import free_port, wait_for_port
from .processes import ServerProcess, kill_group

HOST = "127.0.0.1"
SERVER_SCRIPT = Path(__file__).resolve().parent / "smtp_server_main.py"
Stage = Literal["mail", "rcpt", "data"]


class SmtpServer(ServerProcess):
    """An aiosmtpd SMTP server in its own process on a free 127.0.0.1 port.

    ``require_auth=(user, password)``: MAIL before a successful AUTH (PLAIN or LOGIN, over
    plain text, as on loopback there is no TLS) is answered ``530 5.7.0 Authentication
    required``, wrong credentials ``535 5.7.8 Authentication credentials invalid``.
    ``require_auth=None``: AUTH is optional and any credentials are accepted.

    ``reject_with=(code, text)``, or ``set_reject()`` at any time, makes the server
    answer that reply at the chosen stage (MAIL, RCPT or end of DATA) instead of
    accepting; the server re-reads this setting for every command, so it applies from the
    next command on, to connections already open as well.

    Promises: ``received()`` lists every accepted message (envelope and exact bytes) in
    arrival order; ``attempts()`` every transaction outcome, rejected ones included.
    ``stop()`` ends the process and is safe to call twice; what was received stays
    readable, and ``start()`` serves again on the same port. ``cleanup()`` also deletes
    the directory, which otherwise happens when the object is garbage-collected or the
    interpreter exits.
    """

    def __init__(
        self,
        require_auth: tuple[str, str] | None = None,
        reject_with: tuple[int, str] | None = None,
        *,
        port: int | None = None,
    ) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="mailroom-smtp-")))
        self.host = HOST
        self.port = port or free_port()
        self.require_auth = require_auth
        self._control_version = 0
        if reject_with is not None:
            self.set_reject(*reject_with)
        else:
            self.clear_reject()

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    def start(self) -> Self:
        """Start the server process; returns self once it accepts connections."""
        self._check_startable()
        # -P (Python 3.11+): do not put this folder on sys.path, where redis.py and
        # smtp.py would shadow the real packages of those names. (The script also guards
        # against that itself, for older Pythons and for running it by hand.)
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        argv = [
            sys.executable,
            *safe_path,
            str(SERVER_SCRIPT),
            "--host", self.host,
            "--port", str(self.port),
            "--dir", str(self.dir),
        ]  # fmt: skip
        if self.require_auth is not None:
            argv += ["--auth-user", self.require_auth[0], "--auth-password", self.require_auth[1]]
        proc = self._spawn(argv, log_path=self.log_path)
        try:
            wait_for_port(self.host, self.port, process=proc, log_path=self.log_path)
        except BaseException:
            kill_group(proc)
            raise
        return self

    # -- behaviour -------------------------------------------------------------------

    def set_reject(self, code: int, text: str, *, stage: Stage = "data", times: int | None = None) -> None:
        """Answer ``code text`` at ``stage`` instead of accepting.

        ``stage="data"`` (default) rejects after the message was sent (aiosmtplib raises
        ``SMTPDataError``); ``"rcpt"`` refuses each recipient (``SMTPRecipientsRefused``
        once all are refused); ``"mail"`` refuses the sender (``SMTPSenderRefused``).
        ``times=N`` rejects only the next N transactions, then accepts again: e.g. a 451
        that a retry gets past.
        """
        if stage not in ("mail", "rcpt", "data"):
            raise ValueError(f"stage must be 'mail', 'rcpt' or 'data', not {stage!r}")
        self._write_control({"code": int(code), "text": text, "stage": stage, "times": times})

    def clear_reject(self) -> None:
        """Accept everything again."""
        self._write_control(None)

    def _write_control(self, reject: dict[str, Any] | None) -> None:
        # A new version restarts the server's count of rejections for ``times``.
        self._control_version += 1
        tmp = self.dir / "control.json.tmp"
        tmp.write_text(json.dumps({"version": self._control_version, "reject": reject}))
        tmp.replace(self.dir / "control.json")  # atomic: the server never reads half a file

    # -- what arrived ----------------------------------------------------------------

    def received(self) -> list[dict[str, Any]]:
        """Accepted messages in arrival order: ``{"mail_from", "rcpt_tos", "data"
        (bytes, as sent after DATA), "auth_user", "peer", "time"}``."""
        messages = []
        for meta_path in sorted((self.dir / "received").glob("*.json")):
            meta = json.loads(meta_path.read_text())
            meta["data"] = meta_path.with_suffix(".eml").read_bytes()
            messages.append(meta)
        return messages

    def attempts(self) -> list[dict[str, Any]]:
        """Every finished or refused transaction: ``{"mail_from", "rcpt_tos",
        "auth_user", "outcome": "accepted"|"rejected", "reply", "time"}``."""
        try:
            lines = (self.dir / "attempts.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line]

    def clear(self) -> None:
        """Forget what was received and attempted so far."""
        for path in (self.dir / "received").glob("*"):
            path.unlink(missing_ok=True)
        (self.dir / "attempts.jsonl").unlink(missing_ok=True)
