"""``fleet-server init --data-dir DIR``: create everything a fleet server needs in one folder.

Creates (folder 0700, private keys 0600, certificates 0644)::

    DIR/server.toml                      the configuration (0600: it may hold a database password)
    DIR/fleet.db                         the SQLite database, migrated to the newest schema
    DIR/pki/fleet-ca.pem, fleet-ca.key   the fleet CA (signs broker, server, claim and device certs)
    DIR/pki/broker.pem, broker.key       the Mosquitto broker's TLS server certificate
    DIR/pki/fleet-server.pem, .key       the workers' MQTT client certificate (CN fleet-server)
    DIR/keys/result-signing.key          ECDSA P-256 key signing every server -> device message
    DIR/keys/result-signing.pub.pem      its public key: agents pin it at provisioning
    DIR/keys/model-signing.key, .pub.pem ECDSA P-256 key signing model package manifests (devices pin it)
    DIR/keys/model-kek.key               the key-encryption key sealing model data keys (0600; never
                                         replaced, not even by --force)
    DIR/keys/audit-checkpoint.key, .pub.pem  Ed25519 key signing audit checkpoints (never replaced)
    DIR/broker/acl, broker/mosquitto.conf  a broker configuration matching the PKI (for the operator)
    DIR/trust/tpm-manufacturers.pem      trusted TPM manufacturer CAs (copied from --trust-bundle)
    DIR/logs/

Idempotent: running it again keeps every existing key and certificate (and says so) and only adds
what is missing; ``--force`` replaces them all (every agent must then be re-provisioned: they pin
the signing key and the CA).
"""

from __future__ import annotations

import argparse
import os
import time
import tomllib
from pathlib import Path
from typing import Any

from fleet_server import config as cfg
from fleet_server import pki
from fleet_server.brokerconf import ACL, listener_lines
from fleet_server.console.audit import record_cli
from fleet_server.enrollment.ekcert import load_trust_bundle
from fleet_server.keys import (
    create_checkpoint_key,
    create_model_signing_key,
    create_signing_key,
    load_checkpoint_key,
    load_model_signing_key,
    load_signing_key,
    public_key_path,
)
from fleet_server.migrations import upgrade
from fleet_server.modelstore.kek import create_kek_file, read_kek_file
from fleet_server.service.cliutil import emit, now_ms
from fleet_server.storage.db import create_engine, default_database_url, is_sqlite
from protocol.errors import ConfigError

