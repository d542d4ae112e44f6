"""model deploy: a published version reaches devices only once deployed

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("modelversion") as batch:
        batch.add_column(sa.Column("deployed_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("deployed_by", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False,
                                   server_default=""))
    # Versions published before this revision already reached devices: they stay deployed.
    op.execute("UPDATE modelversion SET deployed_at = created_at, deployed_by = created_by")


def downgrade() -> None:
    with op.batch_alter_table("modelversion") as batch:
        batch.drop_column("deployed_by")
        batch.drop_column("deployed_at")
