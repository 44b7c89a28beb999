"""messages.size as BIGINT: the RFC822.SIZE a server declares may pass 2 GiB

A 32-bit column refused a message whose declared size is 2 GiB or more (PostgreSQL:
"integer out of range"), and the whole sync batch with it. SQLite's INTEGER is 64-bit
already; the batch operation keeps the migration the same on both.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("size", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("size", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False)
