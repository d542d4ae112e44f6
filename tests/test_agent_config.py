"""agent.config: strict TOML parsing, defaults, relative paths, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_EVENTLOG, DEFAULT_TCTI, AgentConfig, load_config
from protocol.errors import ConfigError

MINIMAL = """
device_id = "cam-0001"
device_class = "camera"
firmware_version = "1.4.2"
state_dir = "state"

[mqtt]
host = "mqtt.fleet.example"
ca_cert = "fleet-ca.pem"
claim_cert = "claim/claim.pem"
claim_key = "claim/claim.key"

[server]
signing_public_key = "/etc/edge-agent/server.pem"
"""


HOST = 'host = "mqtt.fleet.example"'
KEY = 'signing_public_key = "/etc/edge-agent/server.pem"'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "agent.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_configuration_gets_defaults_and_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    folder = (tmp_path / "conf").resolve()
    assert isinstance(cfg, AgentConfig)
    assert (cfg.device_id, cfg.device_class, cfg.firmware_version) == ("cam-0001", "camera", "1.4.2")
    assert cfg.state_dir == folder / "state"
    assert cfg.status_path == folder / "state" / "status.json"
    assert cfg.eventlog == DEFAULT_EVENTLOG
    assert (cfg.tpm.tcti, cfg.tpm.ak_alg, cfg.tpm.ek_alg) == (DEFAULT_TCTI, "ecc", "rsa")
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.keepalive) == ("mqtt.fleet.example", 8883, 30)
    assert cfg.mqtt.ca_cert == folder / "fleet-ca.pem"
    assert cfg.mqtt.claim_cert == folder / "claim" / "claim.pem"
    assert (cfg.mqtt.reconnect_min, cfg.mqtt.reconnect_max) == (0.5, 60.0)
    assert cfg.server.signing_public_key == Path("/etc/edge-agent/server.pem")  # absolute: kept
    assert (cfg.server.max_clock_skew, cfg.server.enroll_retry) == (300.0, 300.0)
    assert (cfg.log.level, cfg.log.format) == ("info", "kv")


def test_every_key_set(tmp_path: Path) -> None:
    text = MINIMAL.replace('state_dir = "state"', 'state_dir = "/var/lib/edge-agent"\neventlog = "log.bin"')
    text += """
[tpm]
tcti = "swtpm:host=127.0.0.1,port=2321"
ak_alg = "rsa"
ek_alg = "ecc"

[log]
level = "debug"
format = "json"
"""
    text = text.replace('claim_key = "claim/claim.key"', 'claim_key = "claim/claim.key"\nport = 18883\n'
                        'keepalive = 60\nreconnect_min = 1\nreconnect_max = 120.5')
    text = text.replace(KEY, KEY + '\nmax_clock_skew = 30\nenroll_retry = 600')
    cfg = load_config(write(tmp_path, text))
    assert cfg.state_dir == Path("/var/lib/edge-agent")
    assert cfg.eventlog == (tmp_path / "conf").resolve() / "log.bin"
    assert (cfg.tpm.tcti, cfg.tpm.ak_alg, cfg.tpm.ek_alg) == ("swtpm:host=127.0.0.1,port=2321", "rsa", "ecc")
    assert (cfg.mqtt.port, cfg.mqtt.keepalive, cfg.mqtt.reconnect_min, cfg.mqtt.reconnect_max) == \
        (18883, 60, 1.0, 120.5)
    assert (cfg.server.max_clock_skew, cfg.server.enroll_retry) == (30.0, 600.0)
    assert (cfg.log.level, cfg.log.format) == ("debug", "json")


def edit(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new)


@pytest.mark.parametrize(("text", "message"), [
    (edit('device_id = "cam-0001"\n', ""), r"^device_id: missing"),
    (edit('"cam-0001"', '"Cam_1"'), r"^device_id: invalid device id"),
    (edit('"cam-0001"', '"fleet-server"'), r"^device_id: .*reserved"),
    (edit('"cam-0001"', "42"), r"^device_id: expected a non-empty string"),
    (edit('"camera"', '"has space"'), r"^device_class: invalid value"),
    (edit('"1.4.2"', '""'), r"^firmware_version: expected a non-empty string"),
    (MINIMAL + 'colour = "blue"\n', r"^server\.colour: unknown key"),  # lands in the last table
    ('extra = 1\n' + MINIMAL, r"^extra: unknown key"),
    (MINIMAL + "[agent]\nx = 1\n", r"^agent: unknown key"),
    (edit(HOST, HOST + '\nhots = "typo"'), r"^mqtt\.hots: unknown key"),
    (edit(HOST, 'host = "a b"'), r"^mqtt\.host: invalid value"),
    (edit(HOST, 'host = "h"\nport = "8883"'), r"^mqtt\.port: expected an integer"),
    (edit(HOST, 'host = "h"\nport = 0'), r"^mqtt\.port: 0 is outside 1\.\.65535"),
    (edit(HOST, 'host = "h"\nport = true'), r"^mqtt\.port: expected an integer"),
    (edit('ca_cert = "fleet-ca.pem"\n', ""), r"^mqtt\.ca_cert: missing"),
    (edit('ca_cert = "fleet-ca.pem"', "ca_cert = 5"), r"^mqtt\.ca_cert: expected a file path"),
    (edit(HOST, 'host = "h"\nreconnect_min = 10\nreconnect_max = 5'),
     r"^mqtt\.reconnect_min: must not exceed"),
    (edit(HOST, 'host = "h"\nreconnect_max = "soon"'),
     r"^mqtt\.reconnect_max: expected a number"),
    (edit(KEY + '\n', ""), r"^server\.signing_public_key: missing"),
    (edit(KEY, 'signing_public_key = "k"\nmax_clock_skew = 0'),
     r"^server\.max_clock_skew: 0 is outside"),
    (MINIMAL + '[tpm]\nak_alg = "dsa"\n', r"^tpm\.ak_alg: 'dsa' is not one of ecc, rsa"),
    (MINIMAL + '[tpm]\ntcti = ""\n', r"^tpm\.tcti: expected a non-empty string"),
    (MINIMAL + '[log]\nlevel = "loud"\n', r"^log\.level: 'loud' is not one of"),
    (MINIMAL + '[log]\nformat = "xml"\n', r"^log\.format: 'xml' is not one of kv, json"),
    (MINIMAL.replace("[mqtt]", "mqtt = 3\n[mqttx]"), r"^mqtt: expected a table"),
    ("device_id = \n", r"is not valid TOML"),
])
def test_configuration_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, text))
    assert "\n" not in err.value.diagnostics()


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'device_id = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
    path.write_bytes(b"# " + b"x" * 70_000)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)
