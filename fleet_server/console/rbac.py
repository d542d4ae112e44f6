"""Roles, rights and their matrix; the decorators every console and API route declares its right with.

The matrix (:data:`MATRIX`) is the single source of who may do what. Rights on models follow the
product's role model (read, write, delete, deploy); fleet rights (approve, revoke, quarantine,
re-attest, edit policies) belong to Admin and Security; viewing the fleet belongs to every role.

Every view function carries its requirement as the attribute ``required_right``:

* :func:`require` (a :class:`Right`) - enforced on each request, for browser sessions and bearer
  tokens alike;
* :func:`login_required` (:data:`AUTHENTICATED`) - any logged-in principal (logout, own password);
* :func:`public` (:data:`PUBLIC`) - login page, static files, health check.

The application refuses (403) any request to a view without a declaration
(:func:`fleet_server.console.security.install`), and ``tests/test_console_rbac.py`` enumerates the URL
map, so a new route cannot skip the check. API routes (``/api/...``) use the same decorators; the
principal comes from ``Authorization: Bearer`` (API token) or the session cookie.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Role(StrEnum):
    """Roles of console users and API tokens."""

    DATA_SCIENTIST = "data_scientist"
    ML_ENGINEER = "ml_engineer"
    SECURITY = "security"
    PRODUCTION_SYSTEM = "production_system"
    ADMIN = "admin"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {Role.DATA_SCIENTIST: "Data Scientist", Role.ML_ENGINEER: "ML Engineer", Role.SECURITY: "Security",
           Role.PRODUCTION_SYSTEM: "Production System", Role.ADMIN: "Admin"}


class Right(StrEnum):
    """What a route requires."""

    # rights on models
    MODEL_READ = "model:read"
    MODEL_WRITE = "model:write"
    MODEL_DELETE = "model:delete"
    MODEL_DEPLOY = "model:deploy"
    # fleet rights
    APPROVE = "fleet:approve"
    REVOKE = "fleet:revoke"
    QUARANTINE = "fleet:quarantine"
    REATTEST = "fleet:reattest"
    EDIT_POLICIES = "fleet:edit_policies"
    DEPLOY = "fleet:deploy"  # assign firmware releases to devices
    VIEW_FLEET = "fleet:view"
    # administration
    MANAGE_ALERTS = "alerts:manage"
    VIEW_AUDIT = "audit:view"
    MANAGE_USERS = "users:manage"


DS, MLE, SEC, PROD, ADM = (Role.DATA_SCIENTIST, Role.ML_ENGINEER, Role.SECURITY, Role.PRODUCTION_SYSTEM,
                           Role.ADMIN)

# The matrix: right -> roles that hold it. One line per right; columns in the order
#                            Data Scientist, ML Engineer, Security, Production System, Admin
_GRANTS: dict[Right, tuple[Role, ...]] = {
    Right.MODEL_READ:        (DS, MLE, SEC, PROD, ADM),
    Right.MODEL_WRITE:       (DS, MLE, ADM),
    Right.MODEL_DELETE:      (MLE, ADM),
    Right.MODEL_DEPLOY:      (MLE, PROD, ADM),
    Right.APPROVE:           (SEC, ADM),
    Right.REVOKE:            (SEC, ADM),
    Right.QUARANTINE:        (SEC, ADM),
    Right.REATTEST:          (SEC, ADM),
    Right.EDIT_POLICIES:     (SEC, ADM),
    Right.DEPLOY:            (MLE, PROD, ADM),
    Right.VIEW_FLEET:        (DS, MLE, SEC, PROD, ADM),
    Right.MANAGE_ALERTS:     (SEC, ADM),
    Right.VIEW_AUDIT:        (SEC, ADM),
    Right.MANAGE_USERS:      (ADM,),
}

MATRIX: Mapping[Role, frozenset[Right]] = {
    role: frozenset(right for right, roles in _GRANTS.items() if role in roles) for role in Role
}
"""Role -> the rights it holds (derived from the table above)."""

if set(_GRANTS) != set(Right) or MATRIX[Role.ADMIN] != frozenset(Right):  # pragma: no cover
    raise RuntimeError("the rights matrix must have a line for every right, and Admin must hold all")


def has_right(role: str, right: Right) -> bool:
    """True if ``role`` (a :class:`Role` value) holds ``right``; unknown roles hold nothing."""
    try:
        return right in MATRIX[Role(role)]
    except ValueError:
        return False


class Requirement(StrEnum):
    """Requirements that are not rights."""

    PUBLIC = "public"
    AUTHENTICATED = "authenticated"


PUBLIC = Requirement.PUBLIC
AUTHENTICATED = Requirement.AUTHENTICATED
Declared = Right | Requirement


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is making the request: a console user (session) or an API token."""

    kind: str            # "user" | "token"
    id: int
    name: str
    role: str
    session_id_sha256: str | None = None

    @property
    def actor(self) -> str:
        """The name written to the audit log: the user name, or ``token:<name>``."""
        return self.name if self.kind == "user" else f"token:{self.name}"

    def can(self, right: Right) -> bool:
        return has_right(self.role, right)

    @property
    def role_label(self) -> str:
        try:
            return Role(self.role).label
        except ValueError:
            return self.role


def required_of(view: Callable[..., Any]) -> Declared | None:
    """The requirement a view function declared, or None."""
    value = getattr(view, "required_right", None)
    return value if isinstance(value, Right | Requirement) else None


def _declare(requirement: Declared, checker: Callable[[Declared], Any]) -> Callable[[F], F]:
    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            refusal = checker(requirement)
            if refusal is not None:
                return refusal
            return view(*args, **kwargs)

        wrapper.required_right = requirement  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def _check(requirement: Declared) -> Any:
    # Imported here: rbac stays importable (and its matrix testable) without an application.
    from fleet_server.console.auth import enforce

    return enforce(requirement)


def require(right: Right) -> Callable[[F], F]:
    """Declare and enforce that the view needs ``right`` (401 without a principal, 403 without the
    right)."""
    if not isinstance(right, Right):
        raise TypeError("require() takes a Right")
    return _declare(right, _check)


def login_required(view: F) -> F:
    """Declare and enforce that the view needs a logged-in principal of any role."""
    return _declare(AUTHENTICATED, _check)(view)


def public(view: F) -> F:
    """Declare that the view needs nothing (login page, static files, health check)."""
    view.required_right = PUBLIC  # type: ignore[attr-defined]
    return view
