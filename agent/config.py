"""The agent's configuration: one TOML file, read strictly into a frozen :class:`AgentConfig`.

Example (every key is described in ``docs/agent.md``)::

    device_id = "cam-0042"
    device_class = "camera"
    firmware_version = "1.4.2"
    state_dir = "/var/lib/edge-agent"
    eventlog = "/sys/kernel/security/tpm0/binary_bios_measurements"

    [tpm]
    tcti = "device:/dev/tpmrm0"
    ak_alg = "ecc"

    [mqtt]
    host = "mqtt.fleet.example"
    port = 8883
    ca_cert = "fleet-ca.pem"
    claim_cert = "claim.pem"
    claim_key = "claim.key"

    [server]
    signing_public_key = "server-signing.pem"

    [log]
    level = "info"

    [models]                      # optional: the model vault (docs/agent.md, "Model vault")
    signing_public_key = "model-signing.pub.pem"

    [inference]                   # optional: the local inference API
    socket = "/run/edge-agent/inference.sock"
    clients_file = "clients.toml"

    [update]                      # optional: signed A/B firmware updates (docs/updates.md)
    root_file = "update-root.json"
    boot_dir = "/boot/edge"

Strict: unknown keys and tables, wrong types and out-of-range values are refused with a
:class:`~protocol.errors.ConfigError` that names the key (``mqtt.port: ...``).  Relative paths are
resolved against the folder of the configuration file, so a configuration folder can be moved as a
whole.  Reading the file is the only I/O here; whether the files it names exist is checked where
they are used (the claim credential, for instance, is not needed once the device is enrolled).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError
from protocol.messages import NAME_RE
from protocol.topics import TopicError, validate_device_id

DEFAULT_EVENTLOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
DEFAULT_TCTI = "device:/dev/tpmrm0"
AK_ALGS = ("ecc", "rsa")
EK_ALGS = ("rsa", "ecc")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("kv", "json")
MAX_CONFIG_BYTES = 64 * 1024
_HOST_RE = re.compile(r"[A-Za-z0-9.:\-\[\]]{1,253}")


@dataclass(frozen=True, slots=True)
class TpmConfig:
    """``[tpm]``: how to reach the TPM and which keys to use."""

    tcti: str = DEFAULT_TCTI
    ak_alg: str = "ecc"
    ek_alg: str = "rsa"


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """``[mqtt]``: the broker, the TLS trust anchor, the claim credential and reconnect pacing."""

    host: str
    port: int
    ca_cert: Path
    claim_cert: Path
    claim_key: Path
    keepalive: int = 30
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: the pinned result-signing key and how server messages are judged."""

    signing_public_key: Path
    max_clock_skew: float = 300.0
    """Seconds a signed message's ``ts`` may differ from the agent's clock (either direction)."""
    enroll_retry: float = 300.0
    """Seconds without a final enrollment answer after which ``enroll.request`` is sent again."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: level and line format of the agent's log (stderr)."""

    level: str = "info"
    format: str = "kv"


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    """``[models]``: the model vault (protected model packages, key release, leases, telemetry)."""

    signing_public_key: Path
    """The pinned model-signing public key (ECDSA P-256): package manifests must be signed with it."""
    telemetry_interval: float = 300.0
    """Seconds between usage telemetry messages (one per model with activity)."""
    offline_grace: float | None = None
    """If set: seconds a model stays unlocked without a lease renewal, even if the server's lease is
    longer (it can only shorten a lease, never extend it)."""
    fetch_window: int = 4
    """Package chunk requests outstanding at once."""
    fetch_chunk: int = 256 * 1024
    """Bytes asked for per chunk request."""
    fetch_timeout: float = 30.0
    """Seconds after which an unanswered chunk request is sent again."""
    max_package_size: int = 2**31 + 16 * 1024 * 1024
    """Largest package the agent downloads (bytes)."""
    key_retry: float = 30.0
    """Seconds before an unanswered key request is sent again."""
    counter_save_requests: int = 1000
    """Served requests after which the quota counters are saved (and the TPM NV counter incremented)."""
    counter_save_interval: float = 60.0
    """Seconds after which changed quota counters are saved at the latest."""
    ort_threads: int = 1
    """onnxruntime intra-op threads per model."""
    harden_process: bool = True
    """Disable core dumps and ptrace attach for the agent process (``RLIMIT_CORE=0``, not dumpable)."""


