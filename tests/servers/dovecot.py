"""A private Dovecot IMAP server for tests, with helpers to seed and inspect mailboxes."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from imapclient import IMAPClient, imap_utf7

from .ports import free_port, wait_for_port
from .processes import (
    ServerProcess,
    ServerStartError,
    fast_temp_dir,
    group_members,
    kill_group,
    running_as_root,
)

HOST = "127.0.0.1"
# Dovecot refuses to run mail processes as root; as root, mail is owned by nobody:nogroup.
ROOT_MAIL_UID = 65534
ROOT_MAIL_GID = 65534
SPECIAL_USE_FOLDERS = {
    "Drafts": "\\Drafts",
    "Sent": "\\Sent",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}
# Hierarchy separator clients see. On disk the Maildir++ layout still uses ".":
# folder "Projects/2024" is the directory "Maildir/.Projects.2024".
SEPARATOR = "/"
# What Dovecot announces, less QRESYNC (and its IMAP4rev2-era companions): CONDSTORE only.
WITHOUT_QRESYNC = (
    "IMAP4rev1 SASL-IR LITERAL+ ENABLE IDLE UIDPLUS MOVE SPECIAL-USE MULTIAPPEND UNSELECT CONDSTORE"
)


def _dovecot_executable(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()),
        None,
    )
    if found is None:
        raise ServerStartError(f"{name} not found: install the Debian package dovecot-imapd")
    return found


# Dovecot processes stop() does not wait for: see DovecotServer.stop.
_NOT_WAITED_FOR = ("/log", "/stats", "/imap")


def _process_title(pid: int) -> str:
    """The command line of ``pid`` as shown by ps ("" if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _parse_uid_set(text: str) -> list[int]:
    """``"1:3,7"`` → ``[1, 2, 3, 7]`` (the uid-set of an APPENDUID response)."""
    uids: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition(":")
        low, high = sorted((int(first), int(last or first)))
        uids.extend(range(low, high + 1))
    return uids


_RAWLOG_TIMESTAMP = re.compile(rb"^\d+\.\d+ ")
_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}$")


def parse_rawlog_commands(data: bytes) -> list[str]:
    """The commands in a Dovecot ``*.in`` rawlog, tags removed, literal data left out.

    Dovecot prefixes every line of the rawlog with a ``seconds.micros`` timestamp; those
    are stripped first. A command continues over literals (``{N}``/``{N+}`` at a line's
    end is followed by N bytes of data), so MULTIAPPEND of 500 messages is one command.
    The ``DONE`` that ends IDLE is not a command and is left out.
    """
    raw = b"".join(_RAWLOG_TIMESTAMP.sub(b"", line) for line in data.splitlines(keepends=True))
    commands: list[str] = []
    pos = 0
    while pos < len(raw):
        pieces: list[bytes] = []
        while True:
            end = raw.find(b"\r\n", pos)
            if end < 0:  # an unfinished last line: the client was cut off mid-command
                pieces.append(raw[pos:])
                pos = len(raw)
                break
            line = raw[pos:end]
            pos = end + 2
            pieces.append(line)
            literal = _LITERAL_AT_END.search(line)
            if literal is None:
                break
            pos += int(literal.group(1))  # skip the literal's data; the command goes on
        text = b"".join(pieces).decode("utf-8", errors="replace")
        if not text or text.upper() == "DONE":
            continue
        _tag, _, command = text.partition(" ")
        commands.append(command)
    return commands


def command_verb(command: str) -> str:
    """``'UID FETCH 1:* (FLAGS)'`` → ``'UID FETCH'``, ``'SELECT "INBOX"'`` → ``'SELECT'``."""
    words = command.split(" ", 2)
    if words[0].upper() == "UID" and len(words) > 1:
        return f"UID {words[1].upper()}"
    return words[0].upper()


