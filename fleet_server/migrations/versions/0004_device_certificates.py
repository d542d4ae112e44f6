"""device certificates: every device certificate serial ever issued, for the CRL

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# pki.DEVICE_VALIDITY + pki.CLOCK_SKEW in ms: the expiry of a certificate issued before this table
# existed is not stored; it was issued at the latest when its device row was last updated, so this
# bound keeps it listed at least as long as it can be valid (longer is harmless, shorter is not).
_DEVICE_VALIDITY_MS = (365 * 86_400 + 300) * 1000


def upgrade() -> None:
    op.create_table(
        "devicecertificate",
        sa.Column("serial", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("not_after", sa.BigInteger(), nullable=False),
        sa.Column("replaced_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_index(op.f("ix_devicecertificate_device_id"), "devicecertificate", ["device_id"], unique=False)
    op.create_index(op.f("ix_devicecertificate_not_after"), "devicecertificate", ["not_after"], unique=False)
    op.execute(
        "INSERT INTO devicecertificate (serial, device_id, issued_at, not_after, replaced_at) "
        f"SELECT cert_serial, id, updated_at, updated_at + {_DEVICE_VALIDITY_MS}, NULL FROM device "
        "WHERE cert_serial IS NOT NULL")


def downgrade() -> None:
    op.drop_index(op.f("ix_devicecertificate_not_after"), table_name="devicecertificate")
    op.drop_index(op.f("ix_devicecertificate_device_id"), table_name="devicecertificate")
    op.drop_table("devicecertificate")
