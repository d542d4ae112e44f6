"""``fleet-server token ...``: API tokens (``Authorization: Bearer``) bound to a role.

* ``token create --name NAME --role ROLE [--days N]`` - prints the token once (only its SHA-256 is
  stored)
* ``token list [--json]``
* ``token revoke NAME``

Every change is written to the audit log with the actor ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
from typing import Any

from fleet_server.console.accounts import AccountError, Accounts
from fleet_server.console.audit import cli_actor, record_cli
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
from protocol.errors import ConfigError

DAY_MS = 86_400_000


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("token", help="API tokens",
                                   description="Create, list and revoke API tokens.")
    sub = parser.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)

    create = sub.add_parser("create", help="create a token (printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--days", type=int, default=0, help="expires after N days (default: never)")
    add_config_argument(create)
    create.set_defaults(handler=_create)

    ls = sub.add_parser("list", help="list tokens")
    ls.add_argument("--json", action="store_true")
    add_config_argument(ls)
    ls.set_defaults(handler=_list)

    revoke = sub.add_parser("revoke", help="revoke a token")
    revoke.add_argument("name", metavar="NAME")
    add_config_argument(revoke)
    revoke.set_defaults(handler=_revoke)


def _create(args: argparse.Namespace) -> int:
    if not 0 <= args.days <= 3650:
        raise ConfigError("--days: between 0 (never expires) and 3650")
    config = load(args)
    now = now_ms()
    with repository(config) as repo:
        record, secret = Accounts(repo.engine, config.console).create_token(
            args.name, args.role, created_by=cli_actor(), now=now,
            expires_at=now + args.days * DAY_MS if args.days else None)
        record_cli(repo.engine, "token.create", f"token:{record.name}",
                   {"role": record.role, "prefix": record.prefix, "expires_at": record.expires_at}, now=now)
    return emit([f"token {record.name} created with role {record.role}"
                 + (f", expires {iso(record.expires_at)}" if record.expires_at else ""),
                 f"token: {secret}", "(shown once; send it as 'Authorization: Bearer <token>')"])


def _list(args: argparse.Namespace) -> int:
    config = load(args)
    now = now_ms()
    with repository(config) as repo:
        tokens = Accounts(repo.engine, config.console).tokens()
    if args.json:
        return emit_json([{"id": t.id, "name": t.name, "role": t.role, "prefix": t.prefix,
                           "created_at": t.created_at, "created_by": t.created_by, "expires_at": t.expires_at,
                           "last_used_at": t.last_used_at, "revoked_at": t.revoked_at,
                           "active": t.active(now)}
                          for t in tokens])
    if not tokens:
        return emit(["no API tokens"])
    rows = [[t.name, t.role, t.prefix + "...", "active" if t.active(now) else ("revoked" if t.revoked_at else
                                                                              "expired"),
             iso(t.expires_at), iso(t.last_used_at)] for t in tokens]
    return emit(table(["NAME", "ROLE", "PREFIX", "STATUS", "EXPIRES", "LAST USED"], rows))


def _revoke(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        accounts = Accounts(repo.engine, config.console)
        found = next((t for t in accounts.tokens() if t.name == args.name), None)
        if found is None:
            raise AccountError(f"no API token named {args.name!r}")
        record = accounts.revoke_token(found.id, now=now_ms())
        record_cli(repo.engine, "token.revoke", f"token:{record.name}", now=now_ms())
    return emit([f"token {record.name} revoked"])
