"""OpenAI's fine-tuning API: file purposes and validation, jobs' OpenAI fields, pause

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

A fine-tuning job of /openai/v1/fine_tuning/jobs is an ordinary training row; `trainings.openai`
holds what OpenAI's shape adds (suffix, metadata, resolved hyperparameters, file ids, ...), NULL
for trainings created through Replicate's API. `trainings.pause_requested` asks the worker to
stop a training and leave it "paused" until resumed. A file uploaded through /openai/v1/files
records its purpose and the outcome of validating it as training data.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("purpose", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("status", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("status_details", sa.Text(), nullable=True))
        batch.add_column(sa.Column("data_format", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("rows", sa.Integer(), nullable=True))
    with op.batch_alter_table("trainings") as batch:
        batch.add_column(sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("openai", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trainings") as batch:
        batch.drop_column("openai")
        batch.drop_column("pause_requested")
    with op.batch_alter_table("files") as batch:
        for column in ("rows", "data_format", "status_details", "status", "purpose"):
            batch.drop_column(column)
