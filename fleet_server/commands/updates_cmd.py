"""``fleet-server updates ...``: the TUF update repository (docs/updates.md).

* ``updates init [--keys N] [--threshold M]`` - keys for every role (0600, ``<updates>/keys/``), the
  first signed version of root, targets, firmware, models, snapshot and timestamp; audited
* ``updates status [--json]`` - version, expiry, keys and pending signatures of every role
* ``updates root --out FILE`` - the root metadata devices are provisioned with
* ``updates sign ROLE --key FILE...`` - sign ROLE's pending version with key files; audited
* ``updates sign ROLE --export FILE`` - write ROLE's pending version, to sign on another machine
* ``updates sign ROLE --metadata FILE --key FILE --out FILE`` - on that machine (no configuration
  needed): sign an exported version
* ``updates add-signature ROLE FILE`` - import what was signed elsewhere; at the threshold the version
  is published and snapshot/timestamp renewed; audited
* ``updates rotate ROLE`` - new keys for ROLE (root re-signed by the old and the new root keys); audited
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any

from fleet_server.config import ServerConfig
from fleet_server.console.audit import record_cli
from fleet_server.service.cliutil import add_config_argument, emit, emit_json, load, now_ms, repository, table
from fleet_server.updates.keys import load_key_file
from fleet_server.updates.repository import (
    ALL_ROLES,
    DEFAULT_KEYS,
    DEFAULT_THRESHOLD,
    SignOutcome,
    UpdateRepository,
    open_update_repository,
    sign_exported,
)
from protocol.errors import ConfigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("updates", help="the signed update repository (TUF)",
                                   description="Keys, threshold signing and status of the TUF update "
                                               "repository the fleet server serves (docs/updates.md).")
    sub = parser.add_subparsers(dest="updates_command", metavar="SUBCOMMAND", required=True)

    init = sub.add_parser("init", help="create the repository: keys and the first metadata of every role")
    init.add_argument("--keys", type=int, default=DEFAULT_KEYS, metavar="N",
                      help="keys of each offline role: root, targets, firmware, models "
                           f"(default {DEFAULT_KEYS})")
    init.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, metavar="M",
                      help=f"signatures an offline role needs (default {DEFAULT_THRESHOLD})")
    add_config_argument(init)
    init.set_defaults(handler=_init)

    st = sub.add_parser("status", help="versions, expiries and pending signatures of every role")
    st.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(st)
    st.set_defaults(handler=_status)

    root = sub.add_parser("root", help="write the root metadata devices are provisioned with")
    root.add_argument("--out", type=Path, required=True, metavar="FILE")
    add_config_argument(root)
    root.set_defaults(handler=_root)

    sign = sub.add_parser("sign", help="sign a role's pending version (or export it to sign elsewhere)",
                          description="Sign ROLE's pending version with key files (--key), or write it to "
                                      "a file (--export) to sign on another machine with --metadata "
                                      "FILE --key FILE --out FILE.")
    sign.add_argument("role", choices=ALL_ROLES, metavar="ROLE")
    sign.add_argument("--key", type=Path, action="append", default=[], metavar="FILE",
                      help="a private key file of the role (repeatable)")
    sign.add_argument("--export", type=Path, metavar="FILE", help="write the pending version here")
    sign.add_argument("--metadata", type=Path, metavar="FILE",
                      help="offline: the exported version to sign (with --key and --out)")
    sign.add_argument("--out", type=Path, metavar="FILE", help="offline: where to write the signed version")
    add_config_argument(sign)
    sign.set_defaults(handler=_sign)

    add = sub.add_parser("add-signature", help="import signatures of a role's pending version made elsewhere")
    add.add_argument("role", choices=ALL_ROLES, metavar="ROLE")
    add.add_argument("file", type=Path, metavar="FILE")
    add_config_argument(add)
    add.set_defaults(handler=_add_signature)

    rot = sub.add_parser("rotate", help="replace a role's keys")
    rot.add_argument("role", choices=ALL_ROLES, metavar="ROLE")
    add_config_argument(rot)
    rot.set_defaults(handler=_rotate)


def _iso(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _audit(config: ServerConfig, action: str, role: str, details: dict[str, Any]) -> None:
    with repository(config) as repo:
        record_cli(repo.engine, action, f"tuf-role:{role}", details, now=now_ms())


def _init(args: argparse.Namespace) -> int:
    config = load(args)
    repo = UpdateRepository.create(config.updates.dir, config.updates, clock=time.time, keys=args.keys,
                                   threshold=args.threshold)
    with repository(config) as db:
        record_cli(db.engine, "updates.init", f"updates:{config.updates.dir}",
                   {"keys": args.keys, "threshold": args.threshold}, now=now_ms())
    return emit([f"update repository created in {repo.folder}",
                 f"  keys           {repo.keys.root} (one folder per role, 0600)",
                 f"  offline roles  root, targets, firmware, models: {args.threshold} of {args.keys} keys; "
                 "move the key files off this server, leaving fewer than the threshold",
                 "  online roles   snapshot, timestamp: 1 key each, renewed by `fleet-server run`",
                 "  devices        are provisioned with `fleet-server updates root --out root.json`"])


def _status(args: argparse.Namespace) -> int:
    repo = open_update_repository(load(args), clock=time.time)
    roles = repo.status()
    if args.json:
        return emit_json({"roles": [r.to_json() for r in roles]})
    rows = [[r.role, str(r.version), _iso(r.expires), f"{r.threshold}/{r.keys}", str(r.local_keys),
             "-" if r.pending_version is None
             else f"v{r.pending_version} {r.pending_signatures}/{r.threshold}"] for r in roles]
    return emit(table(["ROLE", "VERSION", "EXPIRES", "THRESHOLD", "LOCAL KEYS", "PENDING"], rows))


def _root(args: argparse.Namespace) -> int:
    data = open_update_repository(load(args), clock=time.time).root_metadata()
    try:
        args.out.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    return emit([f"root metadata written to {args.out} ({len(data)} bytes)"])


def _outcome(result: SignOutcome) -> list[str]:
    line = f"{result.role} version {result.version}: {result.signatures} of {result.threshold} signatures"
    return [line + ("; published (snapshot and timestamp renewed)" if result.published
                    else "; not published yet")]


def _sign(args: argparse.Namespace) -> int:
    if args.metadata is not None:  # offline: no configuration, no repository
        if len(args.key) != 1 or args.out is None or args.export is not None:
            raise ConfigError("offline signing takes --metadata FILE, one --key FILE and --out FILE")
        try:
            data = args.metadata.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.metadata}: {exc.strerror or exc}") from None
        md, signed = sign_exported(data, args.key[0])
        try:
            args.out.write_bytes(signed)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.out}: {exc.strerror or exc}") from None
        targets = getattr(md.signed, "targets", None)
        lines = [f"signed {md.signed.type} version {md.signed.version} "
                 f"(expires {md.signed.expires:%Y-%m-%d}) -> {args.out}; import it with "
                 f"`fleet-server updates add-signature {args.role} FILE`"]
        if targets:
            lines += [f"  target {path}  sha256 {t.hashes.get('sha256', '?')}"
                      for path, t in sorted(targets.items())]
        return emit(lines)
    config = load(args)
    repo = open_update_repository(config, clock=time.time)
    if args.export is not None:
        if args.key:
            raise ConfigError("--export and --key exclude each other")
        data = repo.export(args.role)
        try:
            args.export.write_bytes(data)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.export}: {exc.strerror or exc}") from None
        return emit([f"{args.role}'s pending version written to {args.export}; sign it with "
                     f"`fleet-server updates sign {args.role} --metadata FILE --key KEY --out SIGNED`"])
    if not args.key:
        raise ConfigError("name the key files to sign with (--key FILE), or --export FILE")
    result = repo.sign(args.role, [load_key_file(path) for path in args.key])
    _audit(config, "updates.sign", args.role, {"version": result.version, "signatures": result.signatures,
                                               "published": result.published})
    return emit(_outcome(result))


def _add_signature(args: argparse.Namespace) -> int:
    config = load(args)
    repo = open_update_repository(config, clock=time.time)
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    result = repo.add_signatures(args.role, data)
    _audit(config, "updates.add_signature", args.role,
           {"version": result.version, "signatures": result.signatures, "published": result.published})
    return emit(_outcome(result))


def _rotate(args: argparse.Namespace) -> int:
    config = load(args)
    repo = open_update_repository(config, clock=time.time)
    published = repo.rotate(args.role)
    _audit(config, "updates.rotate", args.role, {"published": published})
    status = {r.role: r for r in repo.status()}
    lines = [f"{args.role}: new keys in {repo.keys.role_dir(args.role)}"]
    for role in ALL_ROLES:
        r = status[role]
        if r.pending_version is not None:
            lines.append(f"  {role} version {r.pending_version} waits for signatures "
                         f"({r.pending_signatures} of {r.threshold}): `fleet-server updates sign {role}`")
    if published:
        lines.append(f"  published: {', '.join(published)}")
    return emit(lines)

