"""spam verdicts, indicators, tenant spam settings and per-tenant model layer.

Placeholder created so that parallel work keeps one migration chain; it is filled in
with the schema change it names, or says "no schema change".

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
