"""API tokens: scopes, expiry, revocation, and a prefix to tell them apart

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Tokens made before keep every scope (what they could do until now), never expire, and have no
prefix (lists show their label and id).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ALL = "read,predict,train,admin"


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("prefix", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("scopes", sa.String(length=64), nullable=False, server_default=ALL))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        for column in ("revoked_at", "expires_at", "scopes", "prefix"):
            batch.drop_column(column)
