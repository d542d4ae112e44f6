"""model rollouts: a rollout names a release (kind firmware) or a model version (kind model)

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.alter_column("release_id", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("model_version_id", sa.Integer(), nullable=True))
        batch.create_index(batch.f("ix_rollout_model_version_id"), ["model_version_id"], unique=False)
        batch.create_foreign_key("fk_rollout_model_version_id_modelversion", "modelversion",
                                 ["model_version_id"], ["id"])


def downgrade() -> None:
    op.execute("DELETE FROM rolloutapproval WHERE rollout_id IN (SELECT id FROM rollout WHERE kind = 'model')")
    op.execute("DELETE FROM rolloutmember WHERE rollout_id IN (SELECT id FROM rollout WHERE kind = 'model')")
    op.execute("DELETE FROM rollout WHERE kind = 'model'")
    with op.batch_alter_table("rollout") as batch:
        batch.drop_constraint("fk_rollout_model_version_id_modelversion", type_="foreignkey")
        batch.drop_index(batch.f("ix_rollout_model_version_id"))
        batch.drop_column("model_version_id")
        batch.alter_column("release_id", existing_type=sa.Integer(), nullable=False)