BROKER_ACL = ACL
"""The ACL ``init`` writes (:data:`fleet_server.brokerconf.ACL`)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "init", help="create the server's CA, TLS material, signing key, configuration and database",
        description="Create a fleet server data folder: fleet CA, broker and server certificates, the "
                    "result-signing key agents pin, server.toml and a migrated database. Existing keys "
                    "are kept unless --force.")
    parser.add_argument("--data-dir", required=True, type=Path, metavar="DIR", help="the data folder")
    parser.add_argument("--force", action="store_true",
                        help="replace existing keys and certificates (agents must be re-provisioned)")
    parser.add_argument("--mqtt-host", default="127.0.0.1", help="broker host the workers connect to")
    parser.add_argument("--mqtt-port", type=int, default=8883,
                        help="the broker's device listener, TLS (default 8883)")
    parser.add_argument("--server-mqtt-port", type=int, default=8884,
                        help="the broker's listener for the fleet server's workers, TLS (default 8884)")
    parser.add_argument("--broker-name", action="append", default=[], metavar="DNS",
                        help="extra DNS name of the broker certificate (repeatable; localhost is always in)")
    parser.add_argument("--broker-ip", action="append", default=[], metavar="IP",
                        help="extra IP address of the broker certificate (repeatable; 127.0.0.1 is in)")
    parser.add_argument("--trust-bundle", type=Path, metavar="PEM",
                        help="PEM bundle of trusted TPM manufacturer CAs to install")
    parser.add_argument("--database-url", metavar="URL",
                        help="SQLAlchemy URL (default: SQLite file fleet.db in the data folder)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (server.workers)")
    parser.set_defaults(handler=_init)


def _line(label: str, value: object) -> str:
    return f"{label:<34}{value}"


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _init(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.expanduser().resolve()
    force: bool = args.force
    if not 1 <= args.mqtt_port <= 65535:
        raise ConfigError("--mqtt-port must be between 1 and 65535")
    if not 1 <= args.server_mqtt_port <= 65535 or args.server_mqtt_port == args.mqtt_port:
        raise ConfigError("--server-mqtt-port must be between 1 and 65535 and differ from --mqtt-port")
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    lines: list[str] = []
    now = time.time()
    for sub in ("", cfg.PKI_DIR, cfg.KEYS_DIR, cfg.TRUST_DIR, cfg.LOGS_DIR, "broker"):
        _mkdir(data_dir / sub)

    # Fleet CA.
    ca_cert, ca_key = data_dir / cfg.FLEET_CA_CERT, data_dir / cfg.FLEET_CA_KEY
    if force or not (ca_cert.exists() and ca_key.exists()):
        ca = pki.create_ca(now=now)
        pki.save_ca(ca, ca_cert, ca_key)
        lines.append(_line("created fleet CA", ca_cert))
        new_ca = True
    else:
        ca = pki.load_ca_files(ca_cert, ca_key)
        lines.append(_line("kept fleet CA", ca_cert))
        new_ca = False

    # The server-clients CA: it issues only the fleet server's MQTT client certificate, so the
    # broker's server listener accepts no device (see _write_broker_files).
    sc_cert, sc_key = data_dir / cfg.SERVER_CLIENTS_CA_CERT, data_dir / cfg.SERVER_CLIENTS_CA_KEY
    if force or not (sc_cert.exists() and sc_key.exists()):
        server_ca = pki.create_ca(now=now, common_name="Edge Fleet Server Clients CA")
        pki.save_ca(server_ca, sc_cert, sc_key)
        lines.append(_line("created server-clients CA", sc_cert))
        new_server_ca = True
    else:
        server_ca = pki.load_ca_files(sc_cert, sc_key)
        lines.append(_line("kept server-clients CA", sc_cert))
        new_server_ca = False

    # Broker and server credentials (re-issued whenever their CA is new).
    for name, issue, renew in (
            ("broker", lambda: pki.issue_broker_cert(ca, now=now, dns_names=args.broker_name,
                                                     ip_addresses=args.broker_ip), new_ca),
            ("fleet-server", lambda: pki.issue_server_client_cert(server_ca, now=now), new_server_ca)):
        cert, key = data_dir / cfg.PKI_DIR / f"{name}.pem", data_dir / cfg.PKI_DIR / f"{name}.key"
        if force or renew or not (cert.exists() and key.exists()):
            pki.write_credential(data_dir / cfg.PKI_DIR, name, issue())
            lines.append(_line(f"created {name} certificate", cert))
        else:
            lines.append(_line(f"kept {name} certificate", cert))

    # The CRL of revoked device certificates (the broker's device listener needs the file to start).
    crl_path = data_dir / cfg.FLEET_CA_CRL
    if force or new_ca or not crl_path.exists():
        pki.write_certificate(crl_path, pki.build_crl(ca, [], now=now))
        lines.append(_line("created device CRL", f"{crl_path} (empty; `device crl` renews it)"))

    # Result-signing key.
    signing = data_dir / cfg.SIGNING_KEY
    if force or not signing.exists():
        signer = create_signing_key(signing, overwrite=True)
        lines.append(_line("created signing key", f"{signing} (key id {signer.kid})"))
    else:
        signer = load_signing_key(signing)
        if not public_key_path(signing).exists():
            pki.write_certificate(public_key_path(signing), signer.public_pem())
        lines.append(_line("kept signing key", f"{signing} (key id {signer.kid})"))
    lines.append(_line("agents pin", f"{public_key_path(signing)}"))
    lines += _model_keys(data_dir, force)

    # Audit checkpoint key: never replaced, not even by --force (the stored checkpoints name it).
    checkpoint_key = data_dir / cfg.AUDIT_CHECKPOINT_KEY
    if checkpoint_key.exists():
        kept = load_checkpoint_key(checkpoint_key)
        lines.append(_line("kept audit checkpoint key", f"{checkpoint_key} (key id {kept.kid})"))
    else:
        made = create_checkpoint_key(checkpoint_key)
        lines.append(_line("created audit checkpoint key", f"{checkpoint_key} (key id {made.kid})"))

    # Trust bundle.
    bundle = data_dir / cfg.TRUST_BUNDLE
    if args.trust_bundle is not None:
        try:
            data = args.trust_bundle.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.trust_bundle}: {exc.strerror or exc}") from None
        load_trust_bundle(data)  # refuse an unusable bundle now rather than at the first enrollment
        pki.write_certificate(bundle, data)
        lines.append(_line("installed trust bundle", f"{bundle}"))
    elif not bundle.exists():
        lines.append(_line("no trust bundle yet", f"put TPM manufacturer CA certificates in {bundle}"))

    # Broker configuration for the operator.
    _write_broker_files(data_dir, args.mqtt_port, args.server_mqtt_port)

    # Configuration.
    config_path = data_dir / cfg.DEFAULT_CONFIG_NAME
    database_url = args.database_url
    if force or not config_path.exists():
        text = cfg.render_config(data_dir=data_dir, mqtt_host=args.mqtt_host, mqtt_port=args.server_mqtt_port,
                                 database_url=database_url, workers=args.workers)
        cfg.parse_config(tomllib.loads(text), base=data_dir)  # what we write must load
        pki.write_private_key(config_path, text.encode())  # 0600: may hold a DB password
        lines.append(_line("created configuration", f"{config_path}"))
    else:
        lines.append(_line("kept configuration", f"{config_path}"))
    config = cfg.load_config(config_path)
    if config.mqtt.port == args.mqtt_port:  # a server.toml kept from before the broker had two listeners
        lines.append(_line("WARNING", f"{config_path}: mqtt.port {config.mqtt.port} is the device listener; "
                                      f"the workers must use the server listener: set it to "
                                      f"{args.server_mqtt_port}"))

    # Database.
    url = config.database_url or default_database_url(data_dir)
    engine = create_engine(url)
    try:
        before, after = upgrade(engine)
        if before is not None:  # an existing database: re-running init (maybe --force) is an admin act
            record_cli(engine, "server.init", f"data-dir:{data_dir}", {"force": force, "schema": after},
                       now=now_ms())
    finally:
        engine.dispose()
    if is_sqlite(url):
        db_file = Path(url.split("///", 1)[1])
        for path in (db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-shm")):
            if path.exists():
                os.chmod(path, 0o600)
    lines.append(_line("database", f"schema {before or 'empty'} -> {after}"))
    lines.append(f"next: start the broker with {data_dir / 'broker' / 'mosquitto.conf'}, then "
                 f"`fleet-server run --config {config_path}`")
    return emit(lines)


def _model_keys(data_dir: Path, force: bool) -> list[str]:
    """The model-signing key (replaced by --force like the other keys) and the KEK (never replaced:
    every published model's data key is sealed under it)."""
    lines = []
    model_signing = data_dir / cfg.MODEL_SIGNING_KEY
    if force or not model_signing.exists():
        key = create_model_signing_key(model_signing, overwrite=True)
        lines.append(_line("created model-signing key", f"{model_signing} (key id {key.kid})"))
    else:
        key = load_model_signing_key(model_signing)
        if not public_key_path(model_signing).exists():
            pki.write_certificate(public_key_path(model_signing), key.public_pem())
        lines.append(_line("kept model-signing key", f"{model_signing} (key id {key.kid})"))
    kek_path = data_dir / cfg.MODEL_KEK
    if kek_path.exists():
        kek = read_kek_file(kek_path)
        lines.append(_line("kept model KEK", f"{kek_path} (KEK id {kek.kid})"))
    else:
        kek = create_kek_file(kek_path)
        lines.append(_line("created model KEK", f"{kek_path} (KEK id {kek.kid}); back it up"))
    return lines


def _write_broker_files(data_dir: Path, port: int, server_port: int) -> None:
    """``broker/mosquitto.conf`` and ``broker/acl``: two listeners. On the device listener a client's
    MQTT client id is its certificate's CN (``use_username_as_clientid``), so no device can take over
    another's session by connecting with its client id; the server listener accepts only
    certificates of the server-clients CA (the workers share one CN and need client ids of their own).
    """
    broker = data_dir / "broker"
    pki.write_certificate(broker / "acl", BROKER_ACL.encode())  # public, 0644

    conf = "\n".join([
        "# Mosquitto configuration for this fleet (written by `fleet-server init`).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {broker / 'acl'}",
        "persistence false",
        "max_packet_size 1048576",
        "max_inflight_messages 100",
        "max_queued_messages 10000",
        "set_tcp_nodelay true",
        "",
        "# Devices (claim and device certificates of the fleet CA).",
        *listener_lines(str(port), client_ca=data_dir / cfg.FLEET_CA_CERT, cert=data_dir / cfg.BROKER_CERT,
                        key=data_dir / cfg.BROKER_KEY, devices=True, crl=data_dir / cfg.FLEET_CA_CRL),
        "# The fleet server's workers (server-clients CA only).",
        *listener_lines(str(server_port), client_ca=data_dir / cfg.SERVER_CLIENTS_CA_CERT,
                        cert=data_dir / cfg.BROKER_CERT, key=data_dir / cfg.BROKER_KEY, devices=False),
    ])
    pki.write_certificate(broker / "mosquitto.conf", conf.encode())


__all__ = ["BROKER_ACL", "register"]
