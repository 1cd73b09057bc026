"""Per-owner limits: trainings running and queued, predictions at once, requests per minute

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

No rows at first: every owner has the built-in limits (store.models.LIMITS).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "owner_limits",
        sa.Column("owner", sa.String(length=64), primary_key=True),
        sa.Column("trainings", sa.Integer(), nullable=True),
        sa.Column("queued_trainings", sa.Integer(), nullable=True),
        sa.Column("predictions", sa.Integer(), nullable=True),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("owner_limits")
