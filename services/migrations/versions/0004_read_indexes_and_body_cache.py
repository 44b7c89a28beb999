"""read indexes and body cache

The message list orders by ``date DESC NULLS LAST, id DESC``; the old ``(folder_id, date)``
and ``(account_id, date)`` indexes could not give that order, so every list read the whole
folder and sorted it. The new indexes carry the list's exact order. SQLite refuses
``NULLS LAST`` in an index but sorts NULL lowest, so its ``DESC`` index has the same order.

``body_cache`` keeps message bodies fetched from IMAP for ``GET /api/messages/{id}?body=1``
(see services/bodies.py), keyed by folder, UIDVALIDITY and UID.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ORDERED = {"ix_messages_folder_order": "folder_id", "ix_messages_account_order": "account_id"}
OLD = {"ix_messages_folder_date": "folder_id", "ix_messages_account_date": "account_id"}


def upgrade() -> None:
    nulls_last = " NULLS LAST" if op.get_bind().dialect.name == "postgresql" else ""
    for name, column in ORDERED.items():
        op.execute(f"CREATE INDEX {name} ON messages ({column}, date DESC{nulls_last}, id DESC)")
    for name in OLD:
        op.drop_index(name, table_name="messages")

    op.create_table(
        "body_cache",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("folder_id", sa.String(length=36), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("uid", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_body_cache_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_body_cache_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["folder_id"], ["folders.id"], name=op.f("fk_body_cache_folder_id_folders"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_body_cache")),
        sa.UniqueConstraint("folder_id", "uidvalidity", "uid", name=op.f("uq_body_cache_folder_id")),
    )
    op.create_index("ix_body_cache_tenant_created", "body_cache", ["tenant_id", "created_at"])
    op.create_index("ix_body_cache_account_id", "body_cache", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_body_cache_account_id", table_name="body_cache")
    op.drop_index("ix_body_cache_tenant_created", table_name="body_cache")
    op.drop_table("body_cache")
    for name, column in OLD.items():
        op.create_index(name, "messages", [column, "date"])
    for name in ORDERED:
        op.drop_index(name, table_name="messages")
