"""delete journal: what a delete is about to do, committed before its IMAP commands

``delete_journal`` holds, per source folder of a running delete, the UIDs it is about to
move or expunge, the target folder and the target's UIDNEXT before the first command. A
delete that finds an entry left by an attempt killed between an IMAP command and the
commit of its rows reconciles the rows with the server from it
(services.mail_delete_journal).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.models import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delete_journal",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("source_folder_id", sa.String(length=36), nullable=False),
        sa.Column("target_folder_id", sa.String(length=36), nullable=True),
        sa.Column("target_uidnext", sa.BigInteger(), nullable=True),
        sa.Column("uids", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_delete_journal_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_delete_journal_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["source_folder_id"],
            ["folders.id"],
            name=op.f("fk_delete_journal_source_folder_id_folders"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["target_folder_id"],
            ["folders.id"],
            name=op.f("fk_delete_journal_target_folder_id_folders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delete_journal")),
    )
    op.create_index("ix_delete_journal_tenant_id", "delete_journal", ["tenant_id"])
    op.create_index("ix_delete_journal_account_id", "delete_journal", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_delete_journal_account_id", table_name="delete_journal")
    op.drop_index("ix_delete_journal_tenant_id", table_name="delete_journal")
    op.drop_table("delete_journal")