@dataclass(frozen=True, slots=True)
class InferenceConfig:
    """``[inference]``: the local inference API for applications on the device."""

    clients_file: Path
    """TOML file: client id -> token SHA-256 (and optional limits); see docs/agent.md."""
    socket: Path | None = None
    """Unix socket path (mode 0600); exclusive with ``port``."""
    port: int | None = None
    """Loopback TCP port (``0``: an ephemeral port); exclusive with ``socket``."""
    audit_max_bytes: int = 8 * 1024 * 1024
    """Size at which the audit log is rotated."""
    audit_keep: int = 4
    """Rotated audit files kept (``audit.jsonl.1`` ... ``.N``)."""


HEALTH_CHECKS = ("config", "tpm")
"""Local checks a trial boot must pass before the agent commits it (docs/agent.md, "Firmware updates"):
the configuration file loads, the TPM answers a PCR read.  That the booted slot holds the assigned
release is always checked."""
DEFAULT_MAX_TARGET = 512 * 1024 * 1024
DEFAULT_FLOOR_INDEX = 0x01800A02
DEFAULT_REBOOT_COMMAND = ("systemctl", "reboot")
NV_OWNER_RANGE = (0x01800000, 0x01BFFFFF)


@dataclass(frozen=True, slots=True)
class UpdateConfig:
    """``[update]``: signed updates through the fleet's TUF repository (fetched over MQTT), installed A/B."""

    boot_dir: Path | None = None
    """Holds ``bootctl.json`` and the slot folders ``slot-a/``, ``slot-b/`` (agent.update.bootctl);
    required for firmware updates."""
    root_file: Path | None = None
    """The update repository's root metadata the device is provisioned with (``fleet-server updates
    root --out FILE``): the trust anchor of every update; required unless the embedding program
    passes its own verified target source."""
    max_target_size: int = DEFAULT_MAX_TARGET
    """Largest firmware target the agent downloads (bytes)."""
    boot_tries: int = 1
    """Boots the bootloader tries the trial slot before it falls back to the active one."""
    floor_nv_index: int = DEFAULT_FLOOR_INDEX
    """TPM NV index of the firmware anti-rollback floor (owner range)."""
    health_checks: tuple[str, ...] = HEALTH_CHECKS
    """Which of :data:`HEALTH_CHECKS` a trial must pass before it is committed."""
    fetch_chunk: int = 256 * 1024
    """Bytes asked for per ``tuf-fetch`` request."""
    fetch_timeout: float = 10.0
    """Seconds after which an unanswered ``tuf-fetch`` request is sent again."""
    fetch_attempts: int = 3
    """Requests per chunk before the download fails."""
    reboot_command: tuple[str, ...] = DEFAULT_REBOOT_COMMAND
    """What ``edge-agent run`` executes to reboot into a trial slot or back (program and arguments,
    no shell); programs embedding the agent pass their own rebooter instead."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent is configured with (see :func:`load_config`)."""

    device_id: str
    device_class: str
    firmware_version: str
    state_dir: Path
    eventlog: Path
    tpm: TpmConfig
    mqtt: MqttConfig
    server: ServerConfig
    log: LogConfig
    source: Path | None = None
    """The file this configuration was read from, if any."""
    models: ModelsConfig | None = None
    """``[models]``, or ``None`` when the model vault is not configured."""
    inference: InferenceConfig | None = None
    """``[inference]``, or ``None`` when no local inference API is configured."""
    update: UpdateConfig | None = None
    """``[update]``, or ``None`` when the device takes no signed updates."""

    @property
    def status_path(self) -> Path:
        """The status file the running agent keeps up to date (``edge-agent status`` reads it)."""
        return self.state_dir / "status.json"


