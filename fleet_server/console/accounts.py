"""Console accounts: users and their passwords, sessions, API tokens, login throttling. No Flask here:
the CLI (``fleet-server user`` / ``token``) and the web layer (:mod:`fleet_server.console.auth`) share it.

* **Passwords** are hashed with argon2id (memory-hard; parameters from ``[console]``), verified in
  constant time by argon2, and re-hashed on login when the parameters changed. An unknown or
  disabled user still costs one verification against a dummy hash, so response times do not tell
  which user names exist.
* **Sessions**: a random 256-bit id in the cookie; the database keeps its SHA-256, the user, the
  creation time (absolute lifetime ``session_max_hours``) and the last activity (idle timeout
  ``session_idle_minutes``). The role is read from the user row on every request, so a role change
  or a disabled user takes effect at once.
* **API tokens**: ``fst_`` + 256 random bits, bound to a role; only SHA-256 is stored.
* **Throttling**: failures are counted per user name and per client address within a window; when a
  key reaches its limit it is locked out for ``lockout_minutes`` (even the right password is refused
  meanwhile). :func:`after_failure` and :func:`is_locked` are the pure rules.

Times are integer milliseconds passed in by the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Connection, Engine, Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from fleet_server.config import ConsoleSettings
from fleet_server.console.rbac import Principal, Role
from fleet_server.storage import models
from fleet_server.storage.db import storage_error, write_connection
from protocol.errors import EdgeError

_TABLES = models.SQLModel.metadata.tables
_USER: Table = _TABLES["consoleuser"]
_SESSION: Table = _TABLES["consolesession"]
_TOKEN: Table = _TABLES["apitoken"]
_THROTTLE: Table = _TABLES["loginthrottle"]
u = _USER.c
s = _SESSION.c
t = _TOKEN.c

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
TOKEN_PREFIX = "fst_"  # noqa: S105 - a marker, not a secret
TOUCH_EVERY_MS = 60_000
"""A session's ``last_seen_at`` (and a token's ``last_used_at``) is written at most this often."""


class AccountError(EdgeError):
    """An account operation cannot be carried out (unknown user, name taken, weak password...)."""


# --------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------
def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def generate_password() -> str:
    """A random password (144 bits, URL-safe characters)."""
    return secrets.token_urlsafe(18)


def generate_token() -> str:
    """A random API token (``fst_`` + 256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AccountError("a name is 1-64 letters, digits, '.', '_', '@', '+', '-', starting with a letter "
                           "or digit")
    return name


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise AccountError(f"unknown role {role[:40]!r}; roles: {', '.join(r.value for r in Role)}") from None


def check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"a password has at most {MAX_PASSWORD} characters")
    return password


def make_hasher(settings: ConsoleSettings) -> PasswordHasher:
    """argon2id with the configured cost."""
    return PasswordHasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib,
                          parallelism=settings.argon2_parallelism, hash_len=32, salt_len=16, type=Type.ID)


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """Failed logins of one key within the current window."""

    failures: int
    first_failure_at: int
    locked_until: int | None = None


def is_locked(state: ThrottleState | None, now: int) -> bool:
    """True while ``state``'s lockout lasts."""
    return state is not None and state.locked_until is not None and now < state.locked_until


def after_failure(state: ThrottleState | None, now: int, *, max_failures: int, window_ms: int,
                  lockout_ms: int) -> ThrottleState:
    """The state after one more failure: a new window if the old one ended (or a lockout expired);
    a lockout when the failures reach ``max_failures``."""
    expired_lock = state is not None and state.locked_until is not None and now >= state.locked_until
    if state is None or expired_lock or now - state.first_failure_at >= window_ms:
        failures, first = 1, now
    else:
        failures, first = state.failures + 1, state.first_failure_at
    locked_until = now + lockout_ms if failures >= max_failures else None
    if state is not None and is_locked(state, now):
        locked_until = state.locked_until
    return ThrottleState(failures, first, locked_until)


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    name: str
    role: str
    disabled: bool
    created_at: int
    updated_at: int
    password_changed_at: int
    last_login_at: int | None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: int
    name: str
    role: str
    prefix: str
    created_at: int
    created_by: str
    expires_at: int | None
    last_used_at: int | None
    revoked_at: int | None

    def active(self, now: int) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class LoginResult:
    """Outcome of :meth:`Accounts.login`: a principal and its session token, or why not."""

    ok: bool
    user: UserRecord | None = None
    session_token: str | None = None
    locked: bool = False
    reason: str = ""


_USER_COLUMNS = (u.id, u.name, u.role, u.disabled, u.created_at, u.updated_at, u.password_changed_at,
                 u.last_login_at)
