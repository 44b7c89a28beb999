"""task life: the sync lock follows its task's record; internal errors get a reference

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import services.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("sync_lock_until")
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("error_ref", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("error_ref")
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("sync_lock_until", services.models.UTCDateTime(timezone=True), nullable=True)
        )
