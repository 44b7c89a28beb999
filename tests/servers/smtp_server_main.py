"""The SMTP server process behind ``tests.servers.smtp.SmtpServer`` (aiosmtpd).

Run as ``python -P smtp_server_main.py --port N --dir DIR [--auth-user U --auth-password P]``.
It imports only the standard library and aiosmtpd, so it runs without the project on the
path. Everything it shares with the test lives in DIR:

- ``received/NNNNNN.eml`` + ``NNNNNN.json`` per accepted message (the JSON, the envelope,
  is written last, so a message is complete once its JSON exists);
- ``attempts.jsonl``: one line per transaction outcome (accepted or rejected);
- ``control.json``: how to answer, re-read at every MAIL, RCPT and DATA, so a test can
  change it between (or during) transactions. ``{"version": 3, "reject": {"code": 451,
  "text": "...", "stage": "data", "times": 2}}`` rejects at that stage, for the first
  ``times`` transactions under that version (null: always); ``"reject": null`` accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script without -P, this folder would be first on sys.path and its
    # modules (``redis.py``, ``smtp.py`` …) would shadow real packages.
    del sys.path[0]

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


class Recorder:
    """aiosmtpd handler: applies control.json, records accepted mail and every outcome."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.received = directory / "received"
        self.received.mkdir(parents=True, exist_ok=True)
        self.sequence = len(list(self.received.glob("*.json")))
        # How many transactions each control version has rejected so far.
        self.rejections: dict[int, int] = {}

    def _control(self) -> dict[str, Any]:
        try:
            control: dict[str, Any] = json.loads((self.dir / "control.json").read_text())
            return control
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _rejection(self, stage: str) -> str | None:
        control = self._control()
        reject = control.get("reject")
        if not reject or reject.get("stage", "data") != stage:
            return None
        version = int(control.get("version", 0))
        times = reject.get("times")
        if times is not None and self.rejections.get(version, 0) >= times:
            return None
        self.rejections[version] = self.rejections.get(version, 0) + 1
        return f"{int(reject['code'])} {reject.get('text', 'rejected')}"

    def _attempt(self, envelope: Envelope, session: Session, outcome: str, reply: str) -> None:
        record = {
            "time": time.time(),
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "auth_user": _auth_user(session),
            "outcome": outcome,
            "reply": reply,
        }
        with open(self.dir / "attempts.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        reply = self._rejection("mail")
        if reply:
            self._attempt(envelope, session, "rejected", reply)
            return reply
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._rejection("rcpt")
        if reply:
            self._attempt(_with_recipient(envelope, address), session, "rejected", reply)
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self._rejection("data")
        if reply:
            self._attempt(envelope, session, "rejected", reply)
            return reply
        self.sequence += 1
        stem = self.received / f"{self.sequence:06d}"
        data = envelope.original_content or b""
        stem.with_suffix(".eml").write_bytes(data)
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "auth_user": _auth_user(session),
            "peer": list(session.peer) if session.peer else None,
            "time": time.time(),
        }
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(stem.with_suffix(".json"))
        self._attempt(envelope, session, "accepted", "250 OK")
        return "250 OK"


def _with_recipient(envelope: Envelope, address: str) -> Envelope:
    """A copy of ``envelope`` that also lists ``address`` (the refused recipient)."""
    copy = Envelope()
    copy.mail_from = envelope.mail_from
    copy.rcpt_tos = [*envelope.rcpt_tos, address]
    return copy


def _auth_user(session: Session) -> str | None:
    login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
    return login.decode("utf-8", "replace") if login is not None else None


class Authenticator:
    """Accepts exactly one login/password, or any when none was configured."""

    def __init__(self, user: str | None, password: str | None) -> None:
        self.user = user.encode() if user is not None else None
        self.password = password.encode() if password is not None else None

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        if self.user is None:
            return AuthResult(success=True, auth_data=auth_data)
        ok = auth_data.login == self.user and auth_data.password == self.password
        return AuthResult(success=ok, auth_data=auth_data if ok else None, handled=False)


async def serve(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    handler = Recorder(directory)
    authenticator = Authenticator(args.auth_user, args.auth_password)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            # A fixed name: the default asks DNS for this host's FQDN, which can be slow.
            hostname="smtp.mailroom.test",
            authenticator=authenticator,
            auth_required=args.auth_user is not None,
            # The test network is loopback; there is no TLS to require.
            auth_require_tls=False,
            loop=loop,
        )

    server = await loop.create_server(factory, host=args.host, port=args.port)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    print(f"listening on {args.host}:{args.port} pid {os.getpid()}", flush=True)
    async with server:
        await stopped.wait()


def _drop_known_noise(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "login_data is deprecated" not in message and "auth_require_tls == False" not in message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--auth-user")
    parser.add_argument("--auth-password")
    args = parser.parse_args()
    # aiosmtpd warns that AUTH without TLS is insecure (on loopback in tests it is meant)
    # and, per login, about its own use of a deprecated attribute: noise in the log.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("mail.log").addFilter(_drop_known_noise)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