class _Table:
    """Strict reader of one TOML table: every key is taken once, leftovers are errors."""

    def __init__(self, data: Mapping[str, Any], where: str, base: Path) -> None:
        self._data = dict(data)
        self._where = where
        self._base = base

    def _name(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def _take(self, key: str, required: bool) -> Any:
        if key not in self._data:
            if required:
                raise ConfigError(f"{self._name(key)}: missing (required)")
            return None
        return self._data.pop(key)

    def text(self, key: str, default: str | None = None, *, choices: tuple[str, ...] = (),
             pattern: re.Pattern[str] | None = None, max_len: int = 256) -> str:
        value = self._take(key, default is None)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self._name(key)}: expected a non-empty string")
        if len(value) > max_len:
            raise ConfigError(f"{self._name(key)}: longer than {max_len} characters")
        if choices and value not in choices:
            raise ConfigError(f"{self._name(key)}: {value[:40]!r} is not one of {', '.join(choices)}")
        if pattern is not None and pattern.fullmatch(value) is None:
            raise ConfigError(f"{self._name(key)}: invalid value {value[:40]!r}")
        return value

    def integer(self, key: str, default: int | None = None, *, lo: int, hi: int) -> int:
        value = self._take(key, default is None)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self._name(key)}: expected an integer")
        if not lo <= value <= hi:
            raise ConfigError(f"{self._name(key)}: {value} is outside {lo}..{hi}")
        return value

    def seconds(self, key: str, default: float, *, lo: float, hi: float) -> float:
        value = self._take(key, False)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{self._name(key)}: expected a number of seconds")
        if not lo <= value <= hi:
            raise ConfigError(f"{self._name(key)}: {value} is outside {lo:g}..{hi:g} seconds")
        return float(value)

    def path(self, key: str, default: Path | None = None) -> Path:
        value = self._take(key, default is None)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            raise ConfigError(f"{self._name(key)}: expected a file path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self._base / path)

    def has(self, key: str) -> bool:
        """True if ``key`` is present (not yet taken)."""
        return key in self._data

    def flag(self, key: str, default: bool) -> bool:
        value = self._take(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)}: expected true or false")
        return value

    def choice_list(self, key: str, default: tuple[str, ...], *, choices: tuple[str, ...]) -> tuple[str, ...]:
        value = self._take(key, False)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._name(key)}: expected a list of strings")
        for v in value:
            if v not in choices:
                raise ConfigError(f"{self._name(key)}: {v[:40]!r} is not one of {', '.join(choices)}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{self._name(key)}: an entry is repeated")
        return tuple(value)

    def text_list(self, key: str, default: tuple[str, ...], *, max_items: int = 32,
                  max_len: int = 1024) -> tuple[str, ...]:
        """A non-empty list of non-empty strings (e.g. a command and its arguments)."""
        value = self._take(key, False)
        if value is None:
            return default
        if not isinstance(value, list) or not value or len(value) > max_items \
                or not all(isinstance(v, str) and v and len(v) <= max_len and "\x00" not in v for v in value):
            raise ConfigError(f"{self._name(key)}: expected a list of 1..{max_items} non-empty strings")
        return tuple(value)

    def table(self, key: str) -> _Table:
        value = self._take(key, False)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self._name(key)}: expected a table ([{self._name(key)}])")
        return _Table(value, self._name(key), self._base)

    def done(self) -> None:
        if self._data:
            key = sorted(self._data)[0]
            raise ConfigError(f"{self._name(key)}: unknown key")


