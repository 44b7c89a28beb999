"""per-account Sent-copy setting and outbox retention.

Placeholder created so that parallel work keeps one migration chain; it is filled in
with the schema change it names, or says "no schema change".

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
