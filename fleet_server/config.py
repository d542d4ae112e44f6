"""Fleet server configuration: one TOML file (``server.toml``), read once, validated strictly.

Every value is checked when the file is loaded, and an unknown key, a wrong type or an out-of-range
value raises :class:`ConfigError` naming the key (``attestation.interval: must be > 0``), so that a
typo never silently falls back to a default. Relative paths are relative to ``server.data_dir``,
and ``data_dir`` itself is relative to the folder of the configuration file.

Layout (every key optional unless marked; defaults shown)::

    [server]
    data_dir = "."                        # relative to this file
    database_url = "sqlite:///<data_dir>/fleet.db"   # any SQLAlchemy URL, e.g. postgresql+psycopg://...
    workers = 1                           # processes started by `fleet-server run`
    log_level = "info"                    # debug | info | warning | error
    log_file = "logs/fleet-server.log"    # structured lines; tracebacks go only here
    signing_key = "keys/result-signing.key"          # ECDSA P-256, 0600; agents pin its public key
    fleet_ca_cert = "pki/fleet-ca.pem"
    fleet_ca_key = "pki/fleet-ca.key"     # signs device certificates at enrollment (0600)
    trust_bundle = "trust/tpm-manufacturers.pem"     # PEM CAs of trusted TPM manufacturers
    batch_size = 64                       # inbound messages handled per database transaction
    batch_linger = 0.02                   # seconds to wait for more messages after the first of a batch
    cache_devices = 5000                  # devices whose parsed held log / AK a worker keeps in memory

    [mqtt]
    host = "127.0.0.1"
    port = 8883
    ca_cert = "pki/fleet-ca.pem"
    cert = "pki/fleet-server.pem"
    key = "pki/fleet-server.key"
    share_group = "fleet-workers"
    queue_size = 1000
    max_inflight = 64
    keepalive = 30
    reply_qos = 0                         # QoS of replies (challenges, results); the outbox uses 1

    [attestation]
    interval = 300.0                      # seconds between periodic attestations of a device
    jitter = 30.0                         # +- seconds added to each interval
    challenge_timeout = 30.0              # seconds a device has to answer a challenge
    missed_challenges_limit = 3           # consecutive misses -> unreachable
    result_grace = 60.0                   # result expiry = now + 2 * interval + grace
    request_min_interval = 1.0            # at most one new challenge per device per this many seconds
    allow_sha1 = false
    enrollment_timeout = 300.0            # seconds between enroll.challenge and enroll.proof
    scheduler_tick = 1.0                  # seconds between scheduler rounds of a worker
    claim_batch = 200                     # devices claimed per scheduler round
    selection = { sha256 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14] }   # when no policy names one

    [retention]
    attestation_days = 30.0               # attestation rows older than this are deleted
    challenge_hours = 24.0                # answered/expired challenges older than this are deleted

    [console]                             # the admin web console (docs/operations.md)
    enabled = false                       # also serve it from `fleet-server run` (a thread)
    host = "127.0.0.1"
    port = 8080
    threads = 8                           # waitress worker threads
    secure_cookies = true                 # false only for plain-http local development/demo
    development = false                   # Flask debug mode; never in production
    proxy_hops = 0                        # trusted reverse proxies setting X-Forwarded-For/-Proto
    session_idle_minutes = 30.0
    session_max_hours = 12.0
    login_max_failures = 5                # per user name within the window -> lockout
    login_max_failures_ip = 20            # per client address within the window -> lockout
    login_window_minutes = 15.0
    lockout_minutes = 15.0
    argon2_time_cost = 3                  # argon2id parameters of new password hashes
    argon2_memory_kib = 65536
    argon2_parallelism = 2
    dashboard_refresh_seconds = 5.0
    max_upload_mib = 512                  # largest model upload (console and POST /api/v1/models)
    metrics_token_sha256 = ""             # SHA-256 (hex) of a scrape-only bearer token for /metrics

    [models]                              # model protection (docs/model-protection.md)
    store_dir = "models"                  # encrypted packages: <store_dir>/<name>/<version>.pkg
    signing_key = "keys/model-signing.key"   # ECDSA P-256, 0600: signs package manifests
    kek_file = "keys/model-kek.key"       # 0600, 64 hex digits; $FLEET_SERVER_KEK overrides it
    lease_duration = 660.0                # default 2 * attestation.interval + attestation.result_grace
    offline_grace = 0.0                   # added to every lease: how long a device may run offline

    [audit]                               # the audit log (docs/operations.md)
    checkpoint_key = "keys/audit-checkpoint.key"   # Ed25519, 0600: signs checkpoints of the chain head
    checkpoint_interval = 100             # a signed checkpoint at least every this many entries

    [alerts]
    business_hours = "08:00-18:00"        # UTC; optional (no off-hours rule without it)
    block_off_hours = false               # also refuse key releases and downloads off hours

    [updates]                             # the TUF update repository (docs/updates.md)
    dir = "updates"                       # metadata/, targets/, keys/ (0700), pending/
    root_expiry = 31536000.0              # seconds each new version of a role is valid
    targets_expiry = 31536000.0           # targets and the delegated roles firmware, models
    snapshot_expiry = 604800.0            # online key; `run` renews it when half is left
    timestamp_expiry = 86400.0            # online key; `run` renews it when half is left
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_server.keybroker.hours import BusinessHours
from protocol.errors import ConfigError, MessageError
from protocol.messages import PcrSelection, selection_from_json
from protocol.topics import SHARE_GROUP, TopicError, server_subscriptions

CONFIG_ENV = "FLEET_SERVER_CONFIG"
DEFAULT_CONFIG_NAME = "server.toml"
DEFAULT_SELECTION: dict[str, tuple[int, ...]] = {"sha256": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14)}
LOG_LEVELS = ("debug", "info", "warning", "error")

# Default file names inside the data folder (what `fleet-server init` creates).
PKI_DIR = "pki"
KEYS_DIR = "keys"
TRUST_DIR = "trust"
LOGS_DIR = "logs"
FLEET_CA_CERT = f"{PKI_DIR}/fleet-ca.pem"
FLEET_CA_KEY = f"{PKI_DIR}/fleet-ca.key"
FLEET_CA_CRL = f"{PKI_DIR}/fleet-ca.crl.pem"
CRL_LIFETIME = 30 * 86400.0
BROKER_CERT = f"{PKI_DIR}/broker.pem"
BROKER_KEY = f"{PKI_DIR}/broker.key"
SERVER_CLIENTS_CA_CERT = f"{PKI_DIR}/server-clients-ca.pem"
SERVER_CLIENTS_CA_KEY = f"{PKI_DIR}/server-clients-ca.key"
SERVER_CERT = f"{PKI_DIR}/fleet-server.pem"
SERVER_KEY = f"{PKI_DIR}/fleet-server.key"
SIGNING_KEY = f"{KEYS_DIR}/result-signing.key"
SIGNING_PUBLIC = f"{KEYS_DIR}/result-signing.pub.pem"
TRUST_BUNDLE = f"{TRUST_DIR}/tpm-manufacturers.pem"
UPDATES_DIR = "updates"
MODELS_DIR = "models"
MODEL_SIGNING_KEY = f"{KEYS_DIR}/model-signing.key"
MODEL_SIGNING_PUBLIC = f"{KEYS_DIR}/model-signing.pub.pem"
MODEL_KEK = f"{KEYS_DIR}/model-kek.key"
AUDIT_CHECKPOINT_KEY = f"{KEYS_DIR}/audit-checkpoint.key"
AUDIT_CHECKPOINT_PUBLIC = f"{KEYS_DIR}/audit-checkpoint.pub.pem"
LOG_FILE = f"{LOGS_DIR}/fleet-server.log"


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Connection of the workers to the broker (mutual TLS, client certificate CN ``fleet-server``)."""

    host: str = "127.0.0.1"
    port: int = 8883
    ca_cert: Path = Path(FLEET_CA_CERT)
    cert: Path = Path(SERVER_CERT)
    key: Path = Path(SERVER_KEY)
    share_group: str = SHARE_GROUP
    queue_size: int = 1000
    max_inflight: int = 64
    keepalive: int = 30
    reply_qos: int = 0
    """QoS of challenges, results and enrollment answers (the outbox always uses QoS 1): sessions are
    clean and the broker keeps nothing for offline devices, so QoS 1 would only confirm the hop to
    the broker, at a high CPU cost per message; a lost reply is recovered by the protocol (the
    device asks again, an unanswered challenge expires)."""