_TOKEN_COLUMNS = (t.id, t.name, t.role, t.prefix, t.created_at, t.created_by, t.expires_at, t.last_used_at,
                  t.revoked_at)


def _user(row: object) -> UserRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return UserRecord(id=m["id"], name=m["name"], role=m["role"], disabled=bool(m["disabled"]),
                      created_at=m["created_at"], updated_at=m["updated_at"],
                      password_changed_at=m["password_changed_at"], last_login_at=m["last_login_at"])


def _token(row: object) -> TokenRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return TokenRecord(id=m["id"], name=m["name"], role=m["role"], prefix=m["prefix"],
                       created_at=m["created_at"], created_by=m["created_by"], expires_at=m["expires_at"],
                       last_used_at=m["last_used_at"], revoked_at=m["revoked_at"])


# --------------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------------
class Accounts:
    """Users, sessions, tokens and throttling on one database engine."""

    def __init__(self, engine: Engine, settings: ConsoleSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.hasher = make_hasher(settings)
        # Verified against when the user does not exist, so that the time taken does not tell.
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))

    # -- transactions ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[Connection]:
        try:
            with write_connection(self.engine) as conn, conn.begin():
                yield conn
        except IntegrityError as exc:
            problem = "name already taken" if "UNIQUE" in str(exc).upper() else "conflict"
            raise AccountError(f"{what}: {problem}") from None
        except SQLAlchemyError as exc:
            raise storage_error(exc, what) from None

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except SQLAlchemyError as exc:
            raise storage_error(exc, what) from None

    # -- users -------------------------------------------------------------------------------------
    def add_user(self, name: str, role: str, password: str, *, now: int) -> UserRecord:
        """Create a user (names are unique, case-insensitively)."""
        check_name(name)
        check_role(role)
        digest = self.hasher.hash(check_password(password))
        with self._write("adding a user") as conn:
            taken = conn.execute(select(u.id).where(func.lower(u.name) == name.lower())).first()
            if taken is not None:
                raise AccountError(f"a user named {name!r} already exists")
            new_id = conn.execute(insert(_USER).values(
                name=name, role=role, password_hash=digest, disabled=False, created_at=now, updated_at=now,
                password_changed_at=now).returning(u.id)).scalar_one()
        return UserRecord(int(new_id), name, role, False, now, now, now, None)

    def users(self) -> list[UserRecord]:
        with self._read("listing users") as conn:
            return [_user(r) for r in conn.execute(select(*_USER_COLUMNS).order_by(u.name))]

    def user(self, *, name: str | None = None, user_id: int | None = None) -> UserRecord | None:
        stmt = select(*_USER_COLUMNS)
        if user_id is not None:
            stmt = stmt.where(u.id == user_id)
        elif name is not None:
            stmt = stmt.where(func.lower(u.name) == name.lower())
        else:
            raise AccountError("user(): give a name or an id")
        with self._read("reading a user") as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _user(row)

    def _require_user(self, conn: Connection, user_id: int) -> UserRecord:
        row = conn.execute(select(*_USER_COLUMNS).where(u.id == user_id).with_for_update()).first()
        if row is None:
            raise AccountError(f"no user with id {user_id}")
        return _user(row)

    @staticmethod
    def _enabled_admins(conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(_USER)
                                .where(u.role == Role.ADMIN, u.disabled.is_(False))).scalar_one())

    def set_role(self, user_id: int, role: str, *, now: int) -> tuple[UserRecord, str]:
        """Change a user's role; refuses to demote the last enabled admin. Returns (user, old role)."""
        check_role(role)
        with self._write("changing a role") as conn:
            user = self._require_user(conn, user_id)
            if user.role == Role.ADMIN and role != Role.ADMIN and not user.disabled \
                    and self._enabled_admins(conn) <= 1:
                raise AccountError("the last enabled admin cannot lose the admin role")
            conn.execute(update(_USER).where(u.id == user_id).values(role=role, updated_at=now))
        return UserRecord(user.id, user.name, role, user.disabled, user.created_at, now,
                          user.password_changed_at, user.last_login_at), user.role

    def set_disabled(self, user_id: int, disabled: bool, *, now: int) -> UserRecord:
        """Disable (sessions end at once) or enable a user; the last enabled admin stays enabled."""
        with self._write("disabling a user" if disabled else "enabling a user") as conn:
            user = self._require_user(conn, user_id)
            if disabled and user.role == Role.ADMIN and not user.disabled and self._enabled_admins(conn) <= 1:
                raise AccountError("the last enabled admin cannot be disabled")
            conn.execute(update(_USER).where(u.id == user_id).values(disabled=disabled, updated_at=now))
            if disabled:
                conn.execute(delete(_SESSION).where(s.user_id == user_id))
        return UserRecord(user.id, user.name, user.role, disabled, user.created_at, now,
                          user.password_changed_at, user.last_login_at)

    def set_password(self, user_id: int, password: str, *, now: int,
                     keep_session_sha256: str | None = None) -> UserRecord:
        """Set a new password; every session of the user ends (but ``keep_session_sha256``)."""
        digest = self.hasher.hash(check_password(password))
        with self._write("setting a password") as conn:
            user = self._require_user(conn, user_id)
            conn.execute(update(_USER).where(u.id == user_id).values(password_hash=digest, updated_at=now,
                                                                      password_changed_at=now))
            stmt = delete(_SESSION).where(s.user_id == user_id)
            if keep_session_sha256 is not None:
                stmt = stmt.where(s.id_sha256 != keep_session_sha256)
            conn.execute(stmt)
        return user

    def verify_password(self, user_id: int, password: str) -> bool:
        """True if ``password`` is the user's current password."""
        with self._read("reading a user") as conn:
            stored = conn.execute(select(u.password_hash).where(u.id == user_id)).scalar()
        return stored is not None and self._verify(stored, password)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return bool(self.hasher.verify(stored, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    # -- login -------------------------------------------------------------------------------------
    def throttle_states(self, keys: Sequence[str]) -> dict[str, ThrottleState]:
        with self._read("reading login throttling") as conn:
            rows = conn.execute(select(_THROTTLE).where(_THROTTLE.c.key.in_(list(keys)))).all()
        return {r.key: ThrottleState(r.failures, r.first_failure_at, r.locked_until) for r in rows}

    def login(self, name: str, password: str, *, ip: str, user_agent: str, now: int) -> LoginResult:
        """Check the password with throttling; on success open a session (a fresh id every time: no
        session fixation)."""
        cfg = self.settings
        keys = {f"user:{name.lower()[:140]}": cfg.login_max_failures,
                f"ip:{ip[:64]}": cfg.login_max_failures_ip}
        states = self.throttle_states(list(keys))
        if any(is_locked(states.get(k), now) for k in keys):
            return LoginResult(False, locked=True, reason="locked")
        with self._read("reading a user") as conn:
            row = conn.execute(select(*_USER_COLUMNS, u.password_hash)
                               .where(func.lower(u.name) == name.lower())).first()
        if row is None or not NAME_RE.fullmatch(name):
            self._verify(self._dummy_hash, password)  # same work as for a real user
            user, stored, good = None, "", False
        else:
            user, stored = _user(row), str(row.password_hash)
            good = self._verify(stored, password) and not user.disabled
        if not good or user is None:
            locked = self._record_failure(keys, states, now)
            return LoginResult(False, user=user, locked=locked,
                               reason="disabled" if user is not None and user.disabled else "bad credentials")
        new_hash = self.hasher.hash(password) if self.hasher.check_needs_rehash(stored) else None
        token = secrets.token_urlsafe(32)
        with self._write("opening a session") as conn:
            conn.execute(delete(_THROTTLE).where(_THROTTLE.c.key == f"user:{name.lower()[:140]}"))
            # Housekeeping on the side: expired sessions and stale throttle rows.
            conn.execute(delete(_SESSION).where(s.expires_at < now))
            conn.execute(delete(_SESSION).where(s.last_seen_at < now - cfg.session_idle_ms))
            stale = now - cfg.login_window_ms - cfg.lockout_ms
            conn.execute(delete(_THROTTLE).where(_THROTTLE.c.updated_at < stale))
            conn.execute(insert(_SESSION).values(
                id_sha256=sha256_hex(token), user_id=user.id, created_at=now, last_seen_at=now,
                expires_at=now + cfg.session_max_ms, ip=ip[:64], user_agent=user_agent[:256]))
            values: dict[str, object] = {"last_login_at": now}
            if new_hash is not None:
                values["password_hash"] = new_hash
            conn.execute(update(_USER).where(u.id == user.id).values(**values))
        return LoginResult(True, user=user, session_token=token)

    def _record_failure(self, keys: dict[str, int], states: dict[str, ThrottleState], now: int) -> bool:
        cfg = self.settings
        locked = False
        with self._write("recording a failed login") as conn:
            for key, limit in keys.items():
                row = conn.execute(select(_THROTTLE).where(_THROTTLE.c.key == key).with_for_update()).first()
                old = (None if row is None
                       else ThrottleState(row.failures, row.first_failure_at, row.locked_until))
                new = after_failure(old, now, max_failures=limit, window_ms=cfg.login_window_ms,
                                    lockout_ms=cfg.lockout_ms)
                locked |= is_locked(new, now)
                values = {"failures": new.failures, "first_failure_at": new.first_failure_at,
                          "locked_until": new.locked_until, "updated_at": now}
                if row is None:
                    conn.execute(insert(_THROTTLE).values(key=key, **values))
                else:
                    conn.execute(update(_THROTTLE).where(_THROTTLE.c.key == key).values(**values))
        return locked

    def unlock(self, name: str) -> bool:
        """Clear the lockout of a user name; True if there was one."""
        with self._write("clearing a lockout") as conn:
            result = conn.execute(delete(_THROTTLE).where(_THROTTLE.c.key == f"user:{name.lower()[:140]}"))
        return bool(result.rowcount)

    # -- sessions ----------------------------------------------------------------------------------
    def session_principal(self, token: str, *, now: int) -> Principal | None:
        """The user of a live session (not expired, not idle too long, user enabled), else None."""
        if not token or len(token) > 128:
            return None
        digest = sha256_hex(token)
        idle = self.settings.session_idle_ms
        with self._read("reading a session") as conn:
            row = conn.execute(
                select(s.last_seen_at, s.expires_at, u.id, u.name, u.role, u.disabled)
                .select_from(_SESSION.join(_USER, u.id == s.user_id)).where(s.id_sha256 == digest)).first()
        if row is None or row.disabled or now >= row.expires_at or now - row.last_seen_at >= idle:
            return None
        if now - row.last_seen_at >= TOUCH_EVERY_MS:
            with self._write("touching a session") as conn:
                conn.execute(update(_SESSION).where(s.id_sha256 == digest).values(last_seen_at=now))
        return Principal("user", int(row.id), row.name, row.role, digest)

    def end_session(self, token_or_digest: str, *, hashed: bool = False) -> None:
        digest = token_or_digest if hashed else sha256_hex(token_or_digest)
        with self._write("closing a session") as conn:
            conn.execute(delete(_SESSION).where(s.id_sha256 == digest))

    def session_count(self, user_id: int) -> int:
        with self._read("counting sessions") as conn:
            return int(conn.execute(select(func.count()).select_from(_SESSION)
                                    .where(s.user_id == user_id)).scalar_one())

    # -- API tokens --------------------------------------------------------------------------------
    def create_token(self, name: str, role: str, *, created_by: str, now: int,
                     expires_at: int | None = None) -> tuple[TokenRecord, str]:
        """Create a token; returns it with its secret (shown once, never stored)."""
        check_name(name)
        check_role(role)
        secret = generate_token()
        prefix = secret[:10]
        with self._write("creating an API token") as conn:
            if conn.execute(select(t.id).where(t.name == name)).first() is not None:
                raise AccountError(f"a token named {name!r} already exists")
            new_id = conn.execute(insert(_TOKEN).values(
                name=name, role=role, token_sha256=sha256_hex(secret), prefix=prefix, created_at=now,
                created_by=created_by[:96], expires_at=expires_at).returning(t.id)).scalar_one()
        record = TokenRecord(int(new_id), name, role, prefix, now, created_by[:96], expires_at, None, None)
        return record, secret

    def tokens(self) -> list[TokenRecord]:
        with self._read("listing API tokens") as conn:
            return [_token(r) for r in conn.execute(select(*_TOKEN_COLUMNS).order_by(t.name))]

    def revoke_token(self, token_id: int, *, now: int) -> TokenRecord:
        with self._write("revoking an API token") as conn:
            row = conn.execute(select(*_TOKEN_COLUMNS).where(t.id == token_id).with_for_update()).first()
            if row is None:
                raise AccountError(f"no API token with id {token_id}")
            record = _token(row)
            if record.revoked_at is not None:
                raise AccountError(f"API token {record.name} is already revoked")
            conn.execute(update(_TOKEN).where(t.id == token_id).values(revoked_at=now))
        return TokenRecord(record.id, record.name, record.role, record.prefix, record.created_at,
                           record.created_by, record.expires_at, record.last_used_at, now)

    def token_principal(self, secret: str, *, now: int) -> Principal | None:
        """The principal of a live API token, else None."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
            return None
        digest = sha256_hex(secret)
        with self._read("reading an API token") as conn:
            row = conn.execute(select(*_TOKEN_COLUMNS, t.token_sha256)
                               .where(t.token_sha256 == digest)).first()
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            return None
        record = _token(row)
        if not record.active(now):
            return None
        if record.last_used_at is None or now - record.last_used_at >= TOUCH_EVERY_MS:
            with self._write("touching an API token") as conn:
                conn.execute(update(_TOKEN).where(t.id == record.id).values(last_used_at=now))
        return Principal("token", record.id, record.name, record.role)
