"""``fleet-server release ...``: firmware releases and their assignment to devices.

* ``release add BUNDLE_DIR --class C --version V [--json]`` - pack the bundle folder (``release.json``,
  ``reference-values.json``, ``images/``; ``firmware-sim release build`` writes one) into one ``.fwb``
  file, add it as the target ``firmware/C/V.fwb`` of the update repository's ``firmware`` role with
  the class, version and reference values in its signed custom metadata, and store the release.
  ``--json`` prints ``{"target": "firmware/C/V.fwb", ...}``.
* ``release list [--json]``, ``release show TARGET [--json]`` (with its assignments).
* ``release withdraw TARGET`` - remove the target from the repository; no new assignments.
* ``release assign TARGET --device ID [--device ID ...] [--deadline-s S] [--grace-s S] [--json]`` -
  send each device a signed UpdateAssignment (through the outbox). The release's reference values
  are accepted for a device from now until the deadline, and for good once it commits; what it ran
  before stays acceptable until the commit plus the grace.

The update repository is reached through :data:`target_store_factory` (the python-tuf repository of
``fleet-server updates``; tests install an in-memory one).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet_server.config import ServerConfig
from fleet_server.console.audit import cli_actor, record_cli
from fleet_server.keys import load_signing_key
from fleet_server.service import releases
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
from fleet_server.storage.release_repo import ReleaseRecord
from fleet_server.updates.repository import open_update_repository
from fleet_server.updates.targets import TargetStore

TargetStoreFactory = Callable[[ServerConfig], TargetStore]


def _update_repository(config: ServerConfig) -> TargetStore:
    return open_update_repository(config, clock=time.time)  # UpdatesError names `updates init`


target_store_factory: TargetStoreFactory = _update_repository
"""Opens the update repository of a configuration (tests may install an in-memory one)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("release", help="firmware releases",
                                   description="Publish firmware releases and assign them to devices.")
    sub = parser.add_subparsers(dest="release_command", metavar="SUBCOMMAND", required=True)

    add = sub.add_parser("add", help="publish a firmware bundle folder as a release")
    add.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    add.add_argument("--class", dest="device_class", required=True, help="hardware class of the release")
    add.add_argument("--version", required=True, help="release version (MAJOR.MINOR.PATCH)")
    add.add_argument("--json", action="store_true", help='print {"target": ..., ...}')
    add_config_argument(add)
    add.set_defaults(handler=_add)

    ls = sub.add_parser("list", help="list releases")
    ls.add_argument("--json", action="store_true")
    add_config_argument(ls)
    ls.set_defaults(handler=_list)

    show = sub.add_parser("show", help="show one release and its assignments")
    show.add_argument("target", metavar="TARGET")
    show.add_argument("--json", action="store_true")
    add_config_argument(show)
    show.set_defaults(handler=_show)

    withdraw = sub.add_parser("withdraw", help="withdraw a release (no new assignments)")
    withdraw.add_argument("target", metavar="TARGET")
    withdraw.add_argument("--json", action="store_true")
    add_config_argument(withdraw)
    withdraw.set_defaults(handler=_withdraw)

    assign = sub.add_parser("assign", help="assign a release to devices")
    assign.add_argument("target", metavar="TARGET")
    assign.add_argument("--device", dest="devices", action="append", required=True, metavar="ID",
                        help="device id (repeat for several)")
    assign.add_argument("--deadline-s", type=float, default=releases.DEFAULT_DEADLINE_S,
                        help=f"seconds the device has to commit (default {releases.DEFAULT_DEADLINE_S:.0f})")
    assign.add_argument("--grace-s", type=float, default=releases.DEFAULT_GRACE_S,
                        help="seconds the previous reference values stay acceptable after the commit "
                             f"(default {releases.DEFAULT_GRACE_S:.0f})")
    assign.add_argument("--json", action="store_true")
    add_config_argument(assign)
    assign.set_defaults(handler=_assign)


def _add(args: argparse.Namespace) -> int:
    config = load(args)
    store = target_store_factory(config)
    with repository(config) as repo:
        rec = releases.add_release(repo, store, args.bundle, device_class=args.device_class,
                                   version=args.version, now=now_ms(), actor=cli_actor())
        record_cli(repo.engine, "release.add", f"release:{rec.target}",
                   {"device_class": rec.device_class, "version": rec.version,
                    "bundle_sha256": rec.bundle_sha256.hex(), "bundle_length": rec.bundle_length},
                   now=now_ms())
    if args.json:
        return emit_json(releases.release_json(rec))
    return emit([f"release {rec.target} added ({rec.bundle_length} bytes, sha256 {rec.bundle_sha256.hex()})"])


def _list(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        found = repo.releases.releases()
    if args.json:
        return emit_json([releases.release_json(r) for r in found])
    if not found:
        return emit(["no releases"])
    return emit(table(["TARGET", "CLASS", "VERSION", "STATE", "CREATED"],
                      [[r.target, r.device_class, r.version, r.state, iso(r.created_at)] for r in found]))


def _find(repo: Any, target: str) -> ReleaseRecord:
    rec: ReleaseRecord | None = repo.releases.release(target)
    if rec is None:
        raise releases.ReleaseError(f"no release {target[:200]!r}")
    return rec


def _show(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        rec = _find(repo, args.target)
        assignments = repo.releases.assignments(release_id=rec.id)
    if args.json:
        return emit_json({**releases.release_json(rec),
                          "assignments": [releases.assignment_json(a) for a in assignments]})
    lines = [f"release {rec.target} ({rec.state})",
             f"  class      {rec.device_class}",
             f"  version    {rec.version}",
             f"  bundle     {rec.bundle_length} bytes, sha256 {rec.bundle_sha256.hex()}",
             f"  reference  sha256 {rec.reference_sha256}",
             f"  created    {iso(rec.created_at)} by {rec.created_by}"]
    if assignments:
        lines += table(["DEVICE", "STATE", "REASON", "DEADLINE", "ASSIGNMENT"],
                       [[a.device_id, a.state, a.reason or "-", iso(a.deadline), a.id] for a in assignments])
    return emit(lines)


def _withdraw(args: argparse.Namespace) -> int:
    config = load(args)
    store = target_store_factory(config)
    with repository(config) as repo:
        rec = releases.withdraw_release(repo, store, args.target, now=now_ms())
        record_cli(repo.engine, "release.withdraw", f"release:{rec.target}", {}, now=now_ms())
    if args.json:
        return emit_json(releases.release_json(rec))
    return emit([f"release {rec.target} withdrawn"])


def _assign(args: argparse.Namespace) -> int:
    config = load(args)
    signer = load_signing_key(config.signing_key)
    with repository(config) as repo:
        done = releases.assign_release(repo, args.target, args.devices, signer=signer, now=now_ms(),
                                       deadline_s=args.deadline_s, grace_s=args.grace_s, actor=cli_actor())
        record_cli(repo.engine, "release.assign", f"release:{args.target}",
                   {"devices": [a.device_id for a in done], "deadline": done[0].deadline,
                    "assignments": [a.assignment_id for a in done]}, now=now_ms())
    if args.json:
        return emit_json({"target": args.target, "assignments": [
            {"assignment_id": a.assignment_id, "device_id": a.device_id, "deadline": a.deadline}
            for a in done]})
    return emit([f"release {args.target} assigned to {a.device_id} (assignment {a.assignment_id}, commit by "
                 f"{iso(a.deadline)}); the workers send it" for a in done])
