"""The TPM surface the agent uses, as a :class:`typing.Protocol`, and the values it returns.

:class:`AgentTpm` lists exactly the operations the agent's parts call: attestation
(:mod:`agent.attest`: quotes), enrollment (:mod:`agent.enroll`: EK certificate and public, AK public,
credential activation), the service (open/close, AK, PCR reads), the model vault
(:mod:`agent.vault`: bound keys, certify, unwrap, the NV counter) and the update floor
(:mod:`agent.update.floor`: a small NV data index).  :class:`agent.tpm.adapter.TpmAdapter` implements
it over tpm2-pytss; :class:`firmware_sim.soft_tpm.SoftTpm` in memory, for large simulated fleets.

Byte formats are those of TPM 2.0 Part 2 (see :mod:`agent.tpm.adapter`): TPM2B_PUBLIC for public keys,
``nameAlg || digest`` for names, TPMS_ATTEST and TPMT_SIGNATURE for quotes and certifications.
This module imports no TPM library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol.tpm.policy import BoundKeyPolicy, Selection


@dataclass(frozen=True, slots=True)
class AttestationKey:
    """The AK's public identity.

    ``public`` is the marshalled TPM2B_PUBLIC; ``name`` the TPM name (nameAlg ‖ digest);
    ``alg`` is ``"ecc"`` or ``"rsa"``.
    """

    public: bytes
    name: bytes
    alg: str


@dataclass(frozen=True, slots=True)
class Quote:
    """A TPM2_Quote by the AK.

    ``attest`` is the marshalled TPMS_ATTEST exactly as signed, ``signature`` the marshalled
    TPMT_SIGNATURE.  ``pcrs`` holds the quoted PCR values (bank → index → digest), read right after
    the quote and checked against the quote's pcrDigest; empty if not requested.
    """

    attest: bytes
    signature: bytes
    pcrs: dict[str, dict[int, bytes]]


@dataclass(frozen=True, slots=True)
class Certification:
    """A TPM2_Certify of a bound key by the AK: marshalled TPMS_ATTEST and TPMT_SIGNATURE."""

    attest: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class BoundKey:
    """A PCR-bound decryption key kept (as TPM-encrypted blobs) in the adapter's ``state_dir``.

    ``key_id`` names it there (32 lowercase hex digits, from its TPM name); ``public`` is its
    marshalled TPM2B_PUBLIC (wrap data keys to this RSA key with OAEP-SHA256); ``name`` its TPM name;
    ``policy`` its authPolicy and the PolicyOR branches; ``pcr_selection`` the PCRs it is bound to.
    """

    key_id: str
    public: bytes
    name: bytes
    policy: BoundKeyPolicy
    pcr_selection: Selection

    @property
    def policy_digest(self) -> bytes:
        """The key's authPolicy (sha256)."""
        return self.policy.digest


class AgentTpm(Protocol):
    """The TPM operations the agent calls (see :class:`agent.tpm.adapter.TpmAdapter` for semantics).

    Every failure is a :class:`protocol.errors.EdgeError` (TPM failures :class:`~protocol.errors.TpmError`).
    """

    def open(self) -> None: ...

    def close(self) -> None: ...

    @property
    def ak(self) -> AttestationKey: ...

    @property
    def ak_public(self) -> bytes: ...

    def ek_certificate(self, alg: str | None = None) -> bytes: ...

    def ek_public(self, alg: str | None = None) -> bytes: ...

    def read_pcrs(self, selection: Mapping[str, Sequence[int]]) -> dict[str, dict[int, bytes]]: ...

    def quote(self, nonce: bytes, selection: Mapping[str, Sequence[int]], *,
              with_pcrs: bool = True) -> Quote: ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...

    def create_bound_key(self, pcr_selection: Mapping[str, Sequence[int]],
                         pcr_values: Mapping[str, Mapping[int, bytes]] | None = None) -> BoundKey: ...

    def bound_key(self, key_id: str) -> BoundKey: ...

    def certify(self, key: BoundKey | str, qualifying_data: bytes) -> Certification: ...

    def unwrap(self, key: BoundKey | str, ciphertext: bytes, label: bytes = b"") -> bytes: ...

    def counter_define(self) -> None: ...

    def counter_read(self) -> int: ...

    def counter_increment(self) -> int: ...

    def nv_data_read(self, index: int, size: int) -> bytes | None: ...

    def nv_data_write(self, index: int, data: bytes) -> None: ...
