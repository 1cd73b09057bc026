"""runs addressed by URL: trainings.run_dir and versions.weights_path become run_url

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

A run lives in the storage (a local folder or an fsspec URL such as s3://bucket/prefix/trainings/ID),
and a row holds its URL. Existing values are local paths, which are URLs of runs in a local storage,
so they are kept as they are.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trainings") as batch:
        batch.alter_column("run_dir", new_column_name="run_url")
    with op.batch_alter_table("versions") as batch:
        batch.alter_column("weights_path", new_column_name="run_url")


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.alter_column("run_url", new_column_name="weights_path")
    with op.batch_alter_table("trainings") as batch:
        batch.alter_column("run_url", new_column_name="run_dir")
