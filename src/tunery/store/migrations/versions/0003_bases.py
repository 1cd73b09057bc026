"""operator-registered base models: who registered them

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

A base model an operator registered (`tunery bases add`, POST /v1/bases) is an ordinary base
model row of owner "tunery" whose version's base_name is its source; `registered_by` tells it
apart from the built-in bases (NULL there and on users' models), so that only registered ones
can be removed and listed as such.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("registered_by", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("registered_by")
