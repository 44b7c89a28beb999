"""spam verdicts, indicators, tenant spam settings and per-tenant model layer

``messages`` gets what a spam check stores: ``is_spam`` (at the tenant's threshold, or the
user's own label), ``indicators`` (the named reasons), ``spam_label`` (what the user said:
spam or ham), ``spam_learned`` (the label the tenant's filter last learned from it) and
``spam_checked_at``; ``spam_score`` stays. ``ix_messages_account_spam`` holds only the spam
rows, in the list's order. The ``spam_verdict`` column of 0001, which nothing ever wrote,
is dropped. ``accounts`` get ``spam_auto_scan`` and
``spam_move_to_junk`` (both false). ``spam_settings`` holds one row per tenant: threshold,
allow- and block-list, and the tenant's learned layer over the shipped model.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("is_spam", sa.Boolean(), nullable=True))
    op.add_column("messages", sa.Column("indicators", sa.JSON(), nullable=True))
    op.add_column("messages", sa.Column("spam_label", sa.String(length=8), nullable=True))
    op.add_column("messages", sa.Column("spam_learned", sa.String(length=8), nullable=True))
    op.add_column("messages", sa.Column("spam_checked_at", UTCDateTime(timezone=True), nullable=True))
    # SQLite (3.35+) drops a column in place; no table rebuild, so the ordered indexes stay.
    op.drop_column("messages", "spam_verdict")
    # Only spam rows, in the list's order (see 0004 for why SQLite's has no NULLS LAST):
    # GET …/messages?is_spam=true reads a short range however rare spam is.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE INDEX ix_messages_account_spam ON messages "
            "(account_id, date DESC NULLS LAST, id DESC) WHERE is_spam IS true"
        )
    else:
        op.execute(
            "CREATE INDEX ix_messages_account_spam ON messages "
            "(account_id, date DESC, id DESC) WHERE is_spam IS 1"
        )
    for name in ("spam_auto_scan", "spam_move_to_junk"):
        op.add_column("accounts", sa.Column(name, sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "spam_settings",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("allow", sa.JSON(), nullable=False),
        sa.Column("block", sa.JSON(), nullable=False),
        sa.Column("layer", sa.LargeBinary(), nullable=True),
        sa.Column("learned", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_spam_settings_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_spam_settings")),
    )


def downgrade() -> None:
    op.drop_table("spam_settings")
    for name in ("spam_move_to_junk", "spam_auto_scan"):
        op.drop_column("accounts", name)
    op.drop_index("ix_messages_account_spam", table_name="messages")
    op.add_column("messages", sa.Column("spam_verdict", sa.String(length=16), nullable=True))
    for name in ("spam_checked_at", "spam_learned", "spam_label", "indicators", "is_spam"):
        op.drop_column("messages", name)
