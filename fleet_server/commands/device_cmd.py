"""``fleet-server device ...``: list, inspect and administer devices.

* ``device list [--state S] [--json]``
* ``device show ID [--json]`` - state, reasons, schedule, boot state, state history, recent results
* ``device approve ID`` - admit a pending device (its certificate is sent by a running worker), or
  re-admit a revoked, quarantined or untrusted one (it is challenged at once; trusted only by good
  evidence)
* ``device revoke ID [--reason TEXT]`` - no more challenges; a signed revocation is sent
* ``device quarantine ID [--reason TEXT]`` - attested but never trusted until lifted
* ``device unquarantine ID`` - lift a quarantine: back to ``enrolled``, challenged at once
* ``device tag ID TAG [TAG ...]``, ``device untag ID TAG [TAG ...]`` - the device's tags (rollout
  target groups select devices by tag; ``device show`` lists them)
* ``device preregister EKCERT_FILE [--device-class C] [--note TEXT]`` - a device proving this EK is
  admitted without approval

Messages caused by a command go to the outbox, which running workers publish. Every administrative
command is written to the audit log (``fleet-server audit list``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fleet_server import pki
from fleet_server.console.audit import record_cli
from fleet_server.keys import load_signing_key
from fleet_server.service import admin, rollouts
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
from fleet_server.service.context import load_trust_bundle_file
from fleet_server.service.crl import refresh_crl, write_crl
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import DeviceRecord, Repository
from protocol.errors import ConfigError
from protocol.topics import validate_device_id


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("device", help="list and administer devices",
                                   description="List, inspect, approve, revoke and quarantine devices.")
    sub = parser.add_subparsers(dest="device_command", metavar="SUBCOMMAND", required=True)

    ls = sub.add_parser("list", help="list devices")
    ls.add_argument("--state", choices=[s.value for s in DeviceState], help="only devices in this state")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(ls)
    ls.set_defaults(handler=_list)

    show = sub.add_parser("show", help="show one device with its state history")
    show.add_argument("device_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--history", type=int, default=20, metavar="N", help="state changes to show (20)")
    add_config_argument(show)
    show.set_defaults(handler=_show)

    approve = sub.add_parser("approve", help="admit a pending (or re-admit a revoked, quarantined or "
                                             "untrusted) device")
    approve.add_argument("device_id", metavar="ID")
    add_config_argument(approve)
    approve.set_defaults(handler=_approve)

    revoke = sub.add_parser("revoke", help="revoke a device")
    revoke.add_argument("device_id", metavar="ID")
    revoke.add_argument("--reason", default="", help="why (recorded and sent to the device)")
    add_config_argument(revoke)
    revoke.set_defaults(handler=_revoke)

    quarantine = sub.add_parser("quarantine", help="hold a device: attested but never trusted")
    quarantine.add_argument("device_id", metavar="ID")
    quarantine.add_argument("--reason", default="", help="why (recorded and sent to the device)")
    add_config_argument(quarantine)
    quarantine.set_defaults(handler=_quarantine)

    unquarantine = sub.add_parser("unquarantine", help="lift a quarantine (the device is attested again)",
                                  description="Move a quarantined device back to enrolled: it is "
                                              "challenged at once and trusted only by good evidence.")
    unquarantine.add_argument("device_id", metavar="ID")
    add_config_argument(unquarantine)
    unquarantine.set_defaults(handler=_unquarantine)

    crl = sub.add_parser("crl", help="write the CRL of revoked device certificates (for the broker)",
                         description="Sign the list of revoked devices' certificates with the fleet CA and "
                                     "write it where the broker's device listener reads it (crlfile); "
                                     "reload the broker (SIGHUP) afterwards. Run it at least every "
                                     "30 days: the CRL expires.")
    crl.add_argument("--out", type=Path, metavar="FILE", help="write here (default server.fleet_ca_crl)")
    add_config_argument(crl)
    crl.set_defaults(handler=_crl)

    for name, handler, what in (("tag", _tag, "add tags to a device"),
                                ("untag", _untag, "remove tags from a device")):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("device_id", metavar="ID")
        cmd.add_argument("tags", nargs="+", metavar="TAG")
        add_config_argument(cmd)
        cmd.set_defaults(handler=handler)
    prereg = sub.add_parser("preregister", help="pre-register an EK certificate for automatic admission")
    prereg.add_argument("ek_cert", type=Path, metavar="EKCERT_FILE", help="EK certificate (PEM or DER)")
    prereg.add_argument("--device-class", help="device class to record for devices with this EK")
    prereg.add_argument("--note", default="", help="free text (e.g. serial number)")
    add_config_argument(prereg)
    prereg.set_defaults(handler=_preregister)


def _audit(repo: Repository, action: str, result: admin.StateTransition, **details: object) -> None:
    """Write the audit entry of a device command (actor ``cli:<login name>``)."""
    record_cli(repo.engine, action, f"device:{result.device_id}",
               {"from": result.from_state, "to": result.to_state, "messages": result.messages, **details},
               now=now_ms())


def _device_json(d: DeviceRecord) -> dict[str, Any]:
    return {"id": d.id, "state": d.state, "device_class": d.device_class,
            "firmware_version": d.firmware_version, "ek_fingerprint": d.ek_fingerprint,
            "cert_serial": d.cert_serial, "created_at": d.created_at,
            "state_changed_at": d.state_changed_at, "state_reasons": list(d.state_reasons),
            "last_attestation_at": d.last_attestation_at, "last_verdict": d.last_verdict,
            "trusted_until": d.trusted_until, "next_attestation_at": d.next_attestation_at,
            "missed_challenges": d.missed_challenges, "boot_reset_count": d.boot_reset_count,
            "boot_restart_count": d.boot_restart_count, "tpm_clock": d.last_clock,
            "held_log_bytes": d.held_log_size, "policy_id": d.policy_id,
            "pcrs": json.loads(d.last_pcrs) if d.last_pcrs else None}


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def _list(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        devices = repo.devices(args.state)
    if args.json:
        return emit_json([_device_json(d) for d in devices])
    if not devices:
        return emit(["no devices" + (f" in state {args.state}" if args.state else "")])
    rows = [[d.id, d.state, d.device_class, d.firmware_version, d.last_verdict or "-",
             iso(d.last_attestation_at), iso(d.trusted_until)] for d in devices]
    headers = ["ID", "STATE", "CLASS", "FIRMWARE", "VERDICT", "LAST ATTESTATION", "TRUSTED UNTIL"]
    return emit(table(headers, rows))


def _show(args: argparse.Namespace) -> int:
    device_id = validate_device_id(args.device_id)
    config = load(args)
    with repository(config) as repo:
        device = repo.device(device_id)
        if device is None:
            raise admin.AdminError(f"no device {device_id!r}")
        history = repo.state_history(device_id, limit=max(1, args.history))
        results = repo.attestations(device_id, limit=10)
        policy = repo.policy(policy_id=device.policy_id) if device.policy_id is not None else None
        tags = repo.rollouts.tags(device_id)
    if args.json:
        doc = _device_json(device)
        doc["tags"] = tags
        doc["policy"] = policy.header.name if policy is not None else None
        doc["history"] = [{"at": h.at, "from": h.from_state, "to": h.to_state, "cause": h.cause}
                          for h in history]
        doc["attestations"] = [{"challenge_id": a.challenge_id, "stored_at": a.stored_at,
                                "verdict": a.verdict, "reasons": list(a.reasons), "latency_ms": a.latency_ms,
                                "evidence_sha256": a.evidence_sha256.hex()} for a in results]
        return emit_json(doc)
    lines = [
        f"device {device.id}",
        f"  state             {device.state} since {iso(device.state_changed_at)}",
        f"  class / firmware  {device.device_class} / {device.firmware_version}",
        f"  tags              {', '.join(tags) or '-'}",
        f"  EK fingerprint    {device.ek_fingerprint}",
        f"  certificate       {device.cert_serial or '-'}",
        f"  last verdict      {device.last_verdict or '-'} at {iso(device.last_attestation_at)}"
        + (f" (policy {policy.header.name})" if policy is not None else ""),
        f"  trusted until     {iso(device.trusted_until)}",
        f"  next attestation  {iso(device.next_attestation_at)}",
        f"  missed challenges {device.missed_challenges}",
        f"  TPM               resetCount {_opt(device.boot_reset_count)}, restartCount "
        f"{_opt(device.boot_restart_count)}, held log {device.held_log_size} bytes",
    ]
    if device.state_reasons:
        lines.append("  reasons:")
        lines += [f"    - {r}" for r in device.state_reasons]
    lines.append("  history (newest first):")
    lines += [f"    {iso(h.at)}  {h.from_state or '-'} -> {h.to_state}  {h.cause}" for h in history]
    if results:
        lines.append("  recent attestations:")
        for a in results:
            first = f"  ({a.reasons[0]})" if a.reasons else ""
            lines.append(f"    {iso(a.stored_at)}  {a.verdict}  {a.latency_ms} ms{first}")
    return emit(lines)


def _tag(args: argparse.Namespace) -> int:
    with repository(load(args)) as repo:
        added = rollouts.tag_device(repo, args.device_id, args.tags)
        record_cli(repo.engine, "device.tag", f"device:{args.device_id}", {"added": added}, now=now_ms())
        tags = repo.rollouts.tags(args.device_id)
    return emit([f"device {args.device_id}: tags {', '.join(tags) or '-'}"])


def _untag(args: argparse.Namespace) -> int:
    with repository(load(args)) as repo:
        removed = rollouts.untag_device(repo, args.device_id, args.tags)
        record_cli(repo.engine, "device.untag", f"device:{args.device_id}", {"removed": removed},
                   now=now_ms())
        tags = repo.rollouts.tags(args.device_id)
    return emit([f"device {args.device_id}: tags {', '.join(tags) or '-'}"])


def _approve(args: argparse.Namespace) -> int:
    device_id = validate_device_id(args.device_id)
    config = load(args)
    signer = load_signing_key(config.signing_key)
    ca = pki.load_ca_files(config.fleet_ca_cert, config.fleet_ca_key)
    with repository(config) as repo:
        result = admin.approve_device(repo, device_id, signer=signer, fleet_ca=ca, now=now_ms())
        _audit(repo, "device.approve", result)
        crl_line = refresh_crl(repo, config, now=now_ms() / 1000)
    cert = f", certificate serial {result.cert_serial}" if result.cert_serial else ""
    return emit([f"device {device_id}: {result.from_state} -> {result.to_state}{cert}; "
                 f"{result.messages} message(s) queued for the workers", crl_line])


def _revoke(args: argparse.Namespace) -> int:
    device_id = validate_device_id(args.device_id)
    config = load(args)
    signer = load_signing_key(config.signing_key)
    with repository(config) as repo:
        result = admin.revoke_device(repo, device_id, signer=signer, now=now_ms(), reason=args.reason)
        _audit(repo, "device.revoke", result, reason=args.reason)
        crl_line = refresh_crl(repo, config, now=now_ms() / 1000)
    return emit([f"device {device_id}: {result.from_state} -> {result.to_state}; signed revocation queued",
                 crl_line])


def _quarantine(args: argparse.Namespace) -> int:
    device_id = validate_device_id(args.device_id)
    config = load(args)
    signer = load_signing_key(config.signing_key)
    with repository(config) as repo:
        result = admin.quarantine_device(repo, device_id, signer=signer, now=now_ms(), reason=args.reason)
        _audit(repo, "device.quarantine", result, reason=args.reason)
    return emit([f"device {device_id}: {result.from_state} -> {result.to_state}; signed revocation queued"])


def _unquarantine(args: argparse.Namespace) -> int:
    device_id = validate_device_id(args.device_id)
    config = load(args)
    signer = load_signing_key(config.signing_key)
    ca = pki.load_ca_files(config.fleet_ca_cert, config.fleet_ca_key)
    with repository(config) as repo:
        result = admin.unquarantine_device(repo, device_id, signer=signer, fleet_ca=ca, now=now_ms())
        _audit(repo, "device.unquarantine", result)
    return emit([f"device {device_id}: {result.from_state} -> {result.to_state}; it is challenged now"])


def _crl(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        written = write_crl(repo, config, now=now_ms() / 1000, path=args.out)
        record_cli(repo.engine, "device.crl", f"crl:{written.path}", {"revoked": written.revoked},
                   now=now_ms())
    return emit([f"CRL {written.path}: {written.revoked} revoked certificate(s), valid "
                 f"{pki.CRL_VALIDITY.days} days; reload the broker (SIGHUP) to apply it"])


def _preregister(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        data = args.ek_cert.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.ek_cert}: {exc.strerror or exc}") from None
    bundle = load_trust_bundle_file(config.trust_bundle)
    with repository(config) as repo:
        result = admin.preregister_ek(repo, data, now=now_ms(), device_class=args.device_class,
                                      note=args.note, trust_bundle=bundle)
        record_cli(repo.engine, "device.preregister", f"ek:{result.fingerprint}",
                   {"subject": result.subject, "created": result.created, "device_class": args.device_class},
                   now=now_ms())
    what = "pre-registered" if result.created else "already pre-registered"
    check = "chain verified" if result.verified else "chain NOT verified: no trust bundle configured"
    return emit([f"EK {result.fingerprint} ({result.subject}) {what}; {check}"])
