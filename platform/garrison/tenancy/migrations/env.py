"""Alembic environment: always run from garrison.tenancy.store with a connection already open."""

from __future__ import annotations

from alembic import context

from garrison.tenancy.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run tenancy migrations through garrison.tenancy.store.migrate(engine)")

# Batch mode lets later revisions alter SQLite tables, which SQLite's ALTER TABLE cannot.
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