def parse_config(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> AgentConfig:
    """Build an :class:`AgentConfig` from parsed TOML; relative paths are taken from ``base``."""
    top = _Table(data, "", Path(base))
    device_id = top.text("device_id", max_len=63)
    try:
        validate_device_id(device_id)
    except TopicError as exc:
        raise ConfigError(f"device_id: {exc.diagnostics()}") from None
    device_class = top.text("device_class", pattern=NAME_RE, max_len=64)
    firmware_version = top.text("firmware_version", pattern=NAME_RE, max_len=64)
    state_dir = top.path("state_dir")
    eventlog = top.path("eventlog", DEFAULT_EVENTLOG)

    t = top.table("tpm")
    tpm = TpmConfig(tcti=t.text("tcti", DEFAULT_TCTI), ak_alg=t.text("ak_alg", "ecc", choices=AK_ALGS),
                    ek_alg=t.text("ek_alg", "rsa", choices=EK_ALGS))
    t.done()

    m = top.table("mqtt")
    mqtt = MqttConfig(host=m.text("host", pattern=_HOST_RE), port=m.integer("port", 8883, lo=1, hi=65535),
                      ca_cert=m.path("ca_cert"), claim_cert=m.path("claim_cert"),
                      claim_key=m.path("claim_key"),
                      keepalive=m.integer("keepalive", 30, lo=5, hi=3600),
                      reconnect_min=m.seconds("reconnect_min", 0.5, lo=0.01, hi=3600),
                      reconnect_max=m.seconds("reconnect_max", 60.0, lo=0.01, hi=86400))
    m.done()
    if mqtt.reconnect_min > mqtt.reconnect_max:
        raise ConfigError("mqtt.reconnect_min: must not exceed mqtt.reconnect_max")

    s = top.table("server")
    server = ServerConfig(signing_public_key=s.path("signing_public_key"),
                          max_clock_skew=s.seconds("max_clock_skew", 300.0, lo=1, hi=86400),
                          enroll_retry=s.seconds("enroll_retry", 300.0, lo=1, hi=86400))
    s.done()

    lg = top.table("log")
    log = LogConfig(level=lg.text("level", "info", choices=LOG_LEVELS),
                    format=lg.text("format", "kv", choices=LOG_FORMATS))
    lg.done()
    models = _models(top.table("models")) if top.has("models") else None
    inference = _inference(top.table("inference")) if top.has("inference") else None
    update = _update(top.table("update")) if top.has("update") else None
    if inference is not None and models is None:
        raise ConfigError("inference: needs a [models] table (the inference API serves the model vault)")
    top.done()
    return AgentConfig(device_id=device_id, device_class=device_class, firmware_version=firmware_version,
                       state_dir=state_dir, eventlog=eventlog, tpm=tpm, mqtt=mqtt, server=server, log=log,
                       source=source, models=models, inference=inference, update=update)


def _models(t: _Table) -> ModelsConfig:
    grace = t.seconds("offline_grace", -1.0, lo=1, hi=30 * 86400) if t.has("offline_grace") else None
    out = ModelsConfig(
        signing_public_key=t.path("signing_public_key"),
        telemetry_interval=t.seconds("telemetry_interval", 300.0, lo=1, hi=86400),
        offline_grace=grace,
        fetch_window=t.integer("fetch_window", 4, lo=1, hi=64),
        fetch_chunk=t.integer("fetch_chunk", 256 * 1024, lo=1024, hi=256 * 1024),
        fetch_timeout=t.seconds("fetch_timeout", 30.0, lo=0.1, hi=3600),
        max_package_size=t.integer("max_package_size", 2**31 + 16 * 1024 * 1024, lo=1024, hi=8 << 30),
        key_retry=t.seconds("key_retry", 30.0, lo=0.1, hi=86400),
        counter_save_requests=t.integer("counter_save_requests", 1000, lo=1, hi=10**9),
        counter_save_interval=t.seconds("counter_save_interval", 60.0, lo=0.1, hi=86400),
        ort_threads=t.integer("ort_threads", 1, lo=1, hi=64),
        harden_process=t.flag("harden_process", True))
    t.done()
    return out


def _inference(t: _Table) -> InferenceConfig:
    socket = t.path("socket") if t.has("socket") else None
    port = t.integer("port", lo=0, hi=65535) if t.has("port") else None
    if (socket is None) == (port is None):
        raise ConfigError("inference: set exactly one of socket (a Unix socket path) or port (loopback TCP)")
    out = InferenceConfig(clients_file=t.path("clients_file"), socket=socket, port=port,
                          audit_max_bytes=t.integer("audit_max_bytes", 8 * 1024 * 1024, lo=4096, hi=1 << 40),
                          audit_keep=t.integer("audit_keep", 4, lo=1, hi=100))
    t.done()
    return out


def _update(t: _Table) -> UpdateConfig:
    boot_dir = t.path("boot_dir") if t.has("boot_dir") else None
    root_file = t.path("root_file") if t.has("root_file") else None
    if boot_dir is None and root_file is None:
        raise ConfigError("update: needs boot_dir (A/B firmware slots) and root_file (the update root)")
    out = UpdateConfig(boot_dir=boot_dir, root_file=root_file,
                       max_target_size=t.integer("max_target_size", DEFAULT_MAX_TARGET, lo=1024,
                                                 hi=DEFAULT_MAX_TARGET),
                       boot_tries=t.integer("boot_tries", 1, lo=1, hi=10),
                       floor_nv_index=t.integer("floor_nv_index", DEFAULT_FLOOR_INDEX, lo=NV_OWNER_RANGE[0],
                                                hi=NV_OWNER_RANGE[1]),
                       health_checks=t.choice_list("health_checks", HEALTH_CHECKS, choices=HEALTH_CHECKS),
                       fetch_chunk=t.integer("fetch_chunk", 256 * 1024, lo=1024, hi=256 * 1024),
                       fetch_timeout=t.seconds("fetch_timeout", 10.0, lo=0.1, hi=3600),
                       fetch_attempts=t.integer("fetch_attempts", 3, lo=1, hi=100),
                       reboot_command=t.text_list("reboot_command", DEFAULT_REBOOT_COMMAND))
    t.done()
    return out


def load_config(path: Path) -> AgentConfig:
    """Read and check the TOML file at ``path`` (:class:`ConfigError` naming the key on any problem)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"configuration {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"configuration {path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration {path} is not valid TOML: {exc}") from None
    base = path.resolve().parent
    return parse_config(data, base=base, source=path)
