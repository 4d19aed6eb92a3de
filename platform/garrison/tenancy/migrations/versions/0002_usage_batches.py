"""Usage batches: the id of each usage batch written, so a retried or replayed batch is counted once.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_batches",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_batches"),
    )
    op.create_index("ix_usage_batches_recorded_at", "usage_batches", ["recorded_at"])


def downgrade() -> None:
    op.drop_table("usage_batches")
