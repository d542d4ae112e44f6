"""rollouts: staged rollouts, their members and phase approvals; device tags

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _str(length: int | None = None) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length) if length else sqlmodel.sql.sqltypes.AutoString()


def upgrade() -> None:
    op.create_table(
        "rollout",
        sa.Column("id", _str(32), nullable=False),
        sa.Column("kind", _str(16), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("target_group", _str(), nullable=False),
        sa.Column("plan", _str(), nullable=False),
        sa.Column("state", _str(16), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("reason", _str(512), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", _str(64), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("abort_trigger_at", sa.BigInteger(), nullable=True),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["release_id"], ["release.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_rollout_release_id"), "rollout", ["release_id"], unique=False)
    op.create_index(op.f("ix_rollout_state"), "rollout", ["state"], unique=False)

    op.create_table(
        "rolloutmember",
        sa.Column("rollout_id", _str(32), nullable=False),
        sa.Column("device_id", _str(63), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("order_key", _str(64), nullable=False),
        sa.Column("state", _str(24), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("assignment_id", _str(32), nullable=True),
        sa.Column("reason", _str(512), nullable=False),
        sa.Column("joined_at", sa.BigInteger(), nullable=False),
        sa.Column("assigned_at", sa.BigInteger(), nullable=True),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollout.id"]),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )

    op.create_table(
        "rolloutapproval",
        sa.Column("rollout_id", _str(32), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("approved_by", _str(64), nullable=False),
        sa.Column("approved_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollout.id"]),
        sa.PrimaryKeyConstraint("rollout_id", "phase"),
    )

    op.create_table(
        "device_tag",
        sa.Column("device_id", _str(63), nullable=False),
        sa.Column("tag", _str(64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("device_id", "tag"),
    )
    op.create_index(op.f("ix_device_tag_tag"), "device_tag", ["tag"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_device_tag_tag"), table_name="device_tag")
    op.drop_table("device_tag")
    op.drop_table("rolloutapproval")
    op.drop_table("rolloutmember")
    op.drop_index(op.f("ix_rollout_state"), table_name="rollout")
    op.drop_index(op.f("ix_rollout_release_id"), table_name="rollout")
    op.drop_table("rollout")
