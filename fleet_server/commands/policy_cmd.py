"""``fleet-server policy ...``: reference values of device classes and firmware versions.

* ``policy from-eventlog LOG --name NAME [--device-class C] [--firmware-version V] [--bank B]
  [--pcrs 0,1,...] [--replace] [--json]`` - build a policy from the event log of a known-good device
  and store it as the active policy of its class and firmware version. Without
  ``--firmware-version`` the version is taken from the log's EV_S_CRTM_VERSION event (its last word,
  e.g. ``1.2.0`` of "EdgeSim Firmware 1.2.0"). Without ``--device-class`` the policy applies to every
  device class with that firmware version (stored with the reserved class ``any``; a policy for the
  exact class takes precedence).
* ``policy list [--json]``, ``policy show NAME [--json]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleet_server.appraisal.policy import (
    DEFAULT_BANK,
    ReferencePolicy,
    event_description,
    policy_from_eventlog,
)
from fleet_server.commands.eventlog_cmd import read_log_file
from fleet_server.console.audit import record_cli
from fleet_server.service import admin
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
from fleet_server.service.policies import ANY_CLASS
from fleet_server.verifier.eventlog import EventLog, parse_eventlog
from protocol.errors import ConfigError
from protocol.messages import NAME_RE
from protocol.tpm.constants import EventType

MAX_POLICY_LOG = 4 * 1024 * 1024


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("policy", help="reference values (policies)",
                                   description="Create and inspect reference policies.")
    sub = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)

    make = sub.add_parser("from-eventlog", help="create a policy from a known-good device's event log",
                          description="Build reference values from the TCG event log of a known-good "
                                      "device and store them as the active policy of its device class "
                                      "and firmware version.")
    make.add_argument("log", type=Path, metavar="LOG", help="binary TCG event log")
    make.add_argument("--name", required=True, help="policy name")
    make.add_argument("--device-class", default=ANY_CLASS,
                      help="device class the policy applies to (default: any class with this firmware)")
    make.add_argument("--firmware-version",
                      help="firmware version (default: from the log's EV_S_CRTM_VERSION event)")
    make.add_argument("--bank", default=DEFAULT_BANK, help=f"PCR bank (default {DEFAULT_BANK})")
    make.add_argument("--pcrs", help="comma-separated PCRs to select (default: every PCR the log extends)")
    make.add_argument("--replace", action="store_true", help="replace a policy of the same name")
    make.add_argument("--json", action="store_true", help="print the stored policy as JSON")
    add_config_argument(make)
    make.set_defaults(handler=_from_eventlog)

    ls = sub.add_parser("list", help="list policies")
    ls.add_argument("--json", action="store_true")
    add_config_argument(ls)
    ls.set_defaults(handler=_list)

    show = sub.add_parser("show", help="show one policy")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print the policy's JSON form")
    add_config_argument(show)
    show.set_defaults(handler=_show)


def _pcr_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--pcrs: expected comma-separated PCR numbers, not {text[:40]!r}") from None
    if not values or not all(0 <= v < 24 for v in values):
        raise ConfigError("--pcrs: PCR numbers are 0-23")
    return values


def firmware_version_from_log(log: EventLog) -> str | None:
    """The last word of the first EV_S_CRTM_VERSION event's text, if it is a valid version name."""
    for event in log.events:
        if event.type == int(EventType.EV_S_CRTM_VERSION):
            words = event_description(event).split()
            if words and NAME_RE.fullmatch(words[-1]):
                return words[-1]
            return None
    return None


def _from_eventlog(args: argparse.Namespace) -> int:
    config = load(args)
    for label, value in (("--name", args.name), ("--device-class", args.device_class)):
        if not NAME_RE.fullmatch(value):
            raise ConfigError(f"{label}: letters, digits, '.', '_', '+', '-' (at most 64)")
    log = parse_eventlog(read_log_file(str(args.log), MAX_POLICY_LOG))
    firmware = args.firmware_version or firmware_version_from_log(log)
    if firmware is None:
        raise ConfigError("the event log names no firmware version (no EV_S_CRTM_VERSION event): "
                          "give --firmware-version")
    policy = policy_from_eventlog(log, name=args.name, device_class=args.device_class,
                                  firmware_version=firmware, bank=args.bank, pcrs=_pcr_list(args.pcrs))
    with repository(config) as repo:
        stored = admin.store_policy(repo, policy, now=now_ms(), replace=args.replace)
        record_cli(repo.engine, "policy.create", f"policy:{stored.name}",
                   {"id": stored.id, "sha256": stored.sha256, "device_class": policy.device_class,
                    "firmware_version": policy.firmware_version, "replace": args.replace}, now=now_ms())
    if args.json:
        return emit_json(policy.to_json())
    return emit(_summary(policy, stored.sha256, f"stored policy {policy.name} (id {stored.id}), now active"))


def _selection_text(selection: Mapping[str, Sequence[int]]) -> str:
    return "; ".join(f"{b}: {','.join(map(str, p))}" for b, p in selection.items())


def _summary(policy: ReferencePolicy, digest: str, title: str) -> list[str]:
    lines = [title,
             f"  device class      {policy.device_class}",
             f"  firmware version  {policy.firmware_version}",
             f"  bank              {policy.bank}",
             "  selection         " + _selection_text(policy.selection),
             f"  reference events  {len(policy.events)}",
             f"  sha256            {digest}"]
    for bank, values in policy.pcrs.items():
        lines += [f"  {bank} PCR {pcr:<2}      {value.hex()}" for pcr, value in values.items()]
    return lines


def _list(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        headers = repo.policies()
    if args.json:
        return emit_json([{"id": h.id, "name": h.name, "device_class": h.device_class,
                           "firmware_version": h.firmware_version, "active": h.active,
                           "sha256": h.reference_sha256, "created_at": h.created_at,
                           "selection": {b: list(p) for b, p in h.selection.items()}}
                          for h in headers])
    if not headers:
        return emit(["no policies"])
    rows = [[h.name, h.device_class, h.firmware_version, "yes" if h.active else "no",
             _selection_text(h.selection), iso(h.created_at)]
            for h in headers]
    return emit(table(["NAME", "CLASS", "FIRMWARE", "ACTIVE", "SELECTION", "CREATED"], rows))


def _show(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        record = repo.policy(name=args.name)
    if record is None:
        raise admin.AdminError(f"no policy named {args.name!r}")
    policy = ReferencePolicy.from_json(json.loads(record.reference))
    if args.json:
        return emit_json(policy.to_json())
    state = "active" if record.header.active else "inactive"
    title = f"policy {policy.name} ({state}, id {record.header.id})"
    lines = _summary(policy, record.header.reference_sha256, title)
    lines.append("  reference events:")
    lines += [f"    PCR {e.pcr:<2} {e.type_name:<34} {e.description}" for e in policy.events]
    return emit(lines)
