"""The ``mailroom`` command: migrate, bootstrap tenants, users and keys, run the service.

Each subcommand prints ``key: value`` lines for people, or one JSON object with ``--json``
for scripts; errors go to stderr as ``mailroom: <message>`` with exit status 1 (2 for bad
settings or usage). docs/cli.md lists every subcommand and its output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
from sqlalchemy.orm import Session

from services import tenancy
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.errors import MailroomError
from services.migrate import upgrade
from services.models import ApiKey, Tenant
from services.settings import Settings, SettingsError, load_settings

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"mailroom: {message}", err=True)
    sys.exit(code)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        fail(str(exc), 2)


@contextmanager
def session_scope() -> Iterator[Session]:
    settings = settings_or_exit()
    try:
        # Operators' commands work across tenants.
        with transaction(unrestricted_unsafe_sessions(make_sessionmaker(make_engine(settings)))) as session:
            yield session
    except MailroomError as exc:
        fail(exc.message)


def emit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, default=str))
        return
    for key, value in data.items():
        click.echo(f"{key}: {value}")


@click.group()
@click.version_option(package_name="mailroom")
def main() -> None:
    """Mailroom: multi-tenant IMAP/SMTP mailboxes behind a REST API."""


# --- db ----------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema. Prints `database: <url without password>` then `migrated: <revision>`."""
    settings = settings_or_exit()
    engine = make_engine(settings)
    upgrade(engine, revision)
    click.echo(f"database: {engine.url.render_as_string(hide_password=True)}")
    click.echo(f"migrated: {revision}")


# --- tenants -----------------------------------------------------------------------------------


@main.group()
def tenant() -> None:
    """Tenants (companies)."""


@tenant.command("create")
@click.argument("name")
@click.option("--slug", help="Short unique name; derived from NAME when omitted.")
@JSON_OPTION
def tenant_create(name: str, slug: str | None, as_json: bool) -> None:
    """Create a tenant. Prints `id`, `slug`, `name`."""
    with session_scope() as session:
        t = tenancy.create_tenant(session, name=name, slug=slug)
        emit({"id": t.id, "slug": t.slug, "name": t.name}, as_json)


@tenant.command("list")
@JSON_OPTION
def tenant_list(as_json: bool) -> None:
    """List tenants. Prints one `id slug name` line each (JSON: {"items": [...]})."""
    with session_scope() as session:
        rows = list(session.scalars(tenancy.unrestricted_unsafe(Tenant).order_by(Tenant.created_at)))
        if as_json:
            click.echo(json.dumps({"items": [{"id": t.id, "slug": t.slug, "name": t.name} for t in rows]}))
        for t in [] if as_json else rows:
            click.echo(f"{t.id} {t.slug} {t.name}")


# --- users -------------------------------------------------------------------------------------


@main.group()
def user() -> None:
    """Users of a tenant."""


@user.command("create")
@click.option("--tenant", "tenant_ref", required=True, help="Tenant id or slug.")
@click.option("--email", required=True)
@click.option("--name", default="")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member", show_default=True)
@JSON_OPTION
def user_create(tenant_ref: str, email: str, name: str, role: str, as_json: bool) -> None:
    """Create a user. Prints `id`, `tenant_id`, `email`, `role`."""
    with session_scope() as session:
        t = tenancy.find_tenant(session, tenant_ref)
        u = tenancy.create_user(session, tenant_id=t.id, email=email, name=name, role=role)
        emit({"id": u.id, "tenant_id": t.id, "email": u.email, "role": u.role}, as_json)


# --- keys --------------------------------------------------------------------------------------


@main.group()
def key() -> None:
    """API keys. A key is shown once, when it is created; only its hash is stored."""


@key.command("create")
@click.option("--tenant", "tenant_ref", required=True, help="Tenant id or slug.")
@click.option("--user", "user_ref", required=True, help="User id or email.")
@click.option("--name", default="", help="A label, e.g. where the key is used.")
@JSON_OPTION
def key_create(tenant_ref: str, user_ref: str, name: str, as_json: bool) -> None:
    """Create a key for a user. Prints `id`, `prefix`, `user_id`, `tenant_id`, `role` and `key`
    (the secret, shown only now)."""
    with session_scope() as session:
        t = tenancy.find_tenant(session, tenant_ref)
        u = tenancy.find_user(session, t.id, user_ref)
        k, plaintext = tenancy.create_api_key(session, u, name=name)
        emit(
            {
                "id": k.id,
                "prefix": k.prefix,
                "user_id": u.id,
                "tenant_id": t.id,
                "role": u.role,
                "key": plaintext,
            },
            as_json,
        )


@key.command("revoke")
@click.argument("ref")
@JSON_OPTION
def key_revoke(ref: str, as_json: bool) -> None:
    """Revoke a key by id or prefix. Prints `id`, `prefix`, `revoked_at`."""
    with session_scope() as session:
        k = tenancy.revoke_api_key(session, ref)
        emit(
            {
                "id": k.id,
                "prefix": k.prefix,
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            },
            as_json,
        )


