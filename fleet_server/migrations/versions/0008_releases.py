"""releases: firmware release catalog, per-device assignments, attested release of each device

Revision ID: 0008
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _str(length: int | None = None) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length) if length else sqlmodel.sql.sqltypes.AutoString()


def upgrade() -> None:
    op.create_table(
        "release",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target", _str(200), nullable=False),
        sa.Column("device_class", _str(64), nullable=False),
        sa.Column("version", _str(32), nullable=False),
        sa.Column("reference", _str(), nullable=False),
        sa.Column("reference_sha256", _str(64), nullable=False),
        sa.Column("bundle_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("bundle_length", sa.BigInteger(), nullable=False),
        sa.Column("state", _str(16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", _str(64), nullable=False),
        sa.Column("withdrawn_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("target"),
    )
    op.create_index(op.f("ix_release_device_class"), "release", ["device_class"], unique=False)

    op.create_table(
        "releaseassignment",
        sa.Column("id", _str(32), nullable=False),
        sa.Column("device_id", _str(63), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("state", _str(16), nullable=False),
        sa.Column("reason", _str(512), nullable=False),
        sa.Column("deadline", sa.BigInteger(), nullable=False),
        sa.Column("grace_ms", sa.BigInteger(), nullable=False),
        sa.Column("previous_release_id", sa.Integer(), nullable=True),
        sa.Column("previous_class", _str(64), nullable=False),
        sa.Column("previous_version", _str(64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", _str(64), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("committed_at", sa.BigInteger(), nullable=True),
        sa.Column("grace_until", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.ForeignKeyConstraint(["release_id"], ["release.id"]),
        sa.ForeignKeyConstraint(["previous_release_id"], ["release.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_releaseassignment_device_id"), "releaseassignment", ["device_id"], unique=False)
    op.create_index(op.f("ix_releaseassignment_release_id"), "releaseassignment", ["release_id"],
                    unique=False)
    op.create_index(op.f("ix_releaseassignment_created_at"), "releaseassignment", ["created_at"],
                    unique=False)

    op.create_table(
        "devicerelease",
        sa.Column("device_id", _str(63), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("attested_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.ForeignKeyConstraint(["release_id"], ["release.id"]),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_index(op.f("ix_devicerelease_release_id"), "devicerelease", ["release_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_devicerelease_release_id"), table_name="devicerelease")
    op.drop_table("devicerelease")
    op.drop_index(op.f("ix_releaseassignment_created_at"), table_name="releaseassignment")
    op.drop_index(op.f("ix_releaseassignment_release_id"), table_name="releaseassignment")
    op.drop_index(op.f("ix_releaseassignment_device_id"), table_name="releaseassignment")
    op.drop_table("releaseassignment")
    op.drop_index(op.f("ix_release_device_class"), table_name="release")
    op.drop_table("release")
