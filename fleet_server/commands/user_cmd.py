"""``fleet-server user ...``: console users and their roles.

* ``user add NAME --role ROLE [--password-stdin]`` - without ``--password-stdin`` a password is
  generated and printed once
* ``user list [--json]``
* ``user set-role NAME ROLE``
* ``user disable NAME`` / ``user enable NAME`` (disabling ends the user's sessions)
* ``user reset-password NAME [--password-stdin]`` (every session of the user ends)
* ``user unlock NAME`` - clear a login lockout

Roles: data_scientist, ml_engineer, security, production_system, admin (docs/operations.md). Every
change is written to the audit log with the actor ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fleet_server.console.accounts import AccountError, Accounts, UserRecord, generate_password
from fleet_server.console.audit import record_cli
from fleet_server.console.rbac import Role
from fleet_server.service.cliutil import (
    add_config_argument,
    emit,
    emit_json,
    iso,
    load,
    now_ms,
    repository,
    table,
)

ROLES = [r.value for r in Role]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("user", help="console users and roles",
                                   description="Add, list and change console users.")
    sub = parser.add_subparsers(dest="user_command", metavar="SUBCOMMAND", required=True)

    add = sub.add_parser("add", help="add a user (prints a generated password once)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_config_argument(add)
    add.set_defaults(handler=_add)

    ls = sub.add_parser("list", help="list users")
    ls.add_argument("--json", action="store_true")
    add_config_argument(ls)
    ls.set_defaults(handler=_list)

    role = sub.add_parser("set-role", help="change a user's role")
    role.add_argument("name", metavar="NAME")
    role.add_argument("role", metavar="ROLE", choices=ROLES)
    add_config_argument(role)
    role.set_defaults(handler=_set_role)

    for name, helptext in (("disable", "disable a user (ends their sessions)"), ("enable", "enable a user")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("name", metavar="NAME")
        add_config_argument(p)
        p.set_defaults(handler=_set_disabled, disabled=name == "disable")

    reset = sub.add_parser("reset-password", help="set a new password (generated unless --password-stdin)")
    reset.add_argument("name", metavar="NAME")
    reset.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_config_argument(reset)
    reset.set_defaults(handler=_reset)

    unlock = sub.add_parser("unlock", help="clear a login lockout")
    unlock.add_argument("name", metavar="NAME")
    add_config_argument(unlock)
    unlock.set_defaults(handler=_unlock)


def _password(args: argparse.Namespace) -> tuple[str, bool]:
    """(password, generated)."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n"), False
    return generate_password(), True


def _user(accounts: Accounts, name: str) -> UserRecord:
    user = accounts.user(name=name)
    if user is None:
        raise AccountError(f"no user named {name!r}")
    return user


def _add(args: argparse.Namespace) -> int:
    config = load(args)
    password, generated = _password(args)
    with repository(config) as repo:
        accounts = Accounts(repo.engine, config.console)
        user = accounts.add_user(args.name, args.role, password, now=now_ms())
        record_cli(repo.engine, "user.add", f"user:{user.name}", {"role": user.role}, now=now_ms())
    lines = [f"user {user.name} added with role {user.role}"]
    if generated:
        lines.append(f"password: {password}")
        lines.append("(shown once; the user can change it under 'your account' after logging in)")
    return emit(lines)


def _list(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        users = Accounts(repo.engine, config.console).users()
    if args.json:
        return emit_json([{"id": u.id, "name": u.name, "role": u.role, "disabled": u.disabled,
                           "created_at": u.created_at, "last_login_at": u.last_login_at} for u in users])
    if not users:
        return emit(["no users (add one with `fleet-server user add NAME --role admin`)"])
    rows = [[u.name, u.role, "disabled" if u.disabled else "enabled", iso(u.last_login_at), iso(u.created_at)]
            for u in users]
    return emit(table(["NAME", "ROLE", "STATUS", "LAST LOGIN", "CREATED"], rows))


def _set_role(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        accounts = Accounts(repo.engine, config.console)
        user, before = accounts.set_role(_user(accounts, args.name).id, args.role, now=now_ms())
        record_cli(repo.engine, "user.set_role", f"user:{user.name}", {"from": before, "to": user.role},
                   now=now_ms())
    return emit([f"user {user.name}: role {before} -> {user.role}"])


def _set_disabled(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        accounts = Accounts(repo.engine, config.console)
        user = accounts.set_disabled(_user(accounts, args.name).id, args.disabled, now=now_ms())
        action = "user.disable" if args.disabled else "user.enable"
        record_cli(repo.engine, action, f"user:{user.name}", now=now_ms())
    return emit([f"user {user.name} {'disabled (sessions ended)' if args.disabled else 'enabled'}"])


def _reset(args: argparse.Namespace) -> int:
    config = load(args)
    password, generated = _password(args)
    with repository(config) as repo:
        accounts = Accounts(repo.engine, config.console)
        user = accounts.set_password(_user(accounts, args.name).id, password, now=now_ms())
        record_cli(repo.engine, "user.reset_password", f"user:{user.name}", now=now_ms())
    lines = [f"user {user.name}: password set; sessions ended"]
    if generated:
        lines += [f"password: {password}", "(shown once)"]
    return emit(lines)


def _unlock(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        accounts = Accounts(repo.engine, config.console)
        user = _user(accounts, args.name)
        cleared = accounts.unlock(user.name)
        record_cli(repo.engine, "user.unlock", f"user:{user.name}", {"was_locked": cleared}, now=now_ms())
    return emit([f"user {user.name}: " + ("lockout cleared" if cleared else "was not locked")])
