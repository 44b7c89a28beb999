"""Mail that attacks the parser, through the real pipeline: APPENDed to (or dropped into the
Maildir of) the shared Dovecot, synced by the real sync worker, spam-checked by the real spam
worker. The sync ends succeeded and lists every message with what could be read, the spam
check scores each one, and both workers stay alive within a memory bound.

The scorer's own limits are unit-tested in tests/test_spam_hostile.py; this is the same kind
of mail end to end, where the IMAP server's view of it (BODYSTRUCTURE, RFC822.SIZE, NUL
bytes Dovecot serves as 0x80) is what the sync has to cope with. Dovecot takes a Maildir
file's ``W=`` (virtual size) from its name, so a 2 GB declared RFC822.SIZE is a real
server's answer here, not a mock (Dovecot drops the connection when that message's body is
fetched, so the spam check can only count it gone).
"""

from __future__ import annotations

import base64
import os
import threading
import time
from typing import Any

import psutil
import pytest

from tests.servers.dovecot import DovecotServer
from tests.servers.workers import CeleryWorker
from tests.support import TenantKit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("workers")]

TWO_GB = 2 * 1024**3 + 12_345
#: Growth of a worker's process tree (RSS) while it syncs and checks this mail. The sync
#: reads 2 KB of part 1 and the check at most spam_max_message_bytes (1 MiB) of each
#: message; a worker that read the 50 MB message whole would pass this several times over.
MEMORY_GROWTH_BOUND = 150 * 1024**2


def _head(subject: str, extra: str = "") -> str:
    return (
        f"From: Hostile <hostile@example.test>\r\nTo: reader@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@hostile.test>\r\n"
        f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n{extra}"
    )


