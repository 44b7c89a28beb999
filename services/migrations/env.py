"""Alembic environment: runs against the connection handed over by services.migrate."""

from __future__ import annotations

from alembic import context

from services.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - Mailroom always passes a connection
    raise RuntimeError("run migrations through `mailroom db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
