"""Database tables (SQLModel): the single source of the schema. Rows never leave the storage layer: the
repository (:mod:`fleet_server.storage.repo`) converts them to frozen dataclasses at the boundary.

Conventions: times are integer milliseconds since the Unix epoch (``*_at``, ``*_ms``), stored as
64-bit integers (``BIGINT``: they overflow PostgreSQL's 32-bit ``INTEGER``), as are TPM counters and
clocks (UINT32/UINT64 in the TPM); JSON columns
are canonical JSON text; byte columns hold public material only (certificates, public areas,
nonces, digests, event logs). Secrets are never stored: an enrollment session keeps SHA-256 of the
expected proof, not the credential secret; private keys live in files (0600), never here.

Schema changes: edit this module, then add an Alembic revision under
``fleet_server/migrations/versions`` (``tests/test_server_migrations.py`` fails while the migrated
schema and these models differ).
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import BigInteger, Index, text
from sqlmodel import Field, SQLModel


class DeviceState(StrEnum):
    """Trust state of a device. Transitions are recorded in :class:`StateChange`."""

    PENDING = "pending"            # enrolled (EK/AK proven) but awaiting an admin's approval
    ENROLLED = "enrolled"          # admitted, not yet attested
    TRUSTED = "trusted"            # latest evidence appraised good and fresh
    UNTRUSTED = "untrusted"        # latest evidence appraised bad
    UNREACHABLE = "unreachable"    # missed its challenges
    REVOKED = "revoked"            # revoked by an admin: no challenges, no keys, until re-admitted
    QUARANTINED = "quarantined"    # held by an admin for investigation: attested, but never trusted


ATTESTED_STATES: frozenset[str] = frozenset({
    DeviceState.ENROLLED, DeviceState.TRUSTED, DeviceState.UNTRUSTED, DeviceState.UNREACHABLE,
    DeviceState.QUARANTINED,
})
"""States in which a device is challenged and its evidence appraised."""

HELD_STATES: frozenset[str] = frozenset({DeviceState.REVOKED, DeviceState.QUARANTINED, DeviceState.UNTRUSTED})
"""States that enrollment (re-enrolling with the claim certificate, a new AK) must not change: an
admin's revoke or quarantine holds until an admin approves; ``untrusted`` holds until good evidence.
Otherwise a device could wash its state by enrolling again (issue 9)."""


class ChallengeStatus(StrEnum):
    """Life of a challenge: ``open`` until answered (``used``), past its deadline (``expired``) or
    replaced by a newer challenge of the same device (``superseded``)."""

    OPEN = "open"
    USED = "used"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"


class Device(SQLModel, table=True):
    """One device. Column order matters for SQLite: small, hot columns first, blobs last (a row is
    rewritten whole on every update, and reading a column walks the columns before it)."""

    id: str = Field(primary_key=True, max_length=63)
    state: str = Field(index=True, max_length=16)
    device_class: str = Field(index=True, max_length=64)
    firmware_version: str = Field(index=True, max_length=64)
    ek_fingerprint: str = Field(unique=True, index=True, max_length=64)  # SHA-256 of the EK cert DER
    enroll_request_id: str | None = Field(default=None, max_length=32)  # request_id of the latest proof
    cert_serial: str | None = Field(default=None, max_length=64)  # device MQTT cert serial (hex)
    created_at: int = Field(sa_type=BigInteger)
    updated_at: int = Field(sa_type=BigInteger)
    state_changed_at: int = Field(sa_type=BigInteger)
    last_attestation_at: int | None = Field(default=None, sa_type=BigInteger)
    last_verdict: str | None = Field(default=None, max_length=16)
    trusted_until: int | None = Field(default=None, sa_type=BigInteger)  # expiry of the latest good result
    next_attestation_at: int | None = Field(default=None, index=True, sa_type=BigInteger)  # the schedule
    last_challenge_at: int | None = Field(default=None, sa_type=BigInteger)  # rate limit of attest.request
    missed_challenges: int = 0
    # TPM clock state of the current boot and the digest and size of its held event log (the log
    # itself is in HeldLog, so that the hot update of this row never rewrites it).
    boot_reset_count: int | None = Field(default=None, sa_type=BigInteger)
    boot_restart_count: int | None = Field(default=None, sa_type=BigInteger)
    last_clock: int | None = Field(default=None, sa_type=BigInteger)
    held_log_sha256: bytes | None = None
    held_log_size: int = 0
    policy_id: int | None = Field(default=None, foreign_key="policy.id")  # policy of the latest appraisal
    ak_public: bytes                                                     # TPM2B_PUBLIC of the AK
    state_reasons: str = "[]"                                            # JSON list of strings
    last_pcrs: str | None = None                                         # JSON {bank: {pcr: hex}}
    ak_name: bytes
    ek_public: bytes
    ek_cert: bytes
    csr: bytes | None = None                                             # DER CSR kept until admitted


class HeldLog(SQLModel, table=True):
    """The appraised event log of a device's current boot (incremental re-attestation, see
    docs/protocol.md). Written only when it changes; ``device.held_log_sha256`` names it."""

    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=63)
    log: bytes
    sha256: bytes


class DeviceCertificate(SQLModel, table=True):
    """Every operational certificate ever issued to a device (its serial and expiry), so that the CRL
    can list all of them: a certificate of an earlier enrollment still verifies against the fleet CA
    until it expires. ``replaced_at`` is set when a newer certificate of the device supersedes it
    (re-enrollment): from then on it is on the CRL whatever the device's state."""

    serial: str = Field(primary_key=True, max_length=64)                 # hex, as device.cert_serial
    device_id: str = Field(index=True, foreign_key="device.id", max_length=63)
    issued_at: int = Field(sa_type=BigInteger)
    not_after: int = Field(index=True, sa_type=BigInteger)
    replaced_at: int | None = Field(default=None, sa_type=BigInteger)