def hostile_mail() -> dict[str, bytes]:
    nested = "innermost text\r\n"
    for level in range(500):
        part = f'Content-Type: multipart/mixed; boundary="n{level}"\r\n\r\n'
        nested = f"{part}--n{level}\r\n{nested}\r\n--n{level}--\r\n"
    garbage = base64.b64encode(b"x\x9c" + b"\xff" * 300).decode()
    big = base64.encodebytes(os.urandom(38 * 1024 * 1024)).replace(b"\n", b"\r\n")
    return {
        "nested 500": (_head("nested 500") + nested).encode(),
        "10000 headers": (
            _head("10000 headers")
            + "".join(f"X-Filler-{i}: value {i}\r\n" for i in range(10_000))
            + "\r\nbody after ten thousand headers\r\n"
        ).encode(),
        "folded 10000": (
            _head("folded 10000", "X-Long: start\r\n" + " more\r\n" * 10_000) + "\r\nbody\r\n"
        ).encode(),
        "bad charsets": (
            _head(
                "bad charsets",
                f"X-Note: =?x-unknown-42?B?{garbage[:40]}?= =?zlib_codec?B?{garbage[:40]}?=\r\n"
                'Content-Type: multipart/mixed; boundary="c"\r\n',
            )
            + "\r\n".join(
                f'--c\r\nContent-Type: text/plain; charset="{cs}"\r\n'
                f"Content-Transfer-Encoding: base64\r\n\r\n{garbage}"
                for cs in ("x-unknown-42", "zlib_codec", "base64_codec", "rot13", "utf-7", '"', "utf-8\x00")
            )
            + "\r\n--c--\r\n"
        ).encode(),
        "encoded words": (
            "From: =?utf-7?B?K2dBLQ==?= <a@example.test>\r\nTo: =?x-bad?Q?=FF=FE?= <b@example.test>\r\n"
            f"Subject: =?zlib_codec?B?{garbage[:60]}?= =?utf-8?B?////?=\r\n"
            "Message-ID: <encoded-words@hostile.test>\r\n\r\nbody\r\n"
        ).encode(),
        "raw 8bit headers": (
            b"From: \xff\xfe <c@example.test>\r\nSubject: caf\xe9 \xed\xa0\x80 \xc0\xaf\r\n"
            b"Message-ID: <raw-8bit@hostile.test>\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"\r\n\xff\xfe\xfd body\r\n"
        ),
        "nul bytes": (
            b"From: N\x00ul <n@example.test>\r\nSubject: nul\x00 in \x00 subject\r\n"
            b"Message-ID: <nul\x00@hostile.test>\r\nX-Nul\x00Name: v\r\n\r\nbody\x00with\x00nuls\r\n"
        ),
        "no closing boundary": (
            _head("no closing boundary", 'Content-Type: multipart/mixed; boundary="b"\r\n')
            + "\r\n--b\r\nContent-Type: text/plain\r\n\r\nunfinished"
        ).encode(),
        "10000 recipients": (
            _head("10000 recipients").replace(
                "To: reader@example.test", "To: " + ", ".join(f"r{i}@example.test" for i in range(10_000))
            )
            + "\r\nbody\r\n"
        ).encode(),
        "50 MB attachment": (
            _head("50 MB attachment", 'Content-Type: multipart/mixed; boundary="big"\r\n')
            + "\r\n--big\r\nContent-Type: text/plain\r\n\r\nsee the attachment\r\n--big\r\n"
            'Content-Type: application/octet-stream; name="big.bin"\r\n'
            'Content-Disposition: attachment; filename="big.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        ).encode()
        + big
        + b"\r\n--big--\r\n",
        "only garbage": bytes(range(256)) * 64,
    }


def _drop(dovecot: DovecotServer, user: str, name: str, raw: bytes, declared: int | None = None) -> None:
    """Deliver ``raw`` the way an MDA does: a file in the Maildir. ``declared`` is the
    virtual size (W=) put in its name, which Dovecot answers as RFC822.SIZE."""
    cur = dovecot.maildir_path(user, "INBOX") / "cur"
    sizes = f",S={len(raw)}" + (f",W={declared}" if declared is not None else "")
    path = cur / f"{int(time.time())}.M{abs(hash(name)) % 10**6}P{os.getpid()}.hostile{sizes}:2,"
    path.write_bytes(raw)
    os.chown(path, dovecot.mail_uid, dovecot.mail_gid)


class TreeMemory:
    """Peak RSS of a worker's process tree, sampled in the background."""

    def __init__(self, worker: CeleryWorker) -> None:
        assert worker.pid is not None
        self.process = psutil.Process(worker.pid)
        self.baseline = self.rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def _log_near(worker: CeleryWorker, task: dict[str, Any]) -> str:
    """The worker's log lines about a failed task's error reference (what to fix)."""
    ref = (task.get("error") or {}).get("reference") or task["id"]
    text = worker.log_text()
    at = text.find(ref)
    return text[max(0, at - 200) : at + 20000] if at >= 0 else text[-3000:]


def _all_messages(kit: TenantKit, account_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        page = kit.admin.get(f"/api/accounts/{account_id}/messages", query_string=query).get_json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def test_hostile_mail_is_synced_listed_and_spam_checked(
    kit: TenantKit,
    account: dict[str, Any],
    dovecot: DovecotServer,
    mailbox_user: tuple[str, str],
    workers: dict[str, CeleryWorker],
) -> None:
    mail = hostile_mail()
    user, password = mailbox_user
    appended = {name: raw for name, raw in mail.items() if name != "nul bytes"}
    dovecot.append_messages(user, password, "INBOX", list(appended.values()), batch=4)
    _drop(dovecot, user, "nul bytes", mail["nul bytes"])
    declared_body = b"Subject: declared 2 GB\r\nMessage-ID: <declared@hostile.test>\r\n\r\nsmall\r\n"
    _drop(dovecot, user, "declared 2 GB", declared_body, declared=TWO_GB)
    expected = len(mail) + 1

    pids = {q: workers[q].pid for q in ("sync", "spam")}
    memory = {q: TreeMemory(workers[q]) for q in ("sync", "spam")}
    try:
        response = kit.admin.post(f"/api/accounts/{account['id']}/sync")
        assert response.status_code == 202, response.get_json()
        task = kit.admin.wait_task(response.get_json()["task_id"], timeout=180)
        assert task["state"] == "succeeded", (task["error"], _log_near(workers["sync"], task))

        messages = _all_messages(kit, account["id"])
        assert len(messages) == expected, [m["subject"] for m in messages]
        by_id = {m["message_id"]: m for m in messages if m.get("message_id")}
        declared = next(m for m in messages if m["subject"] == "declared 2 GB")
        assert declared["size"] == TWO_GB
        assert by_id["<10000-headers@hostile.test>"]["subject"] == "10000 headers"
        big = by_id["<50-MB-attachment@hostile.test>"]
        assert big["size"] > 50 * 1024**2 and "big.bin" in big["attachments"]
        assert len(by_id["<10000-recipients@hostile.test>"]["to"]) > 0
        nul = next(m for m in messages if m["subject"].startswith("nul"))
        assert "\x00" not in nul["subject"] + nul["from"]
        for m in messages:  # every row readable through the API, each with a date to page by
            assert kit.admin.get(f"/api/messages/{m['id']}").status_code == 200
            assert m["date"]

        ids = [m["id"] for m in messages]
        response = kit.admin.post(f"/api/accounts/{account['id']}/spam-check", json={"message_ids": ids})
        assert response.status_code == 202, response.get_json()
        check = kit.admin.wait_task(response.get_json()["task_id"], timeout=180)
        assert check["state"] == "succeeded", check
        scored = {m["subject"]: m for m in _all_messages(kit, account["id"])}
        # Dovecot drops the connection when the body of a message whose file contradicts
        # its declared size is fetched: the check counts it gone and scores the rest.
        unread = scored.pop("declared 2 GB")
        assert unread["spam_score"] is None and check["result"]["gone"] == 1, check["result"]
        assert check["result"]["scored"] == expected - 1, check["result"]
        assert all(m["spam_score"] is not None for m in scored.values()), [
            (m["subject"], m["size"]) for m in scored.values() if m["spam_score"] is None
        ]
    finally:
        growth = {q: memory[q].stop() for q in memory}
    result = {k: v for k, v in check["result"].items() if k != "messages"}
    print(f"\nhostile mail: {expected} messages; worker tree RSS growth {growth}; check {result}")
    for queue, pid in pids.items():
        assert workers[queue].pid == pid and psutil.pid_exists(pid), queue
        assert growth[queue] < MEMORY_GROWTH_BOUND, (queue, growth[queue])
