"""The `mailroom` command, run for real as a subprocess against a fresh database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailroom.app import create_app
from services.settings import load_settings
from tests.support import Api


@pytest.fixture
def cli(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    env["MAILROOM_DATABASE_URL"] = f"sqlite:///{tmp_path}/m.db"

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "mailroom.cli", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == expect, (args, result.stdout, result.stderr)
        return result

    run.database_url = env["MAILROOM_DATABASE_URL"]  # type: ignore[attr-defined]
    return run


def test_bootstrap_a_tenant_and_use_its_key(cli, tmp_path) -> None:
    out = cli("db", "upgrade").stdout
    assert "migrated: head" in out
    tenant = json.loads(cli("tenant", "create", "Acme Corp", "--json").stdout)
    assert tenant["slug"] == "acme-corp"
    text = cli(
        "user", "create", "--tenant", "acme-corp", "--email", "Boss@Acme.test", "--role", "admin"
    ).stdout
    assert "email: boss@acme.test" in text and "role: admin" in text
    key = json.loads(
        cli("key", "create", "--tenant", tenant["id"], "--user", "boss@acme.test", "--json").stdout
    )
    assert key["key"].startswith("mr_") and key["role"] == "admin"

    app = create_app(load_settings(database_url=cli.database_url))
    api = Api(app, key["key"])
    assert api.get("/api/accounts").status_code == 200
    assert api.get("/api/admin/stats").status_code == 200

    listing = cli("key", "list", "--tenant", "acme-corp").stdout
    assert key["prefix"] in listing and "active" in listing
    revoked = cli("key", "revoke", key["prefix"]).stdout
    assert "revoked_at:" in revoked
    assert api.get("/api/accounts").status_code == 401
    assert "revoked" in cli("key", "list", "--tenant", "acme-corp").stdout
    tenants = json.loads(cli("tenant", "list", "--json").stdout)["items"]
    assert [t["slug"] for t in tenants] == ["acme-corp"]


def test_errors_are_one_line_on_stderr(cli) -> None:
    cli("db", "upgrade")
    cli("tenant", "create", "Acme")
    duplicate = cli("tenant", "create", "Acme", expect=1)
    assert duplicate.stderr.strip() == "mailroom: a tenant with slug 'acme' exists already"
    missing = cli("user", "create", "--tenant", "nope", "--email", "a@b.test", expect=1)
    assert missing.stderr.strip() == "mailroom: no tenant 'nope'"
    bad_email = cli("user", "create", "--tenant", "acme", "--email", "not-an-email", expect=1)
    assert "not an email address" in bad_email.stderr
    assert cli("key", "revoke", "mr_nothing", expect=1).stderr.strip() == "mailroom: no API key 'mr_nothing'"


def test_worker_host_refuses_an_unknown_queue_and_a_bad_thread_count() -> None:
    from click.testing import CliRunner

    from mailroom.cli import main

    unknown = CliRunner().invoke(main, ["worker-host", "--queue", "nosuch"])
    assert unknown.exit_code == 2 and "unknown queue 'nosuch'" in unknown.output
    bad = CliRunner().invoke(main, ["worker-host", "--queue", "sync:0"])
    assert bad.exit_code == 2 and "from 1 to 64" in bad.output
