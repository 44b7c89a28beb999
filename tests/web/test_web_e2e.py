"""The web page end to end: headless Chromium (Debian's, driven by playwright-core) against
the real stack — the API served over HTTP with the built page, PostgreSQL, both Redis
servers, a Celery worker per queue, Dovecot and aiosmtpd.

``web/e2e/run.mjs`` does in the browser what a person would (sign in, add an account, sync
and watch the bar reach 100, open a message, reply, delete, mark spam, cancel a long sync
after a reload, task filters, admin, phone width, an unreachable API, sign out); this test
seeds the mailboxes beforehand and checks the outcomes on the servers afterwards.
Screenshots and ``e2e-summary.json`` are left in ``web/test-results/``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from tests.conftest import ROOT, account_body
from tests.servers.dovecot import DovecotServer
from tests.servers.mailgen import message
from tests.servers.ports import free_port
from tests.servers.smtp import SmtpServer
from tests.support import TenantKit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("workers")]

WEB = ROOT / "web"
ARTEFACTS = WEB / "test-results"
CHROMIUM = os.environ.get("MAILROOM_CHROMIUM", "/usr/bin/chromium")
#: Enough mail that a sync runs for several seconds, so the browser can cancel it midway.
BIG_MAILBOX = 20_000


def built_page() -> Path:
    """web/dist, built here if `make test` did not build it already (npm ci first when
    web/node_modules is missing). Skips when Node or Chromium is not installed."""
    if shutil.which("node") is None or shutil.which("npm") is None or not Path(CHROMIUM).exists():
        pytest.skip("needs node, npm and chromium (`make test` installs them)")
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout
    if tuple(int(p) for p in version.strip().lstrip("v").split(".")[:2]) < (20, 19):
        pytest.skip(f"the page's build needs Node.js 20.19 or newer, not {version.strip()}")
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True, timeout=600)
    if not (WEB / "dist" / "index.html").is_file():
        subprocess.run(["npm", "run", "build"], cwd=WEB, check=True, timeout=600)
    return WEB / "dist"


@pytest.fixture
def served(app: Any) -> Iterator[str]:
    """The API (with the page) over real HTTP on a free port, threaded like a server."""
    built_page()
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="web-e2e-http", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


def welcome_message() -> bytes:
    """HTML with a script, an event handler and a remote tracking image, a text part and a
    text attachment: the page must show it sanitised, load nothing, and list the file."""
    msg = EmailMessage()
    msg["From"] = "Ann Example <ann@example.test>"
    msg["To"] = "owner@example.test"
    msg["Subject"] = "Welcome to Mailroom"
    msg["Date"] = format_datetime(datetime.now(UTC) - timedelta(minutes=1))
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg.set_content("Hello from the text part.")
    msg.add_alternative(
        '<html><body><p onclick="alert(1)">Hello from the HTML part</p>'
        "<script>document.title='pwned'</script>"
        '<img src="http://tracker.example/pixel.gif" onerror="alert(2)"></body></html>',
        subtype="html",
    )
    msg.add_attachment(b"quarterly numbers\n", maintype="text", subtype="plain", filename="report.txt")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def seed_inbox(dovecot: DovecotServer, user: tuple[str, str]) -> None:
    base = datetime.now(UTC) - timedelta(hours=1)
    plain = [
        message(
            "Delete me",
            "This one goes to Trash.",
            sender="bob@example.test",
            to="owner@example.test",
            date=base,
        ),
        message(
            "Cheap watches",
            "Buy cheap watches now!!! Limited offer, click here.",
            sender="promo@spam.example",
            to="owner@example.test",
            date=base + timedelta(minutes=1),
        ),
        *(
            message(
                f"Note {i}",
                f"Note number {i}",
                sender="carol@example.test",
                to="owner@example.test",
                date=base - timedelta(minutes=i),
            )
            for i in range(5)
        ),
    ]
    dovecot.append_messages(*user, "INBOX", [*plain, welcome_message()])


def seed_big(dovecot: DovecotServer, user: tuple[str, str]) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    mail = [
        message(
            f"Bulk {i}",
            f"Bulk message {i}",
            sender="list@example.test",
            to="owner@example.test",
            date=base + timedelta(seconds=i),
        )
        for i in range(BIG_MAILBOX)
    ]
    dovecot.append_messages(*user, "INBOX", mail, batch=1000)


def test_the_page_in_a_real_browser(
    served: str, kit: TenantKit, dovecot: DovecotServer, smtp: SmtpServer, mailbox_user: tuple[str, str]
) -> None:
    seed_inbox(dovecot, mailbox_user)
    big_user = ("big" + mailbox_user[0], "pw-big" + mailbox_user[0])
    dovecot.add_user(*big_user)
    seed_big(dovecot, big_user)
    big = kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, big_user))
    assert big.status_code == 201, big.get_json()
    email = f"{mailbox_user[0]}@example.test"
    sent_before = len(smtp.received())

    shutil.rmtree(ARTEFACTS, ignore_errors=True)
    env = {
        **os.environ,
        "MAILROOM_URL": served,
        "MAILROOM_KEY": kit.admin_key,
        "MAIL_EMAIL": email,
        "IMAP_PORT": str(dovecot.port),
        "IMAP_USER": mailbox_user[0],
        "IMAP_PASSWORD": mailbox_user[1],
        "SMTP_PORT": str(smtp.port),
        "SMTP_USER": "smtpuser",
        "SMTP_PASSWORD": "smtppass",
        "BIG_EMAIL": big.get_json()["email"],
        "ARTEFACTS": str(ARTEFACTS),
        "CHROMIUM": CHROMIUM,
    }
    started = time.monotonic()
    run = subprocess.run(
        ["node", "e2e/run.mjs"], cwd=WEB, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    elapsed = time.monotonic() - started
    summary = json.loads(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else {}
    print(f"browser run: {elapsed:.1f} s; steps: {summary.get('steps')}")
    assert run.returncode == 0, f"{run.stderr[-4000:]}\n{json.dumps(summary.get('failed'), indent=1)}"

    # What the browser did happened on the servers.
    seen = summary["sync_progress_seen"]
    assert seen[-1] == 100 and seen == sorted(seen), seen
    # Nothing moves while tasks are polled (Chromium's cumulative layout shift, ~0 here).
    assert summary["layout_shift_while_polling"] < 0.01 and summary["layout_shift_while_cancelling"] < 0.01
    assert 0 < summary["long_sync_progress_at_cancel"] <= summary["long_sync_progress_final"] < 100
    accounts = {a["email"]: a for a in kit.admin.get("/api/accounts").get_json()["items"]}
    account = accounts[email]
    assert account["name"] == "Browser test" and account["last_sync_at"] is not None

    replies = [m for m in smtp.received()[sent_before:] if b"Subject: Re: Welcome to Mailroom" in m["data"]]
    assert len(replies) == 1, "a double click on Send must send exactly once"
    assert replies[0]["rcpt_tos"] == ["ann@example.test"]
    assert b"In-Reply-To: <" in replies[0]["data"] and b"from the browser test" in replies[0]["data"]

    def listed(folder: str, subject: str) -> list[dict[str, Any]]:
        query = {"folder": folder, "subject": subject}
        return kit.admin.get(f"/api/accounts/{account['id']}/messages", query_string=query).get_json()[
            "items"
        ]

    assert listed("INBOX", "Delete me") == []
    assert [m["folder"] for m in listed("Trash", "Delete me")] == ["Trash"]
    trash_on_server = dovecot.uids(*mailbox_user, "Trash")
    assert len(trash_on_server) == 1

    (spam,) = listed("INBOX", "Cheap watches") or listed("Junk", "Cheap watches")
    assert spam["spam_label"] == "spam"
    settings = kit.admin.get("/api/spam/settings").get_json()
    assert settings["threshold"] == 0.8 and settings["block"] == ["spam.example"]

    cancelled = kit.admin.get(
        "/api/tasks", query_string={"type": "sync", "state": "cancelled", "account_id": big.get_json()["id"]}
    ).get_json()["items"]
    assert len(cancelled) == 1 and cancelled[0]["progress"] < 100

    for name in summary["screenshots"]:
        assert (ARTEFACTS / name).stat().st_size > 1000, name
    assert len(summary["screenshots"]) >= 8
