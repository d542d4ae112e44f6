"""Tables of the model-protection area: published models and versions, entitlements, leases,
usage telemetry, the runtime and model load outcomes devices report. (Imported by
:mod:`fleet_server.storage.models`; migrations 0002, 0007.)

Secrets: a version's data key is stored only sealed under the key-encryption key
(``encrypted_data_key`` = AES-256-GCM(KEK, ``data_key_nonce``, key, aad binding name, version and
package id); :mod:`fleet_server.modelstore.kek`), never in the clear. Packages themselves are files
(``package_path``, relative to ``[models] store_dir``): ciphertext behind a signed manifest.

A version is offered to devices only once deployed (``deployed_at`` set, by a principal holding
``model:deploy``; migration 0005): until then they keep the newest deployed version, or nothing.

Lease states: ``active`` (released, renewed by trusted attestations), ``expired`` (not renewed in
time), ``revoked`` (the device became untrusted, revoked or quarantined, or lost its entitlement),
``superseded`` (a newer release to the same device, or the version's policy changed: the device is
offered the model again and gets a new lease).
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import BigInteger, Index, UniqueConstraint, text
from sqlmodel import Field, SQLModel


class LeaseState(StrEnum):
    """Life of a lease (see the module docstring)."""

    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"
    SUPERSEDED = "superseded"


class EntitlementKind(StrEnum):
    """Who an entitlement names: one device, or every device of a class."""

    DEVICE = "device"
    CLASS = "class"


class Model(SQLModel, table=True):
    """A model name under which versions are published."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    created_at: int = Field(sa_type=BigInteger)
    created_by: str = Field(default="", max_length=64)


class ModelVersion(SQLModel, table=True):
    """One published version: its package file, digests, signed manifest, sealed data key, policy."""

    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_modelversion_model_version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="model.id", index=True)
    version: str = Field(max_length=32)
    package_id: str = Field(max_length=32)                               # manifest package_id (hex)
    package_path: str = Field(max_length=256)                            # relative to models.store_dir
    package_size: int = Field(sa_type=BigInteger)
    package_sha256: bytes                                                # of the whole package file
    plaintext_size: int = Field(sa_type=BigInteger)
    plaintext_sha256: bytes
    ciphertext_sha256: bytes
    signing_key_id: str = Field(max_length=16)                           # model-signing key id
    kek_id: str = Field(max_length=16)                                   # KEK the data key is sealed under
    data_key_nonce: bytes
    encrypted_data_key: bytes                                            # AES-GCM(KEK): never the key
    policy: str                                                          # JSON ModelPolicy
    created_at: int = Field(sa_type=BigInteger)
    created_by: str = Field(default="", max_length=64)
    manifest: str                                                        # the signed manifest JSON
    # Publishing is not deploying: devices are offered only deployed versions (model:deploy).
    deployed_at: int | None = Field(default=None, sa_type=BigInteger)
    deployed_by: str = Field(default="", max_length=64)


class Entitlement(SQLModel, table=True):
    """A model a device (``kind`` device, ``subject`` its id) or a device class may receive."""

    __table_args__ = (UniqueConstraint("model_id", "kind", "subject", name="uq_entitlement_subject"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="model.id", index=True)
    kind: str = Field(max_length=8)                                      # see EntitlementKind
    subject: str = Field(index=True, max_length=64)                      # device id or device class
    created_at: int = Field(sa_type=BigInteger)
    created_by: str = Field(default="", max_length=64)


class Lease(SQLModel, table=True):
    """One key release to one device: the data key of ``version`` wrapped to TPM key ``key_name``."""

    # Active leases are swept by expiry: a partial index stays as small as the set of active leases,
    # however long the history.
    __table_args__ = (
        Index("ix_lease_active_expires", "expires_at", sqlite_where=text("state = 'active'"),
              postgresql_where=text("state = 'active'")),
    )

    id: int | None = Field(default=None, primary_key=True)
    lease_id: str = Field(unique=True, max_length=32)
    device_id: str = Field(index=True, max_length=63)
    model_id: int = Field(foreign_key="model.id", index=True)
    version: str = Field(max_length=32)
    state: str = Field(default=LeaseState.ACTIVE, max_length=16)         # see LeaseState
    issued_at: int = Field(sa_type=BigInteger)
    expires_at: int = Field(sa_type=BigInteger)
    renewed_at: int | None = Field(default=None, sa_type=BigInteger)
    revoked_at: int | None = Field(default=None, sa_type=BigInteger)     # also when expired/superseded
    reason: str = Field(default="", max_length=256)
    key_name: bytes                                                      # TPM Name of the bound key


class ModelUsage(SQLModel, table=True):
    """Telemetry totals of one device and model per UTC day (``day`` = days since the epoch)."""

    device_id: str = Field(primary_key=True, max_length=63)
    model_id: int = Field(primary_key=True, foreign_key="model.id")
    day: int = Field(primary_key=True)
    served: int = Field(default=0, sa_type=BigInteger)
    refused: int = Field(default=0, sa_type=BigInteger)
    reports: int = 0
    last_until: int = Field(default=0, sa_type=BigInteger)               # end of the latest period
    updated_at: int = Field(sa_type=BigInteger)


class ModelClientUsage(SQLModel, table=True):
    """Per client app of a device and model: totals and the extraction monitor's latest view."""

    device_id: str = Field(primary_key=True, max_length=63)
    model_id: int = Field(primary_key=True, foreign_key="model.id")
    client: str = Field(primary_key=True, max_length=64)
    served: int = Field(default=0, sa_type=BigInteger)
    refused: int = Field(default=0, sa_type=BigInteger)
    statistic_micro: int | None = None                                   # Shapiro-Wilk W x 1e6
    alarm: bool = False
    alarm_at: int | None = Field(default=None, sa_type=BigInteger)      # first alarm reported
    updated_at: int = Field(sa_type=BigInteger)


class DeviceRuntime(SQLModel, table=True):
    """The inference runtime a device's agent reports (``model-status``; migration 0007)."""

    device_id: str = Field(primary_key=True, max_length=63)
    onnxruntime: str = Field(max_length=32)
    reported_at: int = Field(sa_type=BigInteger)


class ModelLoadStatus(SQLModel, table=True):
    """Whether a device's onnxruntime loaded a model version, and its own reason when it did not
    (``state`` ``loaded`` or ``failed``; the latest report wins; migration 0007)."""

    device_id: str = Field(primary_key=True, max_length=63)
    model_id: int = Field(primary_key=True, foreign_key="model.id")
    version: str = Field(primary_key=True, max_length=32)
    state: str = Field(max_length=8)
    error: str = Field(default="", max_length=512)
    onnxruntime: str = Field(default="", max_length=32)                  # the runtime that tried
    reported_at: int = Field(sa_type=BigInteger)
