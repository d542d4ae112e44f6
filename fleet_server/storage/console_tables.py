"""Tables of the console area: users, sessions, API tokens, login throttling, audit log.
(Imported by :mod:`fleet_server.storage.models`; migration 0003.)

Secrets are never stored in the clear: a password is an argon2id hash, a session id and an API token
are stored as their SHA-256 (the random values exist only in the browser cookie and in the caller's
hands), so a copy of the database logs nobody in. The audit log is a hash chain
(:mod:`fleet_server.console.audit`): ``auditentry.hash`` covers the entry and the previous entry's
hash, and ``audithead`` holds the newest (seq, hash), so that a deleted tail is detected too; its
single row is also the lock that serialises writers on PostgreSQL (``SELECT ... FOR UPDATE``).
``auditcheckpoint`` holds signed checkpoints of the head (migration 0006); their key is a file.
"""

from __future__ import annotations

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel


class ConsoleUser(SQLModel, table=True):
    """A person (or a machine identity) that logs in to the console; ``role`` names a row of the
    rights matrix (:mod:`fleet_server.console.rbac`)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=64)
    role: str = Field(max_length=32)
    password_hash: str = Field(max_length=256)                        # argon2id, PHC string
    disabled: bool = False
    created_at: int = Field(sa_type=BigInteger)
    updated_at: int = Field(sa_type=BigInteger)
    password_changed_at: int = Field(sa_type=BigInteger)
    last_login_at: int | None = Field(default=None, sa_type=BigInteger)


class ConsoleSession(SQLModel, table=True):
    """A logged-in browser. The cookie carries a random id; only its SHA-256 is stored."""

    id_sha256: str = Field(primary_key=True, max_length=64)
    user_id: int = Field(foreign_key="consoleuser.id", index=True)
    created_at: int = Field(sa_type=BigInteger)
    last_seen_at: int = Field(sa_type=BigInteger)                    # idle timeout
    expires_at: int = Field(index=True, sa_type=BigInteger)           # absolute lifetime
    ip: str = Field(default="", max_length=64)
    user_agent: str = Field(default="", max_length=256)


class ApiToken(SQLModel, table=True):
    """A bearer token for the API (machine identities), bound to a role. Only its SHA-256 is stored;
    ``prefix`` (the first characters) lets an operator recognise a token in a list."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    role: str = Field(max_length=32)
    token_sha256: str = Field(unique=True, index=True, max_length=64)
    prefix: str = Field(max_length=16)
    created_at: int = Field(sa_type=BigInteger)
    created_by: str = Field(default="", max_length=96)
    expires_at: int | None = Field(default=None, sa_type=BigInteger)
    last_used_at: int | None = Field(default=None, sa_type=BigInteger)
    revoked_at: int | None = Field(default=None, sa_type=BigInteger)


class LoginThrottle(SQLModel, table=True):
    """Failed logins per key (``user:<name>`` or ``ip:<address>``) within a window, and a lockout."""

    key: str = Field(primary_key=True, max_length=160)
    failures: int = 0
    first_failure_at: int = Field(sa_type=BigInteger)
    locked_until: int | None = Field(default=None, sa_type=BigInteger)
    updated_at: int = Field(index=True, sa_type=BigInteger)


class AuditEntry(SQLModel, table=True):
    """One entry of the append-only audit log. ``seq`` is assigned by the writer (1, 2, ...), ``hash``
    is SHA-256 over the canonical bytes of (seq, at, actor, action, target, details, prev_hash)."""

    seq: int = Field(primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False})
    at: int = Field(index=True, sa_type=BigInteger)
    actor: str = Field(index=True, max_length=96)
    action: str = Field(index=True, max_length=64)
    target: str = Field(default="", max_length=256)
    details: str = "{}"                                                 # canonical JSON object
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """The newest entry of the audit chain (one row, ``id`` 1): detects a deleted tail and serialises
    writers (row lock)."""

    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    seq: int = Field(default=0, sa_type=BigInteger)
    hash: str = Field(max_length=64)
    updated_at: int = Field(default=0, sa_type=BigInteger)


class AuditCheckpoint(SQLModel, table=True):
    """A signed checkpoint of the audit chain (migration 0006): the Ed25519 signature of the key
    ``kid`` over the canonical bytes of (seq, head_hash, at, kid) (:mod:`fleet_server.console.checkpoint`).
    The signing key is a file, never in the database, so a consistent rewrite of every entry and its
    hash no longer matches the signed head hashes."""

    id: int | None = Field(default=None, primary_key=True)
    seq: int = Field(index=True, sa_type=BigInteger)                  # the entry whose hash is signed
    head_hash: str = Field(max_length=64)
    at: int = Field(sa_type=BigInteger)
    kid: str = Field(max_length=64)
    signature: str = Field(max_length=256)                            # hex
