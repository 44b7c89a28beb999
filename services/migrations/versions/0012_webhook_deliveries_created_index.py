"""webhook_deliveries: created_at indexed, and the pending deliveries by creation time

``ix_webhook_deliveries_endpoint_created`` leads with the endpoint, so the hourly
cleanup's range delete (``created_at < …`` across endpoints) could not use it and scanned
the whole table: ``ix_webhook_deliveries_created_at`` serves it. The sweep that publishes
deliveries whose publish failed after their commit reads the ``pending`` ones by creation
time every minute: a partial index holds just those (few: a delivery leaves ``pending`` at
its first attempt), so the sweep stays one short index read however large the history.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    op.create_index("ix_webhook_deliveries_created_at", "webhook_deliveries", ["created_at"])
    op.create_index(
        "ix_webhook_deliveries_pending",
        "webhook_deliveries",
        ["created_at"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_pending", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_created_at", table_name="webhook_deliveries")