class PreregisteredEk(SQLModel, table=True):
    """EK certificates an admin registered in advance: such devices are admitted automatically."""

    ek_fingerprint: str = Field(primary_key=True, max_length=64)
    device_class: str | None = Field(default=None, max_length=64)
    note: str = ""
    created_at: int = Field(sa_type=BigInteger)


class EnrollmentSession(SQLModel, table=True):
    """An enrollment in progress (between enroll.request and enroll.proof)."""

    id: str = Field(primary_key=True, max_length=32)  # request_id
    device_id: str = Field(index=True, max_length=63)
    proof_sha256: bytes                                                  # SHA-256 of the expected proof
    ek_cert: bytes
    ek_fingerprint: str = Field(default="", max_length=64)
    ek_public: bytes
    ak_public: bytes
    csr: bytes
    device_class: str = Field(max_length=64)
    firmware_version: str = Field(max_length=64)
    created_at: int = Field(sa_type=BigInteger)
    expires_at: int = Field(sa_type=BigInteger)
    status: str = Field(default="open", max_length=16)  # open | done | failed | superseded


class Challenge(SQLModel, table=True):
    # Only open challenges are looked up by device (hello, supersede) or deadline (expiry): partial
    # indexes stay as small as the set of open challenges, however long the history kept.
    # issued_at serves retention.
    __table_args__ = (
        Index("ix_challenge_open_deadline", "deadline", sqlite_where=text("status = 'open'"),
              postgresql_where=text("status = 'open'")),
        Index("ix_challenge_open_device", "device_id", sqlite_where=text("status = 'open'"),
              postgresql_where=text("status = 'open'")),
    )

    id: str = Field(primary_key=True, max_length=32)
    device_id: str = Field(max_length=63)
    nonce: bytes
    selection: str                                                       # JSON {bank: [pcr, ...]}
    issued_at: int = Field(index=True, sa_type=BigInteger)
    deadline: int = Field(sa_type=BigInteger)
    status: str = Field(default="open", max_length=12)                   # see ChallengeStatus
    cause: str = Field(default="periodic", max_length=16)  # periodic | boot | reconnect | ...
    log_offset: int = 0                                                  # held log bytes offered
    log_sha256: bytes = b""                                              # SHA-256 of that prefix


