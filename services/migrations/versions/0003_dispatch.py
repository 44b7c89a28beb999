"""dispatch: running duration statistics, and partial indexes for the in-flight cap and stats

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import services.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

IN_FLIGHT = sa.text("state IN ('queued', 'running', 'retrying')")
ENDED_BADLY = sa.text("state IN ('failed', 'cancelled')")


def upgrade() -> None:
    op.create_table(
        "task_durations",
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("queue", sa.String(length=32), nullable=False),
        sa.Column("runs", sa.BigInteger(), nullable=False),
        sa.Column("total_seconds", sa.Float(), nullable=False),
        sa.Column("recent_seconds", sa.Float(), nullable=False),
        sa.Column("updated_at", services.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_task_durations_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_task_durations_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", "type", name=op.f("pk_task_durations")),
    )
    op.create_index(op.f("ix_task_durations_tenant_id"), "task_durations", ["tenant_id"])
    op.create_index(
        "ix_tasks_in_flight",
        "tasks",
        ["tenant_id", "queue", "state"],
        postgresql_where=IN_FLIGHT,
        sqlite_where=IN_FLIGHT,
    )
    op.create_index(
        "ix_tasks_ended_badly",
        "tasks",
        ["finished_at", "tenant_id"],
        postgresql_where=ENDED_BADLY,
        sqlite_where=ENDED_BADLY,
    )
    _backfill()


def _backfill() -> None:
    """Seed the statistics from the kept history, once, so estimates do not start empty."""
    if op.get_bind().dialect.name == "postgresql":
        seconds = "EXTRACT(EPOCH FROM finished_at - started_at)"
    else:
        seconds = "(julianday(finished_at) - julianday(started_at)) * 86400.0"
    op.execute(
        """
        INSERT INTO task_durations
            (account_id, type, tenant_id, queue, runs, total_seconds, recent_seconds, updated_at)
        SELECT account_id, type, MIN(tenant_id), MIN(queue), COUNT(*), SUM({seconds}),
               AVG({seconds}), MAX(finished_at)
        FROM tasks
        WHERE state = 'succeeded' AND account_id IS NOT NULL
          AND started_at IS NOT NULL AND finished_at IS NOT NULL
        GROUP BY account_id, type
        """.replace("{seconds}", seconds)
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_ended_badly", table_name="tasks")
    op.drop_index("ix_tasks_in_flight", table_name="tasks")
    op.drop_index(op.f("ix_task_durations_tenant_id"), table_name="task_durations")
    op.drop_table("task_durations")
