"""The duration statistics and counts dispatch and the stats read, on both databases: the
migration seeds them from the kept history (and goes down and up again), successes fold in
as a running mean, and one preflight SELECT answers the account check, the in-flight count
and the estimate."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from services import task_stats, tenancy
from services.db import make_engine, make_sessionmaker, unrestricted_unsafe_sessions
from services.migrate import downgrade, upgrade
from services.models import Account, TaskDuration, TaskRecord, utcnow
from services.settings import Settings, load_settings
from services.tenancy import Principal


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, settings: Settings, postgres, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = postgres.create_database("stats_" + uuid.uuid4().hex[:8])
    else:
        url = f"sqlite:///{tmp_path}/stats.db"
    made = make_engine(load_settings(database_url=url, secret_key=settings.secret_key))
    upgrade(made)
    yield made
    made.dispose()


def _owner(session: Session) -> tuple[Principal, Principal, str]:
    tag = uuid.uuid4().hex[:10]
    tenant = tenancy.create_tenant(session, name=f"T {tag}", slug=f"s-{tag}")
    admin = tenancy.create_user(session, tenant_id=tenant.id, email=f"a@{tag}.test", role="admin")
    member = tenancy.create_user(session, tenant_id=tenant.id, email=f"m@{tag}.test", role="member")
    account = Account(
        tenant_id=tenant.id,
        user_id=admin.id,
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
    return (
        Principal(tenant_id=tenant.id, user_id=admin.id, role="admin"),
        Principal(tenant_id=tenant.id, user_id=member.id, role="member"),
        account.id,
    )


def _finished(session: Session, who: Principal, account_id: str, seconds: float, state: str) -> str:
    now = utcnow()
    record = TaskRecord(
        tenant_id=who.tenant_id,
        user_id=who.user_id,
        account_id=account_id,
        type="sync",
        queue="sync",
        params={},
        state=state,
        started_at=now - timedelta(seconds=seconds),
        finished_at=now,
    )
    session.add(record)
    session.flush()
    return record.id


def test_statistics_from_migration_to_preflight(engine: Engine) -> None:
    sessions = unrestricted_unsafe_sessions(make_sessionmaker(engine))
    with sessions() as session:
        admin, member, account_id = _owner(session)
        for seconds in (2.0, 4.0):
            _finished(session, admin, account_id, seconds, "succeeded")
        _finished(session, admin, account_id, 1.0, "failed")
        session.commit()
    # the history written before the statistics existed seeds them, once
    downgrade(engine, "0002")
    upgrade(engine)
    with sessions() as session:
        row = session.get(TaskDuration, (account_id, "sync"))
        assert row is not None and row.runs == 2
        assert row.total_seconds == pytest.approx(6.0, abs=0.01)
        assert row.recent_seconds == pytest.approx(3.0, abs=0.01)
        task_stats.record_success(session, _finished(session, admin, account_id, 6.0, "succeeded"))
        session.add(TaskRecord(tenant_id=admin.tenant_id, account_id=account_id, type="verify", queue="sync"))
        session.commit()
        session.refresh(row)
        assert row.runs == 3 and row.recent_seconds == pytest.approx(4.0, abs=0.01)
        assert task_stats.average_durations(session, admin.tenant_id) == {
            "sync": pytest.approx(4.0, abs=0.01)
        }
        counts = task_stats.counts_by_state(session, admin.tenant_id)
        assert counts["succeeded"] == 3 and counts["failed"] == 1 and counts["queued"] == 1
        checks = task_stats.preflight(
            session,
            tenant_id=admin.tenant_id,
            queue="sync",
            account_id=account_id,
            type="sync",
            cap=10,
            visible_to=admin,
        )
        assert checks == task_stats.Preflight(
            visible=True, in_flight=1, estimate=pytest.approx(4.0, abs=0.01)
        )
        # a member sees only their own accounts; the count stops at the cap
        hidden = task_stats.preflight(
            session,
            tenant_id=admin.tenant_id,
            queue="sync",
            account_id=account_id,
            type="x",
            cap=1,
            visible_to=member,
        )
        assert hidden.visible is False and hidden.in_flight == 1 and hidden.estimate is None
        in_flight, succeeded, ended = task_stats.scrape_counts(session)
        assert (
            ("sync", "queued", 1) in in_flight and succeeded["sync"] >= 3 and ("sync", "failed", 1) in ended
        )