class Attestation(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, max_length=63)
    challenge_id: str = Field(max_length=32)
    issued_at: int = Field(sa_type=BigInteger)                           # challenge sent
    received_at: int = Field(sa_type=BigInteger)                         # evidence received
    stored_at: int = Field(index=True, sa_type=BigInteger)               # result stored
    latency_ms: int = Field(default=0, sa_type=BigInteger)               # stored_at - issued_at
    verdict: str = Field(max_length=16)
    reasons: str = "[]"
    evidence_sha256: bytes
    policy_id: int | None = None
    reset_count: int | None = Field(default=None, sa_type=BigInteger)
    restart_count: int | None = Field(default=None, sa_type=BigInteger)
    clock: int | None = Field(default=None, sa_type=BigInteger)


class StateChange(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, max_length=63)
    at: int = Field(index=True, sa_type=BigInteger)
    from_state: str | None = Field(default=None, max_length=16)
    to_state: str = Field(max_length=16)
    cause: str


class Policy(SQLModel, table=True):
    """Reference values for a device class and firmware version."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    device_class: str = Field(index=True, max_length=64)
    firmware_version: str = Field(index=True, max_length=64)
    reference: str                                                       # JSON, see appraisal.policy
    reference_sha256: str = Field(default="", max_length=64)  # cache key of the parsed policy
    selection: str = "{}"                                                # JSON {bank: [pcr, ...]} to quote
    created_at: int = Field(sa_type=BigInteger)
    created_by: str = Field(default="", max_length=64)
    active: bool = True


class Counter(SQLModel, table=True):
    """Monotonic counters flushed by workers (messages rejected, by reason), summed for /metrics."""

    worker: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=96)
    value: int = Field(default=0, sa_type=BigInteger)
    updated_at: int = Field(default=0, sa_type=BigInteger)


class Outbox(SQLModel, table=True):
    """Signed messages to publish, written in the same transaction as the change that causes them.

    Admin commands and the console do not talk MQTT: they write here, and any worker publishes
    (at-least-once; agents de-duplicate by message id). A worker claims rows for a short lease
    (``claimed_until``) so that several workers rarely publish the same row twice.
    """

    id: int | None = Field(default=None, primary_key=True)
    topic: str = Field(max_length=256)
    payload: bytes
    created_at: int = Field(index=True, sa_type=BigInteger)
    sent_at: int | None = Field(default=None, index=True, sa_type=BigInteger)
    claimed_until: int | None = Field(default=None, sa_type=BigInteger)
    attempts: int = 0


class AlertStatus(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class Alert(SQLModel, table=True):
    """Something an admin should look at, raised by a rule on an event (see docs/alerts).

    ``kind``: attestation_failure | unreachable | key_release_off_hours | model_download_off_hours |
    key_request_untrusted | extraction_suspected | rollout_aborted | ... ; ``dedup_key`` keeps one
    open alert per (kind, subject): a rule firing again while its alert is open bumps
    ``count``/``last_seen_at``.
    """

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True, max_length=48)
    severity: str = Field(default="warning", max_length=16)           # info | warning | critical
    device_id: str | None = Field(default=None, index=True, max_length=63)
    model: str | None = Field(default=None, max_length=64)
    message: str = Field(max_length=512)
    details: str = "{}"                                                  # JSON
    dedup_key: str = Field(index=True, max_length=160)
    status: str = Field(default=AlertStatus.OPEN, index=True, max_length=16)
    count: int = 1
    created_at: int = Field(index=True, sa_type=BigInteger)
    last_seen_at: int = Field(sa_type=BigInteger)
    acknowledged_by: str | None = Field(default=None, max_length=64)
    acknowledged_at: int | None = Field(default=None, sa_type=BigInteger)
    resolved_by: str | None = Field(default=None, max_length=64)
    resolved_at: int | None = Field(default=None, sa_type=BigInteger)


# Tables of later areas live in their own modules (one owner each) and register on the same
# metadata when imported here, so `models` stays the single import that defines the schema.
from fleet_server.storage import (  # noqa: E402, F401
    console_tables,
    model_tables,
    release_tables,
    rollout_tables,
)
