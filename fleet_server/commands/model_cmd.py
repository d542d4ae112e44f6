"""``fleet-server model ...``: publish encrypted models, entitle devices, set usage policies.

* ``model publish FILE.onnx --name NAME --version V [--policy FILE.toml] [--chunk-size BYTES]`` -
  validate the ONNX model, encrypt it under a fresh data key into a signed package
  (``<models.store_dir>/NAME/V.pkg``), seal the data key under the KEK; V must be newer than every
  published version of NAME. Publishing is not deploying: devices get the version only after
  ``model deploy`` (``--deploy`` does both; the CLI operator holds ``model:deploy``)
* ``model deploy NAME VERSION`` - entitled devices are offered VERSION with their next trusted
  attestation (until then they keep the previously deployed version, or nothing); audited
* ``model list [--json]``, ``model show NAME [--json]`` - versions, entitlements, leases, usage
* ``model entitle NAME (--device-class C | --device ID)``
* ``model revoke-entitlement NAME (--device-class C | --device ID)`` - devices no longer entitled
  lose their leases and get a signed ``key-denied`` (through the outbox)
* ``model policy NAME [--version V] [--set KEY=VALUE]...`` - show or change a version's usage policy
  (keys: output_mode, k, decimals, labels, max_batch, client_rate, client_burst, client_daily_quota,
  device_daily_quota, lease_quota, block_on_alarm; quotas take ``none`` for unlimited)

See docs/model-protection.md, "Server side".
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

from fleet_server.console.audit import cli_actor, record_cli
from fleet_server.keys import load_model_signing_key, load_signing_key
from fleet_server.modelstore import admin
from fleet_server.modelstore.kek import KEK_ENV, load_kek
from fleet_server.modelstore.policy import FIELDS, policy_from_text, policy_from_toml
from fleet_server.modelstore.store import PackageStore, publish_model, read_model_file
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
from fleet_server.storage.model_repo import VersionRecord
from fleet_server.storage.repo import Repository
from fleet_server.updates.repository import initialised_update_repository
from protocol.errors import ConfigError
from protocol.messages import ModelPolicy


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("model", help="publish protected models, entitlements, usage policies",
                                   description="Publish encrypted model packages and decide which devices "
                                               "may receive their keys, under which usage policy.")
    sub = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    pub = sub.add_parser("publish", help="encrypt and sign an ONNX model as a new version",
                         description="Validate an ONNX model, encrypt it under a fresh data key into a "
                                     "signed package and store it; the data key is kept sealed under the "
                                     "KEK.")
    pub.add_argument("model_file", type=Path, metavar="FILE.onnx")
    pub.add_argument("--name", required=True, help="model name (lowercase letters, digits, . _ -)")
    pub.add_argument("--version", required=True, help="MAJOR.MINOR.PATCH, newer than every published one")
    pub.add_argument("--policy", type=Path, metavar="FILE.toml",
                     help="usage policy (default: the newest version's, else the defaults)")
    pub.add_argument("--chunk-size", type=int, default=1 << 20, metavar="BYTES",
                     help="encryption chunk size (default 1 MiB)")
    pub.add_argument("--deploy", action="store_true",
                     help="deploy the version at once (otherwise devices keep the deployed version)")
    pub.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(pub)
    pub.set_defaults(handler=_publish)

    dep = sub.add_parser("deploy", help="deploy a published version to the entitled devices",
                         description="Deploy a published version: entitled devices are offered it with "
                                     "their next trusted attestation. Until then they keep the previously "
                                     "deployed version (or nothing).")
    dep.add_argument("name", metavar="NAME")
    dep.add_argument("version", metavar="VERSION")
    dep.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(dep)
    dep.set_defaults(handler=_deploy)

    ls = sub.add_parser("list", help="list models")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(ls)
    ls.set_defaults(handler=_list)

    show = sub.add_parser("show", help="one model: versions, entitlements, leases, usage")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(show)
    show.set_defaults(handler=_show)

    for command, handler, text in (("entitle", _entitle, "entitle a device or a device class to a model"),
                                   ("revoke-entitlement", _revoke, "withdraw an entitlement")):
        p = sub.add_parser(command, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("name", metavar="NAME")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--device-class", metavar="CLASS", help="every device of this class")
        who.add_argument("--device", metavar="ID", help="one device")
        add_config_argument(p)
        p.set_defaults(handler=handler)

    pol = sub.add_parser("policy", help="show or change a version's usage policy",
                         description="Show the usage policy of a model version (default: the newest), or "
                                     "change it with --set; devices get the new policy with their next key "
                                     f"release. Keys: {', '.join(FIELDS)}.")
    pol.add_argument("name", metavar="NAME")
    pol.add_argument("--version", help="the version (default: the newest)")
    pol.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                     help="change one key (repeatable); quotas accept 'none' for unlimited")
    pol.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(pol)
    pol.set_defaults(handler=_policy)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _policy_lines(policy: ModelPolicy, indent: str = "  ") -> list[str]:
    return [f"{indent}{key:<20}{json.dumps(value)}" for key, value in policy.to_json().items()]


def _publish(args: argparse.Namespace) -> int:
    config = load(args)
    model = read_model_file(args.model_file)
    policy = policy_from_toml(args.policy) if args.policy is not None else None
    kek = load_kek(config.models.kek_file)
    if kek is None:
        raise ConfigError(f"no key-encryption key: set ${KEK_ENV} or create {config.models.kek_file} "
                          "(fleet-server init does)")
    signing_key = load_model_signing_key(config.models.signing_key)
    with repository(config) as repo:
        published = publish_model(repo, model=model, name=args.name, version=args.version,
                                  signing_key=signing_key, kek=kek,
                                  store=PackageStore(config.models.store_dir), now=now_ms(), policy=policy,
                                  chunk_size=args.chunk_size, actor=cli_actor(),
                                  targets=initialised_update_repository(config, clock=time.time))
        record_cli(repo.engine, "model.publish", f"model:{published.name}",
                   {"version": published.version, "package_id": published.package_id,
                    "package_sha256": published.package_sha256.hex(), "package_size": published.package_size,
                    "signing_key_id": published.signing_key_id, "kek_id": published.kek_id}, now=now_ms())
        deployment = _deploy_recorded(repo, published.name, published.version) if args.deploy else None
    deployed = deployment is not None
    if args.json:
        return emit_json({"deployed": deployed, "name": published.name, "version": published.version,
                          "path": str(published.path),
                          "package_id": published.package_id, "package_size": published.package_size,
                          "package_sha256": published.package_sha256.hex(),
                          "plaintext_size": published.plaintext_size,
                          "io_signature": published.io_signature.to_json(),
                          "policy": published.policy.to_json(), "signing_key_id": published.signing_key_id,
                          "kek_id": published.kek_id})
    sig = published.io_signature
    return emit([
        f"published {published.name} {published.version}",
        f"  package        {published.path} ({published.package_size} bytes, "
        f"model {published.plaintext_size})",
        f"  sha256         {published.package_sha256.hex()}",
        f"  package id     {published.package_id}",
        f"  signed by      model-signing key {published.signing_key_id}",
        f"  data key       sealed under KEK {published.kek_id}",
        "  inputs         " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in sig.inputs),
        "  outputs        " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in sig.outputs),
        "  policy:", *_policy_lines(published.policy, "    "),
        "  deployed: entitled devices are offered it with their next trusted attestation" if deployed else
        "  not deployed: devices get it after "
        f"`fleet-server model deploy {published.name} {published.version}`",
    ])


def _deploy_recorded(repo: Repository, name: str, version: str) -> admin.Deployment:
    now = now_ms()
    deployment = admin.deploy(repo, name, version, now=now, actor=cli_actor())
    if deployment.deployed:
        record_cli(repo.engine, "model.deploy", f"model:{name}",
                   {"version": version, "previous": deployment.previous}, now=now)
    return deployment


def _deploy(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        deployment = _deploy_recorded(repo, args.name, args.version)
    if args.json:
        return emit_json({"name": deployment.name, "version": deployment.version,
                          "deployed": deployment.deployed, "previous": deployment.previous})
    if not deployment.deployed:
        return emit([f"{args.name} {args.version} was already deployed; nothing changed"])
    before = f" (was {deployment.previous})" if deployment.previous else ""
    return emit([f"deployed {args.name} {args.version}{before}: entitled devices are offered it with their "
                 "next trusted attestation"])


def _list(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        models = repo.models.models()
    if args.json:
        return emit_json([{"name": x.name, "newest": x.newest, "deployed": x.deployed, "versions": x.versions,
                           "entitlements": x.entitlements, "active_leases": x.active_leases,
                           "created_at": x.created_at} for x in models])
    if not models:
        return emit(["no models"])
    rows = [[x.name, x.newest or "-", x.deployed or "-", str(x.versions), str(x.entitlements),
             str(x.active_leases)] for x in models]
    return emit(table(["NAME", "NEWEST", "DEPLOYED", "VERSIONS", "ENTITLEMENTS", "ACTIVE LEASES"], rows))


def _version_json(x: VersionRecord) -> dict[str, Any]:
    return {"version": x.version, "package_path": x.package_path, "package_size": x.package_size,
            "package_sha256": x.package_sha256.hex(), "package_id": x.package_id,
            "plaintext_size": x.plaintext_size, "plaintext_sha256": _b64(x.plaintext_sha256),
            "ciphertext_sha256": _b64(x.ciphertext_sha256), "signing_key_id": x.signing_key_id,
            "kek_id": x.kek_id, "created_at": x.created_at, "created_by": x.created_by,
            "deployed_at": x.deployed_at, "deployed_by": x.deployed_by,
            "policy": json.loads(x.policy), "manifest": json.loads(x.manifest)}


def _show(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        model = repo.models.model(args.name)
        if model is None:
            raise admin.ModelAdminError(f"no model {args.name!r}")
        versions = repo.models.versions(args.name)
        entitlements = repo.models.entitlements(args.name)
        leases = repo.models.leases(name=args.name, limit=50)
        usage = repo.models.usage(name=args.name)[:30]
        clients = repo.models.client_usage(name=args.name)
    if args.json:
        return emit_json({
            "name": model.name, "created_at": model.created_at,
            "versions": [_version_json(x) for x in versions],
            "entitlements": [{"kind": x.kind, "subject": x.subject, "created_at": x.created_at}
                             for x in entitlements],
            "leases": [{"lease_id": x.lease_id, "device_id": x.device_id, "version": x.version,
                        "state": x.state, "issued_at": x.issued_at, "expires_at": x.expires_at,
                        "renewed_at": x.renewed_at,
                        "revoked_at": x.revoked_at, "reason": x.reason, "key_name": x.key_name.hex()}
                       for x in leases],
            "usage": [{"device_id": x.device_id, "date": x.date, "served": x.served, "refused": x.refused,
                       "reports": x.reports} for x in usage],
            "clients": [{"device_id": x.device_id, "client": x.client, "served": x.served,
                         "refused": x.refused, "statistic_micro": x.statistic_micro, "alarm": x.alarm,
                         "alarm_at": x.alarm_at}
                        for x in clients]})
    lines = [f"model {model.name} (created {iso(model.created_at)})", "  versions (newest first):"]
    lines += [f"    {x.version:<12} {x.package_size:>12} bytes  {iso(x.created_at)}  sha256 "
              f"{x.package_sha256.hex()[:16]}  key {x.signing_key_id}  kek {x.kek_id}  "
              + (f"deployed {iso(x.deployed_at)}" if x.deployed_at is not None else "not deployed")
              for x in versions]
    if versions:
        lines.append(f"  policy of {versions[0].version}:")
        lines += _policy_lines(policy_from_text(versions[0].policy), "    ")
    lines.append("  entitled: " + (", ".join(f"{x.kind} {x.subject}" for x in entitlements) or "nobody"))
    if leases:
        lines.append("  leases (newest first):")
        lines += ["    " + "  ".join((x.lease_id[:12], x.device_id, x.version, x.state,
                                      f"expires {iso(x.expires_at)}", x.reason)).rstrip() for x in leases]
    if usage:
        lines.append("  usage (served / refused per device and UTC day):")
        lines += [f"    {x.date}  {x.device_id}  {x.served} / {x.refused}" for x in usage]
    alarms = [x for x in clients if x.alarm]
    if alarms:
        lines.append("  extraction alarms:")
        lines += [f"    {x.device_id}  client {x.client}  since {iso(x.alarm_at)}  statistic "
                  + ("-" if x.statistic_micro is None else f"{x.statistic_micro / 1e6:.3f}") for x in alarms]
    return emit(lines)


def _entitle(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        created = admin.entitle(repo, args.name, device_class=args.device_class, device_id=args.device,
                                now=now_ms(), actor=cli_actor())
        record_cli(repo.engine, "model.entitle", f"model:{args.name}",
                   {"kind": "class" if args.device_class else "device",
                    "subject": args.device_class or args.device, "created": created}, now=now_ms())
        unknown = args.device is not None and repo.device(args.device) is None
    who = f"device class {args.device_class}" if args.device_class else f"device {args.device}"
    note = " (no such device yet: the entitlement waits for it)" if unknown else ""
    return emit([f"{who} {'entitled to' if created else 'was already entitled to'} model {args.name}{note}"])


def _revoke(args: argparse.Namespace) -> int:
    config = load(args)
    signer = load_signing_key(config.signing_key)
    with repository(config) as repo:
        result = admin.revoke_entitlement(repo, args.name, signer=signer, device_class=args.device_class,
                                          device_id=args.device, now=now_ms(), actor=cli_actor())
        record_cli(repo.engine, "model.withdraw", f"model:{args.name}",
                   {"kind": "class" if args.device_class else "device",
                    "subject": args.device_class or args.device, "removed": result.removed,
                    "leases_revoked": len(result.revoked),
                    "devices_denied": sorted({x.device_id for x in result.revoked})}, now=now_ms())
    who = f"device class {args.device_class}" if args.device_class else f"device {args.device}"
    if not result.removed:
        return emit([f"{who} had no entitlement to model {args.name}; nothing changed"])
    devices = sorted({x.device_id for x in result.revoked})
    return emit([f"{who} is no longer entitled to model {args.name}; {len(result.revoked)} lease(s) revoked"
                 + (f" ({', '.join(devices)}); signed key-denied queued for each" if devices else "")])


def _policy(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        if args.settings:
            change = admin.set_policy(repo, args.name, args.settings, version=args.version, now=now_ms(),
                                      signer=load_signing_key(config.signing_key), actor=cli_actor())
            before, after = change.before.to_json(), change.after.to_json()
            record_cli(repo.engine, "model.policy", f"model:{args.name}",
                       {"version": change.version, "superseded": change.superseded,
                        "changed": {k: {"from": before[k], "to": after[k]} for k in after
                                    if before[k] != after[k]}}, now=now_ms())
            version, policy, superseded = change.version, change.after, change.superseded
        else:
            versions = repo.models.versions(args.name)
            if not versions:
                raise admin.ModelAdminError(f"no published model {args.name!r}")
            chosen = versions[0] if args.version is None else next(
                (x for x in versions if x.version == args.version), None)
            if chosen is None:
                raise admin.ModelAdminError(f"model {args.name} has no version {args.version}")
            version, policy, superseded = chosen.version, policy_from_text(chosen.policy), -1
    if args.json:
        return emit_json({"name": args.name, "version": version, "policy": policy.to_json(),
                          **({"superseded_leases": superseded} if superseded >= 0 else {})})
    lines = [f"policy of {args.name} {version}:", *_policy_lines(policy)]
    if superseded >= 0:
        lines.append(f"{superseded} active lease(s) superseded: trusted devices are offered the model "
                     "again and get the new policy with their next key release")
    return emit(lines)