class DovecotServer(ServerProcess):
    """A Dovecot IMAP server of its own on a free 127.0.0.1 port, in a temporary directory.

    Plain-text LOGIN and AUTHENTICATE PLAIN/LOGIN without TLS; users from a passwd-file
    (``add_user`` works before and after ``start()``: Dovecot re-reads the file when it
    changes); Maildir storage; Drafts, Sent, Trash, Junk and Archive are created and
    subscribed with their SPECIAL-USE flags at a user's first login; up to
    ``max_userip_connections`` (100) concurrent sessions per user and IP.

    Promises: after ``start()`` the port accepts IMAP connections. ``kill()`` SIGKILLs the
    master and all its children at once (clients see their connections reset, like a
    network fault). ``stop()`` shuts Dovecot down, leaves no Dovecot process behind and
    is safe to call twice. Users and mail survive both: ``restart()`` (or ``start()``
    after ``stop()``) brings the server back on the same port with the same users and
    mail. ``cleanup()`` stops and deletes the directory, which otherwise happens when the
    object is garbage-collected or the interpreter exits.

    ``rawlog=True`` records what every client sends after login, so a test can count IMAP
    commands (``imap_commands``, ``imap_command_counts``).

    ``imap_capability`` replaces the capability list Dovecot announces after login, to
    play a server without QRESYNC (or without CONDSTORE): :data:`WITHOUT_QRESYNC`.
    Dovecot then refuses ``ENABLE QRESYNC`` and never sends VANISHED.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        rawlog: bool = False,
        max_userip_connections: int = 100,
        base_dir: str | Path | None = None,
        imap_capability: str | None = None,
    ) -> None:
        self.host = HOST
        self.imap_capability = imap_capability
        self.port = port or free_port()
        self.rawlog = rawlog
        self.max_userip_connections = max_userip_connections
        prefix = "mailroom-dovecot-"
        directory = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir)) if base_dir else fast_temp_dir(prefix)
        super().__init__(directory)
        # Other users (Dovecot's login and mail processes, when we are root) must be able
        # to reach the homes and sockets inside; mkdtemp makes it 0700.
        self.dir.chmod(0o755)
        self.instance = f"mailroom-{uuid.uuid4().hex[:8]}"
        self._users: dict[str, str] = {}
        if running_as_root():
            self.mail_uid, self.mail_gid = ROOT_MAIL_UID, ROOT_MAIL_GID
        else:
            self.mail_uid, self.mail_gid = os.getuid(), os.getgid()
        self._write_users()

    # -- paths -----------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.dir / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "dovecot.log"

    @property
    def users_path(self) -> Path:
        return self.dir / "users"

    def home(self, user: str) -> Path:
        return self.dir / "home" / user

    def maildir_path(self, user: str, folder: str) -> Path:
        """The Maildir directory that holds ``folder`` of ``user`` on disk."""
        maildir = self.home(user) / "Maildir"
        if folder.upper() == "INBOX":
            return maildir
        encoded: str = imap_utf7.encode(folder).decode("ascii")
        return maildir / ("." + encoded.replace(SEPARATOR, "."))

    def rawlog_dir(self, user: str) -> Path:
        return self.dir / "rawlog" / user

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Write the configuration and start Dovecot; returns self once the port accepts
        connections."""
        self._check_startable()
        self.config_path.write_text(self._config())
        # A master.pid left by kill() would make Dovecot refuse to start if its PID has
        # been reused by an unrelated process meanwhile.
        (self.dir / "run" / "master.pid").unlink(missing_ok=True)
        # -F: stay in the foreground as our child. Without it Dovecot daemonizes and its
        # daemon keeps our output pipes open, which hangs whoever reads them.
        proc = self._spawn(
            [_dovecot_executable("dovecot"), "-F", "-c", str(self.config_path)],
            log_path=self.dir / "dovecot.stdout",
        )
        try:
            wait_for_port(self.host, self.port, process=proc, log_path=self.log_path)
        except BaseException:
            kill_group(proc)
            raise
        return self

    def kill(self) -> None:
        """SIGKILL the master and every child in one go (children killed before the
        master would be respawned by it). Users and mail stay for ``restart()``."""
        super().kill()

    def restart(self) -> Self:
        """Stop Dovecot if it runs (gracefully), then start it on the same port."""
        self.stop()
        return self.start()

    def stop(self) -> None:
        """Shut Dovecot down, cutting open IMAP sessions (their connections close), and
        leave no process behind. Users and mail stay.

        SIGTERM to the master, which ends its login, auth and config processes; once
        those are gone (10 s at most), SIGKILL the rest of the group. Waiting for the
        master to exit by itself costs 1-6 s per stop here: it sleeps in whole seconds
        for its log process, and leaves the imap processes of open sessions (and stats)
        running even after it exited. Mail is on disk before that matters.
        """
        proc = self._owned.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                children = [pid for pid in group_members(proc.pid) if pid != proc.pid]
                if all(_process_title(pid).endswith(_NOT_WAITED_FOR) for pid in children):
                    break
                time.sleep(0.01)
        kill_group(proc)

    def cleanup(self) -> None:
        """Stop Dovecot and delete the directory with all users and mail (also folders
        made unreadable by ``make_folder_unselectable``)."""
        super().cleanup()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- users -----------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add (or re-password) a user; takes effect immediately, also while running."""
        for value in (name, password):
            if any(ch in value for ch in ":\n\r") or not value:
                raise ValueError(
                    f"user names and passwords must be non-empty, without ':' or line breaks: {value!r}"
                )
        # The mail processes (nobody, when we are root) must own the home to create the
        # Maildir in it, and the rawlog directory to write to it.
        directories = [self.home(name)] + ([self.rawlog_dir(name)] if self.rawlog else [])
        for path in directories:
            path.mkdir(parents=True, exist_ok=True)
            if running_as_root():
                os.chown(path, self.mail_uid, self.mail_gid)
        self._users[name] = password
        self._write_users()
        if self.is_running():
            self._wait_for_login(name, password)

    def _wait_for_login(self, name: str, password: str, timeout: float = 5) -> None:
        # Dovecot's auth process stats the passwd-file at most once per second, so a lookup
        # in the same second as an earlier one still sees the old file: wait until the new
        # user can log in rather than let a test's first login fail by chance.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client(name, password, timeout=5).logout()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _write_users(self) -> None:
        lines = [
            f"{name}:{{PLAIN}}{password}:{self.mail_uid}:{self.mail_gid}::{self.home(name)}\n"
            for name, password in self._users.items()
        ]
        # Replace atomically: the auth process may read the file at any moment, and it
        # notices the new file (new inode and mtime) on the next lookup.
        tmp = self.users_path.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.users_path)

    # -- IMAP helpers (each opens its own session) -----------------------------------

    def client(self, user: str, password: str, *, timeout: float = 30) -> IMAPClient:
        """A logged-in ``IMAPClient``; use it as a context manager to log out."""
        client = IMAPClient(self.host, port=self.port, ssl=False, timeout=timeout)
        client.login(user, password)
        return client

    @contextmanager
    def _session(self, user: str, password: str) -> Iterator[IMAPClient]:
        client = self.client(user, password)
        try:
            yield client
        finally:
            try:
                client.logout()
            except Exception:  # the server may already have hung up (e.g. after kill())
                client.shutdown()

    def append_messages(
        self,
        user: str,
        password: str,
        folder: str,
        messages: Sequence[bytes],
        flags: Iterable[str | bytes] = (),
        batch: int = 500,
    ) -> list[int]:
        """Append ``messages`` to ``folder`` (which must exist); returns their UIDs (from
        the APPENDUID answers, which Dovecot always gives).

        Uses MULTIAPPEND, ``batch`` messages per command: one APPEND per message manages
        about 150 messages/s, MULTIAPPEND of 500 about 10,000/s.
        """
        flag_list = list(flags)
        uids: list[int] = []
        with self._session(user, password) as client:
            multi = client.has_capability("MULTIAPPEND")
            for start in range(0, len(messages), batch):
                chunk = messages[start : start + batch]
                if multi:
                    response = client.multiappend(folder, [{"msg": m, "flags": flag_list} for m in chunk])
                    responses = [response]
                else:
                    responses = [client.append(folder, m, flags=flag_list) for m in chunk]
                for resp in responses:
                    text = resp.decode() if isinstance(resp, bytes) else str(resp)
                    found = re.search(r"\[APPENDUID \d+ ([\d:,]+)\]", text)
                    if found:
                        uids.extend(_parse_uid_set(found.group(1)))
        return uids

    def create_folder(self, user: str, password: str, folder: str) -> None:
        with self._session(user, password) as client:
            client.create_folder(folder)
            client.subscribe_folder(folder)

    def delete_folder(self, user: str, password: str, folder: str) -> None:
        with self._session(user, password) as client:
            client.delete_folder(folder)

    def rename_folder(self, user: str, password: str, old: str, new: str, *, doveadm: bool = False) -> None:
        """Rename ``old`` to ``new`` with IMAP RENAME, or with ``doveadm mailbox rename``
        (what an administrator would do). Either way the messages keep their UIDs and the
        folder its UIDVALIDITY under the new name."""
        if doveadm:
            self._doveadm("mailbox", "rename", "-u", user, old, new)
            return
        with self._session(user, password) as client:
            client.rename_folder(old, new)

    def uids(self, user: str, password: str, folder: str) -> list[int]:
        """All UIDs in ``folder``, ascending."""
        with self._session(user, password) as client:
            client.select_folder(folder, readonly=True)
            return sorted(client.search(["ALL"]))

    def uidvalidity(self, user: str, password: str, folder: str) -> int:
        with self._session(user, password) as client:
            return int(client.folder_status(folder, ["UIDVALIDITY"])[b"UIDVALIDITY"])

    def set_flags(
        self,
        user: str,
        password: str,
        folder: str,
        uids: Sequence[int],
        flags: Iterable[str | bytes],
    ) -> None:
        """Replace the flags of messages ``uids`` with ``flags`` (STORE FLAGS)."""
        with self._session(user, password) as client:
            client.select_folder(folder)
            client.set_flags(list(uids), list(flags))

    def expunge(self, user: str, password: str, folder: str, uids: Sequence[int]) -> None:
        """Expunge exactly the messages ``uids`` (\\Deleted, then UID EXPUNGE)."""
        with self._session(user, password) as client:
            client.select_folder(folder)
            client.add_flags(list(uids), [b"\\Deleted"])
            client.uid_expunge(list(uids))

    def set_uidvalidity(self, user: str, folder: str, value: int) -> None:
        """Give ``folder`` a new UIDVALIDITY with ``doveadm mailbox update``.

        Dovecot 2.3.19 accepts this also for a non-empty folder, INBOX included, and keeps
        the messages' UIDs; only the UIDVALIDITY changes. A session that has the folder
        selected is disconnected at its next command (``* BYE IMAP session state is
        inconsistent, please relogin.``). To also give the messages new UIDs, expunge
        them, set the value, and append them again.
        """
        self._doveadm("mailbox", "update", "-u", user, "--uid-validity", str(value), folder)

    def _doveadm(self, *args: str) -> str:
        result = subprocess.run(
            [_dovecot_executable("doveadm"), "-c", str(self.config_path), *args],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"doveadm {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode(errors="replace")

    # -- faults ----------------------------------------------------------------------

    def make_folder_unselectable(self, user: str, folder: str) -> None:
        """Make ``folder`` fail while the user's other folders keep working.

        Sets its Maildir directory to mode 000 (for INBOX: its cur/new/tmp directories).
        Dovecot then answers, for this folder only:

        - ``SELECT``/``EXAMINE``/``STATUS`` in a new session:
          ``tag NO [SERVERBUG] Internal error occurred. Refer to server log …``;
        - ``FETCH`` of message data in a session that had selected it before:
          ``* BYE FETCH failed: Internal error occurred. …`` and the connection is closed
          (flags and sizes Dovecot has in its index may still be answered).

        LIST still shows the folder. ``make_folder_selectable`` undoes it.
        """
        for path in self._fault_paths(user, folder):
            path.chmod(0)

    def make_folder_selectable(self, user: str, folder: str) -> None:
        for path in self._fault_paths(user, folder):
            path.chmod(0o700)

    def _fault_paths(self, user: str, folder: str) -> list[Path]:
        path = self.maildir_path(user, folder)
        if not path.is_dir():
            raise FileNotFoundError(f"no Maildir for folder {folder!r} of {user!r}: {path}")
        if folder.upper() == "INBOX":
            # The INBOX directory also holds every other folder; lock only its own mail.
            return [path / "cur", path / "new", path / "tmp"]
        return [path]

    # -- command log -----------------------------------------------------------------

    def rawlog_mark(self, user: str) -> dict[str, int]:
        """Current sizes of the user's rawlog files; pass as ``since=`` to count only
        commands sent after this point."""
        self._require_rawlog()
        return {p.name: p.stat().st_size for p in self.rawlog_dir(user).glob("*.in")}

    def imap_commands(self, user: str, *, since: dict[str, int] | None = None) -> list[str]:
        """Every command ``user``'s clients sent after logging in, oldest session first,
        without tags and literal data (``'UID FETCH 1:500 (UID BODY.PEEK[])'``).

        Needs ``rawlog=True``. Not included: what was sent before login (CAPABILITY,
        LOGIN, AUTHENTICATE, STARTTLS), which a login process handles.
        """
        self._require_rawlog()
        commands: list[str] = []
        for path in sorted(self.rawlog_dir(user).glob("*.in")):
            data = path.read_bytes()[(since or {}).get(path.name, 0) :]
            commands.extend(parse_rawlog_commands(data))
        return commands

    def imap_command_counts(self, user: str, *, since: dict[str, int] | None = None) -> Counter[str]:
        """How often each command verb was sent (``'SELECT'``, ``'UID FETCH'``, …)."""
        return Counter(command_verb(c) for c in self.imap_commands(user, since=since))

    def _require_rawlog(self) -> None:
        if not self.rawlog:
            raise RuntimeError("create the DovecotServer with rawlog=True to log commands")

    # -- configuration ---------------------------------------------------------------

    def _config(self) -> str:
        d = self.dir
        if running_as_root():
            # Debian's dovecot-core creates the users dovecot and dovenull, Dovecot's
            # defaults for its internal and login processes.
            users = ""
        else:
            # Not root: Dovecot cannot switch users, so every process runs as us.
            me = pwd.getpwuid(os.getuid()).pw_name
            my_group = grp.getgrgid(os.getgid()).gr_name
            users = (
                f"default_login_user = {me}\n"
                f"default_internal_user = {me}\n"
                f"default_internal_group = {my_group}\n"
            )
        mailboxes = "".join(
            f"  mailbox {name} {{\n    special_use = {flag}\n    auto = subscribe\n  }}\n"
            for name, flag in SPECIAL_USE_FOLDERS.items()
        )
        rawlog = f"rawlog_dir = {d}/rawlog/%u\n" if self.rawlog else ""
        if self.imap_capability:
            rawlog += f"imap_capability = {self.imap_capability}\n"
        # chroot is switched off for every service that has one: a non-root master cannot
        # chroot, and tests gain nothing from it as root either.
        return f"""\
# Generated by tests/servers/dovecot.py for one test server; deleted by cleanup().
instance_name = {self.instance}
base_dir = {d}/run
state_dir = {d}/state
log_path = {self.log_path}
{users}protocols = imap
listen = {self.host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# A failed login is answered after ~0.5 s (Dovecot's flush interval) instead of 2 s.
auth_failure_delay = 0
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = {self.max_userip_connections}
{rawlog}
passdb {{
  driver = passwd-file
  args = {self.users_path}
}}
userdb {{
  driver = passwd-file
  args = {self.users_path}
}}

namespace inbox {{
  inbox = yes
  separator = {SEPARATOR}
{mailboxes}}}

service imap-login {{
  chroot =
  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
}}
service anvil {{
  chroot =
  # No growing per-IP delay after failed logins (Dovecot's brute-force penalty reaches
  # 4-15 s and then slows every login from 127.0.0.1, good ones too).
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service ipc {{
  chroot =
}}
service old-stats {{
  chroot =
}}
"""
