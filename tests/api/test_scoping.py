"""Tenant scoping is a property of the session: a session bound to a tenant cannot load,
update or delete another tenant's row by id, whatever the statement says; an unbound
session refuses tenant reads; the escape is explicit. On PostgreSQL and on SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from mailroom.auth import authenticate_request
from mailroom.context import db_session
from services import tenancy
from services.db import (
    UnscopedQuery,
    bind_tenant,
    bound_tenant,
    make_engine,
    make_sessionmaker,
    tenant_sessions,
    transaction,
    unrestricted_unsafe_sessions,
)
from services.migrate import upgrade
from services.models import Account, ApiKey, Folder, TaskRecord, Tenant, User
from services.settings import Settings, load_settings
from tests.support import TenantKit


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        made = make_engine(settings)
    else:
        made = make_engine(
            load_settings(database_url=f"sqlite:///{tmp_path}/scoping.db", secret_key=settings.secret_key)
        )
        upgrade(made)
    yield made
    made.dispose()


def _tenant(session: Session) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    tenant = tenancy.create_tenant(session, name=f"T {tag}", slug=f"s-{tag}")
    user = tenancy.create_user(session, tenant_id=tenant.id, email=f"u@{tag}.test", role="admin")
    key, _ = tenancy.create_api_key(session, user)
    account = Account(
        tenant_id=tenant.id,
        user_id=user.id,
        email=f"box@{tag}.test",
        imap_host="imap.example.com",
        imap_port=993,
        imap_tls="ssl",
        imap_username="u",
        imap_password_enc=b"x",
        smtp_host="smtp.example.com",
        smtp_port=465,
        smtp_tls="ssl",
        smtp_username="u",
        smtp_password_enc=b"x",
    )
    session.add(account)
    session.flush()
    folder = Folder(tenant_id=tenant.id, account_id=account.id, name="INBOX")
    task = TaskRecord(tenant_id=tenant.id, user_id=user.id, account_id=account.id, type="sync", queue="sync")
    session.add_all([folder, task])
    session.flush()
    return {
        "tenant": tenant.id,
        "user": user.id,
        "key": key.id,
        "account": account.id,
        "folder": folder.id,
        "task": task.id,
    }


@pytest.fixture
def two(engine: Engine) -> tuple[sessionmaker[Any], dict[str, str], dict[str, str]]:
    factory = make_sessionmaker(engine)
    with transaction(unrestricted_unsafe_sessions(factory)) as session:
        mine, theirs = _tenant(session), _tenant(session)
    return factory, mine, theirs


MODELS: dict[str, Any] = {
    "account": Account,
    "folder": Folder,
    "task": TaskRecord,
    "user": User,
    "key": ApiKey,
}


def test_select_and_fresh_get_see_only_the_bound_tenant(two: Any) -> None:
    factory, mine, theirs = two
    with tenant_sessions(factory, mine["tenant"])() as session:
        for name, model in MODELS.items():
            assert session.scalar(select(model).where(model.id == theirs[name])) is None, name
            assert session.get(model, theirs[name]) is None, name
            assert session.get(model, mine[name]) is not None, name
        assert session.get(Tenant, theirs["tenant"]) is None
        assert [t.id for t in session.scalars(select(Tenant))] == [mine["tenant"]]
        # Column and aggregate queries are limited too, not only entity loads.
        ids = set(session.scalars(select(Account.id)))
        assert theirs["account"] not in ids and mine["account"] in ids
        count = session.scalar(
            select(func.count()).select_from(Account).where(Account.id == theirs["account"])
        )
        assert count == 0


def test_get_does_not_return_another_tenants_row_from_the_identity_map(two: Any) -> None:
    factory, mine, theirs = two
    with factory() as session:
        # Loaded through the explicit escape before the session is bound (as the key
        # lookup is), so the row sits in the identity map and get() would emit no SQL.
        loaded = session.scalar(tenancy.unrestricted_unsafe(Account).where(Account.id == theirs["account"]))
        assert loaded is not None
        bind_tenant(session, mine["tenant"])
        assert session.get(Account, theirs["account"]) is None
        assert session.get(Account, mine["account"]) is not None
    with tenant_sessions(factory, mine["tenant"])() as session:
        assert session.scalar(tenancy.unrestricted_unsafe(Account).where(Account.id == theirs["account"]))
        assert session.get(Account, theirs["account"]) is None


def test_relationship_load_is_scoped(two: Any) -> None:
    factory, mine, theirs = two
    with transaction(unrestricted_unsafe_sessions(factory)) as session:
        # A key of my tenant that (wrongly) points at a user of theirs.
        crooked = ApiKey(
            tenant_id=mine["tenant"], user_id=theirs["user"], prefix="x", key_hash=uuid.uuid4().hex
        )
        session.add(crooked)
        session.flush()
        crooked_id = crooked.id
    with tenant_sessions(factory, mine["tenant"])() as session:
        key = session.get(ApiKey, crooked_id)
        assert key is not None and key.user is None
        own = session.get(ApiKey, mine["key"])
        assert own is not None and own.user.id == mine["user"]


def test_bulk_update_and_delete_cannot_touch_another_tenant(two: Any) -> None:
    factory, mine, theirs = two
    with transaction(tenant_sessions(factory, mine["tenant"])) as session:
        for ref in (mine, theirs):
            session.execute(
                update(Account)
                .where(Account.id == ref["account"])
                .values(name="renamed")
                .execution_options(synchronize_session=False)
            )
        # ORM bulk UPDATE by primary key (one executemany of parameter sets).
        session.execute(update(Folder), [{"id": theirs["folder"], "name": "stolen"}])
        session.execute(
            delete(TaskRecord)
            .where(TaskRecord.id.in_([theirs["task"], mine["task"]]))
            .execution_options(synchronize_session=False)
        )
    with unrestricted_unsafe_sessions(factory)() as session:
        assert session.get(Account, mine["account"]).name == "renamed"
        assert session.get(Account, theirs["account"]).name == ""
        assert session.get(Folder, theirs["folder"]).name == "INBOX"
        assert session.get(TaskRecord, mine["task"]) is None
        assert session.get(TaskRecord, theirs["task"]) is not None


def test_an_unbound_session_refuses_tenant_reads(two: Any) -> None:
    factory, mine, _ = two
    with factory() as session:
        with pytest.raises(UnscopedQuery):
            session.scalars(select(Account)).all()
        with pytest.raises(UnscopedQuery):
            session.get(TaskRecord, mine["task"])
        with pytest.raises(UnscopedQuery):
            session.execute(update(Account).values(name="x").execution_options(synchronize_session=False))
        # Plain SQL is not an entity read (the readiness probe uses it).
        assert session.execute(text("SELECT 1")).scalar() == 1
    with factory() as session:
        bind_tenant(session, mine["tenant"])
        with pytest.raises(UnscopedQuery):
            bind_tenant(session, str(uuid.uuid4()))


def test_the_api_binds_the_request_session_after_authentication(app: Any, kit: TenantKit) -> None:
    headers = {"Authorization": f"Bearer {kit.member_key}"}
    with app.test_request_context("/api/accounts", headers=headers):
        authenticate_request()
        session = db_session()
        assert bound_tenant(session) == kit.tenant_id
        assert session.scalars(select(Tenant.id)).all() == [kit.tenant_id]