@key.command("list")
@click.option("--tenant", "tenant_ref", required=True, help="Tenant id or slug.")
@JSON_OPTION
def key_list(tenant_ref: str, as_json: bool) -> None:
    """List a tenant's keys (never the secrets). One `id prefix user state last_used` line each."""
    with session_scope() as session:
        t = tenancy.find_tenant(session, tenant_ref)
        rows = list(
            session.scalars(
                tenancy.unrestricted_unsafe(ApiKey)
                .where(ApiKey.tenant_id == t.id)
                .order_by(ApiKey.created_at)
            )
        )
        items = [
            {
                "id": k.id,
                "prefix": k.prefix,
                "user": k.user.email,
                "name": k.name,
                "state": "revoked" if k.revoked_at else "active",
                "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
            }
            for k in rows
        ]
        if as_json:
            click.echo(json.dumps({"items": items}))
            return
        for i in items:
            click.echo(f"{i['id']} {i['prefix']} {i['user']} {i['state']} {i['last_used_at'] or 'never'}")


# --- running -----------------------------------------------------------------------------------


@main.command("worker-host")
@click.option(
    "--queue",
    "queue_specs",
    multiple=True,
    required=True,
    help="QUEUE[:THREADS], repeatable: run a worker for QUEUE with THREADS threads (default 2).",
)
@click.option("--beat", is_flag=True, help="Also run Beat in this process.")
@click.option(
    "--watcher", "with_watcher", is_flag=True, help="Also run the watcher in this process, on its own thread."
)
def worker_host(queue_specs: tuple[str, ...], beat: bool, with_watcher: bool) -> None:
    """Run one Celery worker per queue in this one process (and Beat with --beat, the
    watcher with --watcher): the embedded stack's way to keep queues apart without an
    interpreter each. Logs like a
    celery worker; stops warmly on SIGTERM or Ctrl-C. Production runs one
    `celery worker -Q QUEUE` per queue instead (deploy/)."""
    from tasks.embedded import WorkerHost
    from tasks.queues import QUEUES

    queues: dict[str, int] = {}
    for spec in queue_specs:
        name, _, threads = spec.partition(":")
        if name not in QUEUES:
            fail(f"unknown queue {name!r}; the queues are {', '.join(QUEUES)}", 2)
        if threads and (not threads.isdigit() or not 1 <= int(threads) <= 64):
            fail(f"threads for {name!r} must be a number from 1 to 64", 2)
        queues[name] = int(threads or 2)
    sys.exit(WorkerHost(settings_or_exit(), queues, beat=beat, watcher=with_watcher).run())


@main.command("watcher")
def watcher() -> None:
    """Watch this process's share of the accounts over IMAP (NOTIFY where the server has
    it, else IDLE on INBOX plus STATUS rounds) and queue a sync of each folder that
    changes. Run several: accounts spread over the live watchers of MAILROOM_WATCHER_GROUP.
    Stops on SIGTERM or Ctrl-C."""
    from tasks.watcher import run_watcher

    run_watcher(settings_or_exit())


@main.command("flower")
@click.option("--port", type=int, default=None, help="Port (default MAILROOM_FLOWER_PORT, 5555).")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
def flower(port: int | None, address: str) -> None:
    """Run Flower, the web view of Celery's workers and tasks, behind the basic auth of
    MAILROOM_FLOWER_BASIC_AUTH (required unless it listens on loopback). The login reaches
    Flower through its environment, never its command line."""
    import os

    settings = settings_or_exit()
    loopback = address in {"127.0.0.1", "::1", "localhost"}
    env = dict(os.environ)
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    elif loopback:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"  # this machine's users only
    else:
        fail("set MAILROOM_FLOWER_BASIC_AUTH (user:password) before Flower listens beyond loopback", 2)
    argv = [sys.executable, "-m", "celery", "-A", "tasks.celery_app", "flower"]
    argv += [f"--port={port or settings.flower_port}", f"--address={address}"]
    os.execvpe(argv[0], argv, env)  # noqa: S606 - our own interpreter, no shell involved


@main.command("run")
@click.option("--port", default=8000, show_default=True, help="API port.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--flower/--no-flower", default=False, show_default=True, help="Also start Flower.")
def run(port: int, host: str, flower: bool) -> None:
    """Start everything locally: Redis (if no URL is set), migrations, the API (gunicorn),
    the workers (the I/O-bound queues, Beat and the watcher in one process, spam in another) and, with
    --flower, Flower. Prints the URLs and an admin key; Ctrl-C stops all."""
    from mailroom.launcher import Launcher

    sys.exit(Launcher(host=host, port=port, flower=flower).run())


from mailroom.cli_spam import spam  # noqa: E402 - the group registers on the finished main

main.add_command(spam)

if __name__ == "__main__":  # pragma: no cover
    main()