@dataclass(frozen=True, slots=True)
class AttestationSettings:
    """Timing and policy defaults of challenges and results. Durations in seconds."""

    interval: float = 300.0
    jitter: float = 30.0
    challenge_timeout: float = 30.0
    missed_challenges_limit: int = 3
    result_grace: float = 60.0
    request_min_interval: float = 1.0
    allow_sha1: bool = False
    enrollment_timeout: float = 300.0
    scheduler_tick: float = 1.0
    claim_batch: int = 200
    selection: PcrSelection = field(default_factory=lambda: dict(DEFAULT_SELECTION))

    @property
    def interval_ms(self) -> int:
        return round(self.interval * 1000)

    @property
    def jitter_ms(self) -> int:
        return round(self.jitter * 1000)

    @property
    def challenge_timeout_ms(self) -> int:
        return round(self.challenge_timeout * 1000)

    @property
    def result_grace_ms(self) -> int:
        return round(self.result_grace * 1000)

    @property
    def request_min_interval_ms(self) -> int:
        return round(self.request_min_interval * 1000)

    @property
    def enrollment_timeout_ms(self) -> int:
        return round(self.enrollment_timeout * 1000)

    @property
    def result_validity_ms(self) -> int:
        """How long a verdict stays valid: two intervals plus the grace (docs/attestation-service.md)."""
        return 2 * self.interval_ms + self.result_grace_ms


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """How long history rows are kept."""

    attestation_days: float = 30.0
    challenge_hours: float = 24.0

    @property
    def attestation_ms(self) -> int:
        return round(self.attestation_days * 86_400_000)

    @property
    def challenge_ms(self) -> int:
        return round(self.challenge_hours * 3_600_000)


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """The admin web console (``fleet_server.console``): where it listens, sessions, login throttling,
    password hashing. Durations in the unit their name says."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int = 8
    secure_cookies: bool = True
    """Session cookies carry ``Secure`` (sent over HTTPS only). Turn off only for plain-http local
    development or the demo on http://127.0.0.1."""
    development: bool = False
    proxy_hops: int = 0
    session_idle_minutes: float = 30.0
    session_max_hours: float = 12.0
    login_max_failures: int = 5
    login_max_failures_ip: int = 20
    login_window_minutes: float = 15.0
    lockout_minutes: float = 15.0
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 2
    dashboard_refresh_seconds: float = 5.0
    max_upload_mib: int = 512
    """Largest model file accepted by an upload (console form and ``POST /api/v1/models``)."""
    metrics_token_sha256: str = ""
    """SHA-256 (lowercase hex) of a bearer token that may read ``/metrics`` and nothing else; empty:
    only principals with ``fleet:view`` may."""

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mib << 20

    @property
    def session_idle_ms(self) -> int:
        return round(self.session_idle_minutes * 60_000)

    @property
    def session_max_ms(self) -> int:
        return round(self.session_max_hours * 3_600_000)

    @property
    def login_window_ms(self) -> int:
        return round(self.login_window_minutes * 60_000)

    @property
    def lockout_ms(self) -> int:
        return round(self.lockout_minutes * 60_000)


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Model protection (docs/model-protection.md): package store, model-signing key, KEK, leases."""

    store_dir: Path = Path(MODELS_DIR)
    signing_key: Path = Path(MODEL_SIGNING_KEY)
    kek_file: Path = Path(MODEL_KEK)
    lease_duration: float | None = None
    """Seconds a key release (or its renewal by a trusted attestation) lasts; ``None``: as long as a
    verdict, 2 x attestation.interval + attestation.result_grace."""
    offline_grace: float = 0.0
    """Seconds added to every lease: how long a device keeps its model while it cannot attest."""

    def lease_ms(self, attestation: AttestationSettings) -> int:
        """How long a lease lasts from its release or renewal (ms): duration + offline grace."""
        base = (attestation.result_validity_ms if self.lease_duration is None
                else round(self.lease_duration * 1000))
        return base + round(self.offline_grace * 1000)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The audit log's signed checkpoints (:mod:`fleet_server.console.checkpoint`)."""

    checkpoint_key: Path = Path(AUDIT_CHECKPOINT_KEY)
    """Ed25519 private key (0600) signing checkpoints; its public key ``<stem>.pub.pem`` verifies them."""
    checkpoint_interval: int = 100
    """A checkpoint is signed automatically whenever this many entries follow the newest one."""


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Alert rules with settings: the business-hours window of key releases and model downloads."""

    business_hours: BusinessHours | None = None
    block_off_hours: bool = False

    def off_hours(self, now_ms: int) -> bool:
        """True if a business-hours window is set and ``now_ms`` is outside it."""
        return self.business_hours is not None and not self.business_hours.contains(now_ms)


@dataclass(frozen=True, slots=True)
class UpdateSettings:
    """The TUF update repository (:mod:`fleet_server.updates`): its folder and how long each new
    version of a role is valid (seconds). ``fleet-server run`` re-signs snapshot and timestamp (online
    keys) when less than half of their validity is left; the offline roles are re-signed by hand."""

    dir: Path = Path(UPDATES_DIR)
    root_expiry: float = 365 * 86400.0
    targets_expiry: float = 365 * 86400.0
    snapshot_expiry: float = 7 * 86400.0
    timestamp_expiry: float = 86400.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The whole configuration; paths are absolute after :func:`load_config`."""

    data_dir: Path
    database_url: str
    workers: int = 1
    log_level: str = "info"
    log_file: Path | None = None
    signing_key: Path = Path(SIGNING_KEY)
    fleet_ca_cert: Path = Path(FLEET_CA_CERT)
    fleet_ca_key: Path = Path(FLEET_CA_KEY)
    fleet_ca_crl: Path = Path(FLEET_CA_CRL)
    """The CRL of revoked device certificates the broker's device listener loads (``crlfile``)."""
    crl_lifetime: float = CRL_LIFETIME
    """Seconds a CRL is current (its ``nextUpdate``); ``fleet-server run`` renews it when less than a
    third is left (:mod:`fleet_server.service.crl`)."""
    broker_pid_file: Path | None = None
    """The pid file of a broker this server manages (Mosquitto ``pid_file``): after renewing the CRL,
    ``run`` sends that process SIGHUP so that it reloads it. Unset: the operator reloads the broker."""
    trust_bundle: Path = Path(TRUST_BUNDLE)
    batch_size: int = 64
    batch_linger: float = 0.02
    cache_devices: int = 5000
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    attestation: AttestationSettings = field(default_factory=AttestationSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    updates: UpdateSettings = field(default_factory=UpdateSettings)
    source: Path | None = None
    """The file this configuration was read from (for messages)."""


# --------------------------------------------------------------------------------------------------
# strict reading
# --------------------------------------------------------------------------------------------------
class _Table:
    """Reads keys out of one TOML table, refusing unknown keys and wrong types (naming the key)."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table")
        self._data = dict(data)
        self._where = where

    def _key(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def has(self, key: str) -> bool:
        return key in self._data

    def string(self, key: str, default: str, *, choices: tuple[str, ...] | None = None,
               max_len: int = 4096) -> str:
        value = self._data.pop(key, default)
        if not isinstance(value, str) or not value.strip() or len(value) > max_len:
            raise ConfigError(f"{self._key(key)}: expected a non-empty string")
        if choices is not None and value not in choices:
            raise ConfigError(f"{self._key(key)}: must be one of {', '.join(choices)}")
        return value

    def integer(self, key: str, default: int, *, lo: int, hi: int) -> int:
        value = self._data.pop(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected an integer")
        if not lo <= value <= hi:
            raise ConfigError(f"{self._key(key)}: must be between {lo} and {hi}")
        return value

    def number(self, key: str, default: float, *, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self._data.pop(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected a number")
        number = float(value)
        if number != number or not (lo < number if lo_open else lo <= number) or number > hi:
            bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
            raise ConfigError(f"{self._key(key)}: must be {bound} and <= {hi:g}")
        return number

    def flag(self, key: str, default: bool) -> bool:
        value = self._data.pop(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected true or false")
        return value

    def path(self, key: str, default: Path, base: Path) -> Path:
        value = self._data.pop(key, str(default))
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self._key(key)}: expected a path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path

    def optional_path(self, key: str, default: Path | None, base: Path) -> Path | None:
        if key not in self._data and default is None:
            return None
        return self.path(key, default or Path(), base)

    def table(self, key: str) -> _Table:
        return _Table(self._data.pop(key, {}), self._key(key))

    def raw(self, key: str) -> Any:
        return self._data.pop(key, None)

    def done(self) -> None:
        if self._data:
            raise ConfigError(f"{self._key(sorted(self._data)[0])}: unknown key")


def _selection(value: Any, where: str) -> PcrSelection:
    if value is None:
        return dict(DEFAULT_SELECTION)
    try:
        return selection_from_json(value, where)
    except MessageError as exc:
        raise ConfigError(exc.diagnostics()) from None


def parse_config(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> ServerConfig:
    """Build a :class:`ServerConfig` from parsed TOML; relative ``data_dir`` is taken from ``base``."""
    root = _Table(data, "")
    server = root.table("server")
    data_dir = server.path("data_dir", Path("."), Path(base)).resolve()
    default_url = f"sqlite:///{data_dir / 'fleet.db'}"
    database_url = server.string("database_url", default_url)
    if "://" not in database_url:
        raise ConfigError("server.database_url: expected an SQLAlchemy URL such as sqlite:///path/fleet.db")
    workers = server.integer("workers", 1, lo=1, hi=256)
    log_level = server.string("log_level", "info", choices=LOG_LEVELS)
    log_file = server.optional_path("log_file", Path(LOG_FILE), data_dir)
    signing_key = server.path("signing_key", Path(SIGNING_KEY), data_dir)
    fleet_ca_cert = server.path("fleet_ca_cert", Path(FLEET_CA_CERT), data_dir)
    fleet_ca_key = server.path("fleet_ca_key", Path(FLEET_CA_KEY), data_dir)
    fleet_ca_crl = server.path("fleet_ca_crl", Path(FLEET_CA_CRL), data_dir)
    crl_lifetime = server.number("crl_lifetime", CRL_LIFETIME, lo=1.0, hi=366 * 86400.0)
    broker_pid_file = server.optional_path("broker_pid_file", None, data_dir)
    trust_bundle = server.path("trust_bundle", Path(TRUST_BUNDLE), data_dir)
    batch_size = server.integer("batch_size", 64, lo=1, hi=10_000)
    batch_linger = server.number("batch_linger", 0.02, lo=0.0, hi=1.0)
    cache_devices = server.integer("cache_devices", 5000, lo=1, hi=10_000_000)
    server.done()

    mq = root.table("mqtt")
    share_group = mq.string("share_group", SHARE_GROUP, max_len=64)
    try:
        server_subscriptions(share_group)
    except TopicError:
        raise ConfigError("mqtt.share_group: letters, digits, '-' and '_' only (at most 64)") from None
    mqtt = MqttSettings(
        host=mq.string("host", "127.0.0.1", max_len=253),
        port=mq.integer("port", 8883, lo=1, hi=65535),
        ca_cert=mq.path("ca_cert", Path(FLEET_CA_CERT), data_dir),
        cert=mq.path("cert", Path(SERVER_CERT), data_dir),
        key=mq.path("key", Path(SERVER_KEY), data_dir),
        share_group=share_group,
        queue_size=mq.integer("queue_size", 1000, lo=1, hi=30_000),
        max_inflight=mq.integer("max_inflight", 64, lo=1, hi=30_000),
        keepalive=mq.integer("keepalive", 30, lo=5, hi=3600),
        reply_qos=mq.integer("reply_qos", 0, lo=0, hi=1),
    )
    mq.done()

    at = root.table("attestation")
    attestation = AttestationSettings(
        interval=at.number("interval", 300.0, lo=0.0, hi=30 * 86400.0, lo_open=True),
        jitter=at.number("jitter", 30.0, lo=0.0, hi=30 * 86400.0),
        challenge_timeout=at.number("challenge_timeout", 30.0, lo=0.0, hi=3600.0, lo_open=True),
        missed_challenges_limit=at.integer("missed_challenges_limit", 3, lo=1, hi=1000),
        result_grace=at.number("result_grace", 60.0, lo=0.0, hi=30 * 86400.0),
        request_min_interval=at.number("request_min_interval", 1.0, lo=0.0, hi=3600.0),
        allow_sha1=at.flag("allow_sha1", False),
        enrollment_timeout=at.number("enrollment_timeout", 300.0, lo=0.0, hi=86400.0, lo_open=True),
        scheduler_tick=at.number("scheduler_tick", 1.0, lo=0.0, hi=600.0, lo_open=True),
        claim_batch=at.integer("claim_batch", 200, lo=1, hi=100_000),
        selection=_selection(at.raw("selection"), "attestation.selection"),
    )
    at.done()
    if attestation.jitter >= attestation.interval:
        raise ConfigError("attestation.jitter: must be smaller than attestation.interval")

    rt = root.table("retention")
    retention = RetentionSettings(
        attestation_days=rt.number("attestation_days", 30.0, lo=0.0, hi=36500.0, lo_open=True),
        challenge_hours=rt.number("challenge_hours", 24.0, lo=0.0, hi=876000.0, lo_open=True),
    )
    rt.done()
    console = _console(root.table("console"))
    models = _models(root.table("models"), data_dir, attestation)
    alerts = _alerts(root.table("alerts"))
    au = root.table("audit")
    audit = AuditSettings(
        checkpoint_key=au.path("checkpoint_key", Path(AUDIT_CHECKPOINT_KEY), data_dir),
        checkpoint_interval=au.integer("checkpoint_interval", 100, lo=1, hi=1_000_000),
    )
    au.done()
    updates = _updates(root.table("updates"), data_dir)
    root.done()
    return ServerConfig(data_dir=data_dir, database_url=database_url, workers=workers, log_level=log_level,
                        log_file=log_file, signing_key=signing_key, fleet_ca_cert=fleet_ca_cert,
                        fleet_ca_key=fleet_ca_key, fleet_ca_crl=fleet_ca_crl, crl_lifetime=crl_lifetime,
                        broker_pid_file=broker_pid_file, trust_bundle=trust_bundle,
                        batch_size=batch_size,
                        batch_linger=batch_linger, cache_devices=cache_devices,
                        mqtt=mqtt, attestation=attestation, retention=retention, console=console,
                        models=models, alerts=alerts, audit=audit, updates=updates, source=source)


def _models(mt: _Table, data_dir: Path, attestation: AttestationSettings) -> ModelSettings:
    lease: float | None = None
    if mt.has("lease_duration"):
        lease = mt.number("lease_duration", 0.0, lo=0.0, hi=365 * 86400.0, lo_open=True)
        if lease <= attestation.interval + attestation.jitter:
            raise ConfigError("models.lease_duration: must be longer than attestation.interval + "
                              "attestation.jitter (leases would lapse between two renewals)")
    settings = ModelSettings(
        store_dir=mt.path("store_dir", Path(MODELS_DIR), data_dir),
        signing_key=mt.path("signing_key", Path(MODEL_SIGNING_KEY), data_dir),
        kek_file=mt.path("kek_file", Path(MODEL_KEK), data_dir),
        lease_duration=lease,
        offline_grace=mt.number("offline_grace", 0.0, lo=0.0, hi=365 * 86400.0),
    )
    mt.done()
    return settings


def _updates(ut: _Table, data_dir: Path) -> UpdateSettings:
    year = 366 * 86400.0
    settings = UpdateSettings(
        dir=ut.path("dir", Path(UPDATES_DIR), data_dir),
        root_expiry=ut.number("root_expiry", 365 * 86400.0, lo=60.0, hi=10 * year),
        targets_expiry=ut.number("targets_expiry", 365 * 86400.0, lo=60.0, hi=10 * year),
        snapshot_expiry=ut.number("snapshot_expiry", 7 * 86400.0, lo=1.0, hi=year),
        timestamp_expiry=ut.number("timestamp_expiry", 86400.0, lo=1.0, hi=year),
    )
    ut.done()
    if settings.timestamp_expiry > settings.snapshot_expiry:
        raise ConfigError("updates.timestamp_expiry: must not be longer than updates.snapshot_expiry")
    return settings


def _alerts(at: _Table) -> AlertSettings:
    hours: BusinessHours | None = None
    if at.has("business_hours"):
        text = at.string("business_hours", "", max_len=32)
        try:
            hours = BusinessHours.parse(text)
        except ConfigError as exc:
            raise ConfigError(f"alerts.business_hours: {exc.diagnostics()}") from None
    settings = AlertSettings(business_hours=hours, block_off_hours=at.flag("block_off_hours", False))
    at.done()
    return settings


def _sha256_hex(value: Any, where: str) -> str:
    """An optional SHA-256 in lowercase hex (empty or absent: none)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
        raise ConfigError(f"{where}: expected 64 lowercase hex digits (the SHA-256 of the token)")
    return value


def _console(ct: _Table) -> ConsoleSettings:
    settings = ConsoleSettings(
        enabled=ct.flag("enabled", False),
        host=ct.string("host", "127.0.0.1", max_len=253),
        port=ct.integer("port", 8080, lo=1, hi=65535),
        threads=ct.integer("threads", 8, lo=1, hi=256),
        secure_cookies=ct.flag("secure_cookies", True),
        development=ct.flag("development", False),
        proxy_hops=ct.integer("proxy_hops", 0, lo=0, hi=10),
        session_idle_minutes=ct.number("session_idle_minutes", 30.0, lo=0.0, hi=7 * 1440.0, lo_open=True),
        session_max_hours=ct.number("session_max_hours", 12.0, lo=0.0, hi=24 * 30.0, lo_open=True),
        login_max_failures=ct.integer("login_max_failures", 5, lo=1, hi=1000),
        login_max_failures_ip=ct.integer("login_max_failures_ip", 20, lo=1, hi=100_000),
        login_window_minutes=ct.number("login_window_minutes", 15.0, lo=0.0, hi=7 * 1440.0, lo_open=True),
        lockout_minutes=ct.number("lockout_minutes", 15.0, lo=0.0, hi=7 * 1440.0, lo_open=True),
        argon2_time_cost=ct.integer("argon2_time_cost", 3, lo=1, hi=100),
        argon2_memory_kib=ct.integer("argon2_memory_kib", 65536, lo=8, hi=4 * 1024 * 1024),
        argon2_parallelism=ct.integer("argon2_parallelism", 2, lo=1, hi=64),
        dashboard_refresh_seconds=ct.number("dashboard_refresh_seconds", 5.0, lo=1.0, hi=3600.0),
        max_upload_mib=ct.integer("max_upload_mib", 512, lo=1, hi=16384),
        metrics_token_sha256=_sha256_hex(ct.raw("metrics_token_sha256"), "console.metrics_token_sha256"),
    )
    ct.done()
    if settings.argon2_memory_kib < 8 * settings.argon2_parallelism:
        raise ConfigError("console.argon2_memory_kib: must be at least 8 * argon2_parallelism")
    return settings


def load_config(path: Path | str) -> ServerConfig:
    """Read and validate ``path``; :class:`ConfigError` (one line, naming the key) on any problem."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse_config(data, base=path.resolve().parent, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.diagnostics()}") from None


def find_config(explicit: str | Path | None, *, environ: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> Path:
    """The configuration file to use: ``explicit`` (``--config``), else ``$FLEET_SERVER_CONFIG``,
    else ``./server.toml``. Raises :class:`ConfigError` if the chosen file does not exist."""
    env = os.environ if environ is None else environ
    if explicit:
        chosen, how = Path(explicit), "--config"
    elif env.get(CONFIG_ENV):
        chosen, how = Path(env[CONFIG_ENV]), f"${CONFIG_ENV}"
    else:
        chosen, how = (cwd or Path.cwd()) / DEFAULT_CONFIG_NAME, "default"
    if not chosen.is_file():
        hint = "" if how != "default" else f" (pass --config FILE or set ${CONFIG_ENV})"
        raise ConfigError(f"configuration file {chosen} ({how}) not found{hint}")
    return chosen


def render_config(*, data_dir: Path, mqtt_host: str, mqtt_port: int, database_url: str | None = None,
                  workers: int = 1) -> str:
    """The ``server.toml`` that ``fleet-server init`` writes (every path relative to ``data_dir``)."""
    lines = [
        "# fleet-server configuration, written by `fleet-server init`.",
        "# Reference: docs/server.md. Relative paths are relative to server.data_dir.",
        "",
        "[server]",
        f"data_dir = {_toml_str(str(data_dir))}",
    ]
    if database_url:
        lines.append(f"database_url = {_toml_str(database_url)}")
    lines += [
        f"workers = {int(workers)}",
        'log_level = "info"',
        f'log_file = "{LOG_FILE}"',
        f'signing_key = "{SIGNING_KEY}"',
        f'fleet_ca_cert = "{FLEET_CA_CERT}"',
        f'fleet_ca_key = "{FLEET_CA_KEY}"',
        f'fleet_ca_crl = "{FLEET_CA_CRL}"',
        "crl_lifetime = 2592000.0  # seconds (30 days); `run` renews the CRL when a third is left",
        '# broker_pid_file = "/run/mosquitto/mosquitto.pid"  # `run` sends it SIGHUP after renewing the CRL',
        f'trust_bundle = "{TRUST_BUNDLE}"',
        "",
        "[mqtt]",
        f"host = {_toml_str(mqtt_host)}",
        f"port = {int(mqtt_port)}",
        f'ca_cert = "{FLEET_CA_CERT}"',
        f'cert = "{SERVER_CERT}"',
        f'key = "{SERVER_KEY}"',
        "",
        "[attestation]",
        "interval = 300.0",
        "jitter = 30.0",
        "challenge_timeout = 30.0",
        "missed_challenges_limit = 3",
        "result_grace = 60.0",
        "request_min_interval = 1.0",
        "allow_sha1 = false",
        "selection = { sha256 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14] }",
        "",
        "[models]",
        f'store_dir = "{MODELS_DIR}"',
        f'signing_key = "{MODEL_SIGNING_KEY}"',
        f'kek_file = "{MODEL_KEK}"',
        "offline_grace = 0.0",
        "",
        "[audit]",
        f'checkpoint_key = "{AUDIT_CHECKPOINT_KEY}"  # Ed25519, 0600: signs checkpoints of the audit chain',
        "checkpoint_interval = 100  # a signed checkpoint at least every this many audit entries",
        "",
        "[alerts]",
        '# business_hours = "08:00-18:00"   # UTC: key releases and downloads outside raise alerts',
        "block_off_hours = false",
        "",
        "[updates]  # the TUF update repository (`fleet-server updates init`; docs/updates.md)",
        f'dir = "{UPDATES_DIR}"',
        "timestamp_expiry = 86400.0  # online key: `run` re-signs when half is left",
        "snapshot_expiry = 604800.0",
        "",
    ]
    return "\n".join(lines)


def _toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 for c in escaped):
        raise ConfigError(f"value not representable in server.toml: {value!r}")
    return f'"{escaped}"'
