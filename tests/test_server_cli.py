"""The administrative commands: init (files and modes, idempotence), claim issue, policy from-eventlog on
a firmware_sim log, device approve/revoke/quarantine/preregister/show/list, configuration errors.
Errors are one line on stderr with exit status 1; usage errors exit 2."""

from __future__ import annotations

import json
import stat
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_sim.boot import BootMedia, build_boot_log
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.profiles import get_profile
from fleet_server import pki
from fleet_server.cli import main
from fleet_server.config import find_config, load_config, parse_config
from fleet_server.keys import load_public_key, load_signing_key
from fleet_server.storage.db import create_engine
from fleet_server.storage.repo import Repository
from protocol.errors import ConfigError, EdgeError
from protocol.messages import EnrollResult, Revocation, decode_signed

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import insert_pending_device  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures")
pytestmark = pytest.mark.usefixtures("quiet_root_logging")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    folder = tmp_path / "srv"
    status, out, _ = _run(capsys, "init", "--data-dir", str(folder), "--mqtt-port", "18883",
                          "--server-mqtt-port", "18884")
    assert status == 0, out
    return folder


@pytest.fixture
def config(data_dir: Path) -> str:
    return str(data_dir / "server.toml")


def test_init_creates_private_files_0600(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private = ["pki/fleet-ca.key", "pki/server-clients-ca.key", "pki/broker.key", "pki/fleet-server.key",
               "keys/result-signing.key", "server.toml", "fleet.db"]
    public = ["pki/fleet-ca.pem", "pki/server-clients-ca.pem", "pki/broker.pem", "pki/fleet-server.pem",
              "keys/result-signing.pub.pem", "broker/acl", "broker/mosquitto.conf"]
    assert _mode(data_dir) == 0o700
    for sub in ("pki", "keys", "trust", "logs", "broker"):
        assert _mode(data_dir / sub) == 0o700
    for name in private:
        assert _mode(data_dir / name) == 0o600, name
    for name in public:
        assert _mode(data_dir / name) == 0o644, name
    config = load_config(data_dir / "server.toml")
    # The workers use the broker's server listener; devices the other one.
    assert config.mqtt.port == 18884 and config.database_url == f"sqlite:///{data_dir / 'fleet.db'}"
    signer = load_signing_key(config.signing_key)
    assert load_public_key(data_dir / "keys/result-signing.pub.pem") == signer.public_key
    ca = pki.load_ca_files(config.fleet_ca_cert, config.fleet_ca_key)
    server_ca = pki.load_ca_files(data_dir / "pki/server-clients-ca.pem",
                                  data_dir / "pki/server-clients-ca.key")
    server_cert = (data_dir / "pki/fleet-server.pem").read_bytes()
    # The server's client certificate comes from the server-clients CA, never from the fleet CA that
    # devices' certificates come from: the broker's server listener admits no device.
    assert pki.verify_client_cert(server_ca.cert_pem, server_cert, now=time.time()) == "fleet-server"
    with pytest.raises(EdgeError):
        pki.verify_client_cert(ca.cert_pem, server_cert, now=time.time())
    conf = (data_dir / "broker/mosquitto.conf").read_text()
    device_listener, server_listener = conf.split("listener 18883\n")[1].split("listener 18884\n")
    assert "use_identity_as_username true" in device_listener
    assert "use_username_as_clientid true" in device_listener
    assert "fleet-ca.pem" in device_listener and "server-clients-ca.pem" in server_listener
    assert "use_username_as_clientid" not in server_listener
    # No key material in the configuration.
    assert b"PRIVATE KEY" not in (data_dir / "server.toml").read_bytes()

    # Idempotent: a second run keeps every key.
    before = {name: (data_dir / name).read_bytes() for name in private[:4]}
    status, out, _ = _run(capsys, "init", "--data-dir", str(data_dir))
    assert status == 0 and "kept signing key" in out and "created" not in out
    assert {name: (data_dir / name).read_bytes() for name in before} == before
    # --force replaces them.
    status, out, _ = _run(capsys, "init", "--data-dir", str(data_dir), "--force")
    assert status == 0
    assert all((data_dir / name).read_bytes() != data for name, data in before.items())
    assert _mode(data_dir / "keys/result-signing.key") == 0o600


def test_init_installs_a_trust_bundle_and_refuses_a_bad_one(
        tmp_path: Path, manufacturer_ca: ManufacturerCA, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "srv"
    status, out, _ = _run(capsys, "init", "--data-dir", str(folder), "--trust-bundle",
                          str(manufacturer_ca.bundle))
    assert status == 0 and "installed trust bundle" in out
    assert (folder / "trust/tpm-manufacturers.pem").read_bytes() == manufacturer_ca.bundle.read_bytes()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a bundle")
    status, _, err = _run(capsys, "init", "--data-dir", str(tmp_path / "other"), "--trust-bundle", str(bad))
    assert status == 1 and err.startswith("fleet-server: ") and err.count("\n") == 1


def test_claim_issue_writes_what_a_device_needs(
        data_dir: Path, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = data_dir.parent / "provision" / "cam-1"
    status, out, _ = _run(capsys, "claim", "issue", "cam-1", "--out", str(out_dir), "--config", config)
    assert status == 0 and "claim:cam-1" in out
    assert _mode(out_dir) == 0o700 and _mode(out_dir / "claim.key") == 0o600
    ca_pem = (out_dir / "fleet-ca.pem").read_bytes()
    assert ca_pem == (data_dir / "pki/fleet-ca.pem").read_bytes()
    assert pki.verify_client_cert(ca_pem, (out_dir / "claim.pem").read_bytes(),
                                  now=time.time()) == "claim:cam-1"
    cert = x509.load_pem_x509_certificate((out_dir / "claim.pem").read_bytes())
    key = pki.serialization.load_pem_private_key((out_dir / "claim.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and cert.public_key() == key.public_key()
    pinned = (data_dir / "keys/result-signing.pub.pem").read_bytes()
    assert (out_dir / "server-signing.pub.pem").read_bytes() == pinned
    # Refuses to replace the key without --force; refuses invalid ids.
    status, _, err = _run(capsys, "claim", "issue", "cam-1", "--out", str(out_dir), "--config", config)
    assert status == 1 and "refusing" in err
    status, _, err = _run(capsys, "claim", "issue", "Bad_ID", "--out", str(out_dir / "x"), "--config", config)
    assert status == 1 and "invalid device id" in err


def _golden_log(tmp_path: Path, profile: str = "golden") -> Path:
    chosen = get_profile(profile)
    path = tmp_path / f"{profile}.bin"
    path.write_bytes(build_boot_log(BootMedia.from_specs(chosen.image_specs()),
                                    chosen.boot_settings).to_bytes())
    return path


def test_policy_from_eventlog(
        data_dir: Path, config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = _golden_log(tmp_path)
    status, out, _ = _run(capsys, "policy", "from-eventlog", str(log), "--name", "golden-1.2.0",
                          "--device-class", "edge-camera", "--config", config)
    assert status == 0, out
    assert "stored policy golden-1.2.0" in out and "firmware version  1.2.0" in out
    assert "sha256: 0,1,2,3,4,5,6,7,8,9,13,14" in out
    status, out, _ = _run(capsys, "policy", "list", "--json", "--config", config)
    [entry] = json.loads(out)
    assert (entry["name"], entry["device_class"], entry["firmware_version"], entry["active"]) == \
        ("golden-1.2.0", "edge-camera", "1.2.0", True)
    status, out, _ = _run(capsys, "policy", "show", "golden-1.2.0", "--config", config)
    assert status == 0 and "EV_EFI_BOOT_SERVICES_APPLICATION" in out and "\\vmlinuz" in out
    status, out, _ = _run(capsys, "policy", "show", "golden-1.2.0", "--json", "--config", config)
    assert json.loads(out)["pcrs"]["sha256"]["4"]
    # The same name again is refused; --replace supersedes; a class-independent policy by default.
    status, _, err = _run(capsys, "policy", "from-eventlog", str(log), "--name", "golden-1.2.0",
                          "--device-class", "edge-camera", "--config", config)
    assert status == 1 and "already exists" in err
    status, out, _ = _run(capsys, "policy", "from-eventlog", str(_golden_log(tmp_path, "updated-firmware")),
                          "--name", "fw-1.3.0", "--config", config)
    assert status == 0 and "device class      any" in out and "firmware version  1.3.0" in out
    status, _, err = _run(capsys, "policy", "from-eventlog", str(tmp_path / "missing.bin"), "--name", "x",
                          "--config", config)
    assert status == 1 and "cannot read" in err
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x01" * 100)
    status, _, err = _run(capsys, "policy", "from-eventlog", str(garbage), "--name", "x", "--config", config)
    assert status == 1 and err.count("\n") == 1


def _pending_device(config: str, device_id: str) -> tuple[Repository, ec.EllipticCurvePrivateKey]:
    repo = Repository(create_engine(load_config(Path(config)).database_url))
    return repo, insert_pending_device(repo, device_id)


def test_device_approve_revoke_quarantine(
        data_dir: Path, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    repo, key = _pending_device(config, "cam-9")
    signer = load_signing_key(data_dir / "keys/result-signing.key")
    keys = {signer.kid: signer.public_key}
    status, out, _ = _run(capsys, "device", "list", "--state", "pending", "--config", config)
    assert status == 0 and "cam-9" in out and "pending" in out

    status, out, _ = _run(capsys, "device", "approve", "cam-9", "--config", config)
    assert status == 0 and "pending -> enrolled" in out and "1 message(s) queued" in out
    [row] = repo.outbox()
    result = decode_signed(row.payload, keys=keys, aud="claim:cam-9").message
    assert isinstance(result, EnrollResult) and result.status == "admitted" and result.request_id == "1" * 32
    cert = x509.load_der_x509_certificate(result.device_cert or b"")
    assert cert.public_key() == key.public_key()
    status, _, err = _run(capsys, "device", "approve", "cam-9", "--config", config)
    assert status == 1 and "only pending, revoked, quarantined or untrusted" in err

    status, out, _ = _run(capsys, "device", "quarantine", "cam-9", "--reason", "odd traffic", "--config",
                          config)
    assert status == 0 and "enrolled -> quarantined" in out
    status, out, _ = _run(capsys, "device", "revoke", "cam-9", "--reason", "stolen", "--config", config)
    assert status == 0 and "quarantined -> revoked" in out
    # The broker's CRL now lists the device's certificate, signed by the fleet CA.
    assert "lists 1 revoked certificate(s)" in out
    crl = x509.load_pem_x509_crl((data_dir / "pki/fleet-ca.crl.pem").read_bytes())
    ca = pki.load_ca_files(data_dir / "pki/fleet-ca.pem", data_dir / "pki/fleet-ca.key")
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None and len(crl) == 1
    notices = [decode_signed(r.payload, keys=keys, aud="cam-9").message for r in repo.outbox()[1:]]
    assert [(n.state, n.reasons) for n in notices if isinstance(n, Revocation)] == \
        [("quarantined", ("odd traffic",)), ("revoked", ("stolen",))]

    status, out, _ = _run(capsys, "device", "show", "cam-9", "--config", config)
    assert status == 0 and "revoked" in out and "stolen" in out
    assert out.index("quarantined -> revoked") < out.index("enrolled -> quarantined")  # newest first
    status, out, _ = _run(capsys, "device", "show", "cam-9", "--json", "--config", config)
    doc = json.loads(out)
    assert doc["state"] == "revoked" and [h["to"] for h in doc["history"]] == \
        ["revoked", "quarantined", "enrolled", "pending"]
    assert doc["history"][0]["cause"] == "revoked by admin: stolen"
    # A revoked device comes back only by approval.
    status, out, _ = _run(capsys, "device", "approve", "cam-9", "--config", config)
    assert status == 0 and "revoked -> enrolled" in out
    assert "lists 0 revoked certificate(s)" in out  # re-admitted: off the list again
    assert len(x509.load_pem_x509_crl((data_dir / "pki/fleet-ca.crl.pem").read_bytes())) == 0
    status, out, _ = _run(capsys, "device", "crl", "--out", str(data_dir / "copy.crl.pem"),
                          "--config", config)
    assert status == 0 and "0 revoked certificate(s), valid 30 days" in out
    assert len(x509.load_pem_x509_crl((data_dir / "copy.crl.pem").read_bytes())) == 0
    repo.engine.dispose()


def test_device_unquarantine_lifts_only_a_quarantine(
        config: str, capsys: pytest.CaptureFixture[str]) -> None:
    repo, _ = _pending_device(config, "cam-8")
    assert _run(capsys, "device", "approve", "cam-8", "--config", config)[0] == 0
    status, _, err = _run(capsys, "device", "unquarantine", "cam-8", "--config", config)
    assert status == 1 and err.strip() == "fleet-server: device cam-8 is enrolled, not quarantined", err
    assert _run(capsys, "device", "quarantine", "cam-8", "--config", config)[0] == 0
    status, out, _ = _run(capsys, "device", "unquarantine", "cam-8", "--config", config)
    assert status == 0 and "quarantined -> enrolled" in out
    device = repo.device("cam-8")
    assert device is not None and device.state == "enrolled" and device.next_attestation_at is not None
    assert device.trusted_until is None  # trusted again only by good evidence
    assert repo.state_history("cam-8", limit=1)[0].cause == "quarantine lifted by admin"
    repo.engine.dispose()


def test_device_preregister(
        data_dir: Path, config: str, manufacturer_ca: ManufacturerCA, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives import serialization

    # An EK-like certificate issued by the manufacturer's issuing CA.
    issuer = x509.load_pem_x509_certificate(manufacturer_ca.issuer_cert.read_bytes())
    issuer_key = serialization.load_pem_private_key(manufacturer_ca.issuer_key.read_bytes(), None)
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ek_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ek")]))
            .issuer_name(issuer.subject).public_key(ek_key.public_key()).serial_number(7)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .sign(issuer_key, hashes.SHA256()))  # type: ignore[arg-type]
    ek_file = tmp_path / "ek.pem"
    ek_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    status, out, _ = _run(capsys, "device", "preregister", str(ek_file), "--device-class", "edge-camera",
                          "--config", config)
    assert status == 0 and "pre-registered" in out and "NOT verified" in out  # no trust bundle installed
    status, out, _ = _run(capsys, "device", "preregister", str(ek_file), "--config", config)
    assert status == 0 and "already pre-registered" in out
    # With the manufacturer bundle installed the chain is checked; a foreign certificate is refused.
    (data_dir / "trust/tpm-manufacturers.pem").write_bytes(manufacturer_ca.bundle.read_bytes())
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes((data_dir / "pki/fleet-server.pem").read_bytes())
    status, _, err = _run(capsys, "device", "preregister", str(foreign), "--config", config)
    assert status == 1 and err.startswith("fleet-server: ")


def test_errors_are_one_line_and_usage_exits_2(
        tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    status, _, err = _run(capsys, "device", "show", "nope", "--config", config)
    assert status == 1 and err == "fleet-server: no device 'nope'\n"
    with pytest.raises(SystemExit) as exc:
        main(["device", "frobnicate"])
    assert exc.value.code == 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLEET_SERVER_CONFIG", raising=False)
    status, _, err = _run(capsys, "device", "list")
    assert status == 1 and "server.toml" in err and "not found" in err
    monkeypatch.setenv("FLEET_SERVER_CONFIG", config)
    assert find_config(None) == Path(config)
    status, _, _ = _run(capsys, "device", "list")
    assert status == 0


@pytest.mark.parametrize(("table", "key", "value", "message"), [
    ("attestation", "interval", 0, "attestation.interval: must be > 0"),
    ("attestation", "intervall", 5, "attestation.intervall: unknown key"),
    ("attestation", "jitter", 400.0, "attestation.jitter: must be smaller than attestation.interval"),
    ("attestation", "selection", {"sha256": [0, 99]}, "attestation.selection.sha256"),
    ("mqtt", "port", "8883", "mqtt.port: expected an integer"),
    ("mqtt", "share_group", "a/b", "mqtt.share_group"),
    ("server", "workers", 0, "server.workers: must be between 1 and 256"),
    ("server", "log_level", "loud", "server.log_level: must be one of"),
    ("server", "database_url", "fleet.db", "server.database_url"),
    ("updates", "timestamp_expiry", 0, "updates.timestamp_expiry: must be >= 1"),
    ("updates", "timestamp_expiry", 900000.0, "updates.timestamp_expiry: must not be longer than "
                                              "updates.snapshot_expiry"),
])
def test_config_errors_name_the_key(
        tmp_path: Path, table: str, key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({table: {key: value}}, base=tmp_path)
    assert message in exc.value.diagnostics()


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "server.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    bad.write_text('[server]\ndata_dir = "data"\n[extra]\n')
    with pytest.raises(ConfigError, match="extra: unknown key"):
        load_config(bad)
    bad.write_text('[server]\ndata_dir = "data"\n')
    config = load_config(bad)
    assert config.data_dir == tmp_path / "data"
    assert config.signing_key == tmp_path / "data/keys/result-signing.key"
    assert tomllib.loads(bad.read_text())  # sanity


def test_init_warns_when_a_kept_configuration_points_the_workers_at_the_device_listener(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = data_dir / "server.toml"
    config.write_text(config.read_text().replace("port = 18884", "port = 18883"))  # an older layout
    status, out, _ = _run(capsys, "init", "--data-dir", str(data_dir), "--mqtt-port", "18883",
                          "--server-mqtt-port", "18884")
    assert status == 0
    assert "WARNING" in out and "mqtt.port 18883 is the device listener" in out and "18884" in out
    config.write_text(config.read_text().replace("port = 18883", "port = 18884"))
    status, out, _ = _run(capsys, "init", "--data-dir", str(data_dir), "--mqtt-port", "18883",
                          "--server-mqtt-port", "18884")
    assert status == 0 and "WARNING" not in out


def test_revoke_succeeds_and_says_so_when_the_crl_cannot_be_written(
        data_dir: Path, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    _pending_device(config, "cam-8")
    assert _run(capsys, "device", "approve", "cam-8", "--config", config)[0] == 0
    key = data_dir / "pki/fleet-ca.key"
    key.rename(data_dir / "offline-ca.key")  # the CA key kept off this host
    status, out, err = _run(capsys, "device", "revoke", "cam-8", "--config", config)
    assert status == 0 and "enrolled -> revoked" in out and err == ""
    assert "WARNING: the CRL" in out and "fleet-server device crl" in out
    status, _, err = _run(capsys, "device", "crl", "--config", config)
    assert status == 1 and err.count("\n") == 1 and "Traceback" not in err
