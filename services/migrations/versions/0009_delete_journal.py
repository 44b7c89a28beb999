"""delete intent journal (crash between IMAP command and row commit).

Placeholder created so that parallel work keeps one migration chain; it is filled in
with the schema change it names, or says "no schema change".

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
