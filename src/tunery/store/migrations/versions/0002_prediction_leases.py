"""prediction leases: the server running a prediction, and until when

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Predictions left by a server that died are taken over by another (or the restarted) server
once their lease expires, and never while the server holding them lives. Rows from before
this revision have no lease: they are taken over at once, as a restart did before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
