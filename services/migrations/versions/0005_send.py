"""send (outbox and scheduled sends)

The ``outbox`` table of 0001 was a placeholder no code wrote to, so it is rebuilt in its
real shape: the message's exact bytes, its envelope, its state (queued/scheduled →
sending → accepted → sent), ``send_at`` for scheduled sends, and what the SMTP server and
the Sent folder answered. An ``Idempotency-Key`` is unique per tenant (it was per account).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _fks(*extra: sa.ForeignKeyConstraint) -> list[sa.ForeignKeyConstraint]:
    return [
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_outbox_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_outbox_tenant_id_tenants"), ondelete="CASCADE"
        ),
        *extra,
    ]


def upgrade() -> None:
    op.drop_index("ix_outbox_tenant_id", table_name="outbox")
    op.drop_table("outbox")
    op.create_table(
        "outbox",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("message_id_header", sa.String(length=998), nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("envelope_from", sa.String(length=320), nullable=False),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("save_sent", sa.Boolean(), nullable=False),
        sa.Column("send_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("sending_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("accepted_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("sent_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("smtp_reply", sa.Text(), nullable=True),
        sa.Column("refused", sa.JSON(), nullable=True),
        sa.Column("sent_folder", sa.String(length=1000), nullable=True),
        sa.Column("sent_uid", sa.BigInteger(), nullable=True),
        sa.Column("sent_message_id", sa.String(length=36), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        *_fks(
            sa.ForeignKeyConstraint(
                ["user_id"], ["users.id"], name=op.f("fk_outbox_user_id_users"), ondelete="SET NULL"
            )
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name=op.f("uq_outbox_tenant_id_idempotency_key")),
    )
    op.create_index("ix_outbox_tenant_id", "outbox", ["tenant_id"])
    op.create_index("ix_outbox_account_created", "outbox", ["account_id", "created_at"])
    op.create_index("ix_outbox_account_sending", "outbox", ["account_id", "sending_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_account_sending", table_name="outbox")
    op.drop_index("ix_outbox_account_created", table_name="outbox")
    op.drop_index("ix_outbox_tenant_id", table_name="outbox")
    op.drop_table("outbox")
    op.create_table(
        "outbox",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("message_id_header", sa.String(length=998), nullable=True),
        sa.Column("task_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        *_fks(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint(
            "account_id", "idempotency_key", name=op.f("uq_outbox_account_id_idempotency_key")
        ),
    )
    op.create_index("ix_outbox_tenant_id", "outbox", ["tenant_id"])
