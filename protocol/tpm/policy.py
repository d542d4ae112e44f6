"""Pure TPM 2.0 policy and PCR-selection arithmetic (no TPM, no I/O).

Everything here is computed from bytes and values alone, so the verifier can recompute what the
device's TPM enforces.  The formulas are those of TPM 2.0 Part 3 (policy commands) and Part 2
(TPML_PCR_SELECTION); the adapter checks them against the TPM in practice, because a wrong digest
simply makes the TPM refuse to use the key.

A *selection* is a mapping ``{"sha256": [0, 1, 7], ...}`` from bank name to PCR indices.  The
canonical form used by this project orders banks by TPM algorithm id and PCRs ascending; the TPM
quotes and reads PCRs in exactly that order (bank by bank, lowest index first).

Policy of a bound (model-protection) key
----------------------------------------
TPM2_Certify needs the ADMIN role of the certified object, and for an object with
``adminWithPolicy`` the TPM grants ADMIN only in a policy session whose command code is set by
TPM2_PolicyCommandCode (Part 1, "Authorization Roles"; swtpm answers TPM_RC_POLICY_FAIL otherwise,
and a password session gets TPM_RC_AUTH_TYPE).  A bare PolicyPCR digest therefore makes Certify
impossible.  The bound key's authPolicy is hence a two-branch TPM2_PolicyOR:

* ``decrypt_branch`` = PolicyPCR(selection, pcr digest) → PolicyCommandCode(TPM_CC_RSA_Decrypt):
  the only way to use the key for decryption, and only in the measured state;
* ``certify_branch`` = PolicyCommandCode(TPM_CC_Certify): lets the AK certify the key in any state
  (certification only reveals the key's public name; it cannot decrypt anything).

``authPolicy = PolicyOR(decrypt_branch, certify_branch)``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protocol.errors import MalformedInputError
from protocol.tpm.constants import BANK_TO_ALG, HASH_ALGS

# TPM_CC values (TPM 2.0 Part 2, table 12).
TPM_CC_CERTIFY = 0x00000148
TPM_CC_RSA_DECRYPT = 0x00000159
TPM_CC_POLICY_COMMAND_CODE = 0x0000016C
TPM_CC_POLICY_OR = 0x00000171
TPM_CC_POLICY_PCR = 0x0000017F

# PC Client TPMs implement 24 PCRs; a 3-octet bitmap (PCR_SELECT_MIN) covers them all.
PCR_COUNT = 24
PCR_SELECT_SIZE = 3
# TPML_PCR_SELECTION holds at most HASH_COUNT entries; no real TPM has more than a handful of banks.
MAX_BANKS = 8
# PolicyOR accepts 2..8 branch digests (Part 3, TPM2_PolicyOR).
_POLICY_OR_MIN, _POLICY_OR_MAX = 2, 8

Selection = tuple[tuple[str, tuple[int, ...]], ...]
"""Canonical PCR selection: ((bank, (indices ascending)), ...) with banks in TPM algorithm-id order."""


def canonical_selection(selection: Mapping[str, Sequence[int]]) -> Selection:
    """Validate a ``{bank: [pcr, ...]}`` selection and return its canonical form.

    Raises :class:`MalformedInputError` for unknown banks, PCR indices outside 0..23, duplicates,
    an empty bank or an empty selection.
    """
    if not selection:
        raise MalformedInputError("PCR selection is empty")
    if len(selection) > MAX_BANKS:
        raise MalformedInputError(f"PCR selection names {len(selection)} banks (at most {MAX_BANKS})")
    out: list[tuple[int, str, tuple[int, ...]]] = []
    for bank, pcrs in selection.items():
        alg = BANK_TO_ALG.get(bank) if isinstance(bank, str) else None
        if alg is None:
            raise MalformedInputError(f"unknown PCR bank {bank!r}")
        indices = list(pcrs)
        if not indices:
            raise MalformedInputError(f"PCR bank {bank} selects no PCRs")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < PCR_COUNT:
                raise MalformedInputError(f"PCR index {i!r} in bank {bank} is not in 0..{PCR_COUNT - 1}")
        if len(set(indices)) != len(indices):
            raise MalformedInputError(f"PCR bank {bank} selects a PCR twice")
        out.append((alg, bank, tuple(sorted(indices))))
    out.sort()
    return tuple((bank, pcrs) for _, bank, pcrs in out)


def selection_to_dict(selection: Selection) -> dict[str, list[int]]:
    """The JSON-friendly form ``{"sha256": [0, 7]}`` of a canonical selection."""
    return {bank: list(pcrs) for bank, pcrs in selection}


def marshal_pcr_selection(selection: Selection) -> bytes:
    """TPML_PCR_SELECTION wire bytes (Part 2, 10.6.2 and 10.9.7): count, then per bank
    hash (UINT16), sizeofSelect (UINT8) and the little-endian-by-octet PCR bitmap."""
    out = bytearray(struct.pack(">I", len(selection)))
    for bank, pcrs in selection:
        bitmap = bytearray(PCR_SELECT_SIZE)
        for i in pcrs:
            bitmap[i // 8] |= 1 << (i % 8)
        out += struct.pack(">HB", BANK_TO_ALG[bank], PCR_SELECT_SIZE) + bitmap
    return bytes(out)


def pcr_composite(selection: Selection, values: Mapping[str, Mapping[int, bytes]]) -> bytes:
    """Concatenation of the selected PCR values in selection order (the input of a PCR digest).

    Raises :class:`MalformedInputError` if a selected value is missing or has the wrong size.
    """
    out = bytearray()
    for bank, pcrs in selection:
        size = HASH_ALGS[BANK_TO_ALG[bank]][1]
        bank_values = values.get(bank)
        if bank_values is None:
            raise MalformedInputError(f"no PCR values for bank {bank}")
        for i in pcrs:
            value = bank_values.get(i)
            if value is None:
                raise MalformedInputError(f"no value for PCR {bank}:{i}")
            if len(value) != size:
                raise MalformedInputError(f"PCR {bank}:{i} value has {len(value)} bytes, expected {size}")
            out += value
    return bytes(out)


def pcr_digest(selection: Selection, values: Mapping[str, Mapping[int, bytes]],
               hash_name: str = "sha256") -> bytes:
    """Digest of the selected PCR values, as in TPMS_QUOTE_INFO.pcrDigest and TPM2_PolicyPCR."""
    return hashlib.new(hash_name, pcr_composite(selection, values)).digest()


def _extend(digest: bytes, *parts: bytes, hash_name: str = "sha256") -> bytes:
    h = hashlib.new(hash_name, digest)
    for part in parts:
        h.update(part)
    return h.digest()


def empty_policy(hash_name: str = "sha256") -> bytes:
    """The initial policyDigest of a session: all zeros, digest-sized."""
    return bytes(hashlib.new(hash_name).digest_size)


def policy_pcr(digest: bytes, selection: Selection, pcr_values_digest: bytes,
               hash_name: str = "sha256") -> bytes:
    """TPM2_PolicyPCR: H(old ‖ TPM_CC_PolicyPCR ‖ TPML_PCR_SELECTION ‖ pcrDigest) (Part 3, 23.7)."""
    return _extend(digest, struct.pack(">I", TPM_CC_POLICY_PCR), marshal_pcr_selection(selection),
                   pcr_values_digest, hash_name=hash_name)


def policy_command_code(digest: bytes, command_code: int, hash_name: str = "sha256") -> bytes:
    """TPM2_PolicyCommandCode: H(old ‖ TPM_CC_PolicyCommandCode ‖ code) (Part 3, 23.11)."""
    return _extend(digest, struct.pack(">II", TPM_CC_POLICY_COMMAND_CODE, command_code),
                   hash_name=hash_name)


def policy_or(branches: Sequence[bytes], hash_name: str = "sha256") -> bytes:
    """TPM2_PolicyOR: H(0…0 ‖ TPM_CC_PolicyOR ‖ digest1 ‖ … ‖ digestN) (Part 3, 23.6)."""
    if not _POLICY_OR_MIN <= len(branches) <= _POLICY_OR_MAX:
        raise MalformedInputError(f"PolicyOR takes 2..8 branches, got {len(branches)}")
    return _extend(empty_policy(hash_name), struct.pack(">I", TPM_CC_POLICY_OR), *branches,
                   hash_name=hash_name)


@dataclass(frozen=True, slots=True)
class BoundKeyPolicy:
    """The authPolicy of a PCR-bound decryption key and its two PolicyOR branches (sha256)."""

    decrypt_branch: bytes
    certify_branch: bytes
    digest: bytes

    @property
    def branches(self) -> tuple[bytes, bytes]:
        """The PolicyOR list, in the order the digest was computed."""
        return (self.decrypt_branch, self.certify_branch)


def bound_key_policy(selection: Selection, values: Mapping[str, Mapping[int, bytes]]) -> BoundKeyPolicy:
    """authPolicy of a bound key that decrypts only while ``selection`` has ``values``.

    See the module docstring for the structure; the verifier recomputes this from its reference
    PCR values and compares it with the authPolicy in the certified key's TPM2B_PUBLIC.
    """
    start = empty_policy()
    decrypt = policy_command_code(policy_pcr(start, selection, pcr_digest(selection, values)),
                                  TPM_CC_RSA_DECRYPT)
    certify = policy_command_code(start, TPM_CC_CERTIFY)
    return BoundKeyPolicy(decrypt_branch=decrypt, certify_branch=certify,
                          digest=policy_or([decrypt, certify]))
