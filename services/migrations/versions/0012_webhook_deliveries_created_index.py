"""webhook_deliveries.created_at indexed: the hourly cleanup's range delete and the
pending-delivery sweep read deliveries by creation time across endpoints

``ix_webhook_deliveries_endpoint_created`` leads with the endpoint, so neither query could
use it; without this index both scanned the whole table.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_webhook_deliveries_created_at", "webhook_deliveries", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_created_at", table_name="webhook_deliveries")
