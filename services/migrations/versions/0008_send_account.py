"""per-account Sent-copy setting; outbox retention needs no schema change

``accounts.save_sent_copy`` (true for existing accounts): whether a send files its copy in
\\Sent, off for servers that file sent mail themselves. Outbox retention (the hourly
cleanup deleting final rows after ``MAILROOM_OUTBOX_RETENTION_HOURS`` and dropping the
message bytes once no attempt can need them) works on the columns of 0005.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "accounts", sa.Column("save_sent_copy", sa.Boolean(), server_default=sa.true(), nullable=False)
    )


def downgrade() -> None:
    # SQLite (3.35+) drops a column in place.
    op.drop_column("accounts", "save_sent_copy")
