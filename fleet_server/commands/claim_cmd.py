"""``fleet-server claim issue DEVICE_ID --out DIR``: what a device needs at provisioning.

Writes into ``DIR`` (created 0700)::

    claim.pem           the claim certificate, CN ``claim:<DEVICE_ID>`` (reaches only its enrollment topics)
    claim.key           its private key (0600)
    fleet-ca.pem        the fleet CA certificate (verifies the broker)
    server-signing.pub.pem   the server's result-signing public key (the agent pins it)
    model-signing.pub.pem    the model-signing public key (the agent pins it to verify model packages)

The claim certificate is short-lived (``--validity-days``, default 30): it is only for enrolling.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from fleet_server import pki
from fleet_server.console.audit import record_cli
from fleet_server.keys import load_model_signing_key, load_signing_key
from fleet_server.service.cliutil import add_config_argument, emit, load, now_ms, repository
from protocol.errors import ConfigError
from protocol.topics import validate_device_id

CLAIM_CERT = "claim.pem"
CLAIM_KEY = "claim.key"
CA_CERT = "fleet-ca.pem"
SERVER_PUBLIC_KEY = "server-signing.pub.pem"
MODEL_PUBLIC_KEY = "model-signing.pub.pem"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("claim", help="device provisioning (claim certificates)",
                                   description="Issue claim (bootstrap) credentials for devices.")
    sub = parser.add_subparsers(dest="claim_command", metavar="SUBCOMMAND", required=True)
    issue = sub.add_parser("issue", help="issue a claim certificate and the files a device needs",
                           description="Write a claim certificate and key, the fleet CA certificate and "
                                       "the server's signing public key into a folder for one device.")
    issue.add_argument("device_id", metavar="DEVICE_ID")
    issue.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    issue.add_argument("--validity-days", type=int, default=30, help="claim certificate lifetime (days)")
    issue.add_argument("--force", action="store_true", help="replace an existing claim key in DIR")
    add_config_argument(issue)
    issue.set_defaults(handler=_issue)


def _issue(args: argparse.Namespace) -> int:
    device_id = validate_device_id(args.device_id)
    if not 1 <= args.validity_days <= 3650:
        raise ConfigError("--validity-days must be between 1 and 3650")
    config = load(args)
    out: Path = args.out.expanduser()
    if (out / CLAIM_KEY).exists() and not args.force:
        raise ConfigError(f"{out / CLAIM_KEY} exists; refusing to replace it (use --force)")
    ca = pki.load_ca_files(config.fleet_ca_cert, config.fleet_ca_key)
    signer = load_signing_key(config.signing_key)
    credential = pki.issue_claim_cert(ca, device_id, now=time.time(),
                                      validity=dt.timedelta(days=args.validity_days))
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    pki.write_private_key(out / CLAIM_KEY, credential.key_pem)
    pki.write_certificate(out / CLAIM_CERT, credential.cert_pem)
    pki.write_certificate(out / CA_CERT, ca.cert_pem)
    pki.write_certificate(out / SERVER_PUBLIC_KEY, signer.public_pem())
    lines = [f"claim credentials for {device_id} (CN claim:{device_id}, valid {args.validity_days} days):",
             f"  {out / CLAIM_CERT}", f"  {out / CLAIM_KEY} (0600)", f"  {out / CA_CERT}",
             f"  {out / SERVER_PUBLIC_KEY} (server key id {signer.kid})"]
    if config.models.signing_key.exists():
        model_key = load_model_signing_key(config.models.signing_key)
        pki.write_certificate(out / MODEL_PUBLIC_KEY, model_key.public_pem())
        lines.append(f"  {out / MODEL_PUBLIC_KEY} (model-signing key id {model_key.kid})")
    with repository(config) as repo:
        record_cli(repo.engine, "claim.issue", f"device:{device_id}",
                   {"validity_days": args.validity_days, "out": str(out), "force": args.force}, now=now_ms())
    return emit(lines)
