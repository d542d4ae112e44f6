"""console: users, sessions, API tokens, login throttling, audit log

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The hash before the first audit entry (fleet_server.console.audit.GENESIS_HASH).
GENESIS_HASH = "0" * 64


def _str(length: int | None = None) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length) if length else sqlmodel.sql.sqltypes.AutoString()


def upgrade() -> None:
    op.create_table(
        "consoleuser",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", _str(64), nullable=False),
        sa.Column("role", _str(32), nullable=False),
        sa.Column("password_hash", _str(256), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("password_changed_at", sa.BigInteger(), nullable=False),
        sa.Column("last_login_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_consoleuser_name"), "consoleuser", ["name"], unique=True)

    op.create_table(
        "consolesession",
        sa.Column("id_sha256", _str(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("ip", _str(64), nullable=False),
        sa.Column("user_agent", _str(256), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["consoleuser.id"]),
        sa.PrimaryKeyConstraint("id_sha256"),
    )
    op.create_index(op.f("ix_consolesession_user_id"), "consolesession", ["user_id"], unique=False)
    op.create_index(op.f("ix_consolesession_expires_at"), "consolesession", ["expires_at"], unique=False)

    op.create_table(
        "apitoken",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", _str(64), nullable=False),
        sa.Column("role", _str(32), nullable=False),
        sa.Column("token_sha256", _str(64), nullable=False),
        sa.Column("prefix", _str(16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", _str(96), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("last_used_at", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_index(op.f("ix_apitoken_token_sha256"), "apitoken", ["token_sha256"], unique=True)

    op.create_table(
        "loginthrottle",
        sa.Column("key", _str(160), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("first_failure_at", sa.BigInteger(), nullable=False),
        sa.Column("locked_until", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index(op.f("ix_loginthrottle_updated_at"), "loginthrottle", ["updated_at"], unique=False)

    op.create_table(
        "auditentry",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("actor", _str(96), nullable=False),
        sa.Column("action", _str(64), nullable=False),
        sa.Column("target", _str(256), nullable=False),
        sa.Column("details", _str(), nullable=False),
        sa.Column("prev_hash", _str(64), nullable=False),
        sa.Column("hash", _str(64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    for column in ("at", "actor", "action"):
        op.create_index(op.f(f"ix_auditentry_{column}"), "auditentry", [column], unique=False)

    head = op.create_table(
        "audithead",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", _str(64), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH, "updated_at": 0}])


def downgrade() -> None:
    op.drop_table("audithead")
    for column in ("at", "actor", "action"):
        op.drop_index(op.f(f"ix_auditentry_{column}"), table_name="auditentry")
    op.drop_table("auditentry")
    op.drop_index(op.f("ix_loginthrottle_updated_at"), table_name="loginthrottle")
    op.drop_table("loginthrottle")
    op.drop_index(op.f("ix_apitoken_token_sha256"), table_name="apitoken")
    op.drop_table("apitoken")
    op.drop_index(op.f("ix_consolesession_expires_at"), table_name="consolesession")
    op.drop_index(op.f("ix_consolesession_user_id"), table_name="consolesession")
    op.drop_table("consolesession")
    op.drop_index(op.f("ix_consoleuser_name"), table_name="consoleuser")
    op.drop_table("consoleuser")
