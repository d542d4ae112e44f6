"""TPM 2.0 quote verification: pure, no I/O, fail closed.

A quote is a TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE signed by an attestation key (AK) inside the TPM
(TPM 2.0 Part 3, 18.4 'TPM2_Quote').  :func:`verify_quote` checks, in this order, and raises on the
first failure:

1. both structures parse (``StructureError``);
2. the signature scheme fits the AK: ECDSA for ECC keys, RSASSA/RSAPSS for RSA keys, and the AK's own
   scheme and hash when the AK fixes one (Part 2, 12.2.3.5/12.2.3.6); SHA-1 refused unless allowed;
3. the signature verifies over the TPMS_ATTEST bytes exactly as received (``SignatureError``);
4. ``magic`` is TPM_GENERATED_VALUE and ``type`` is TPM_ST_ATTEST_QUOTE (Part 2, 10.12.12);
5. ``extraData`` equals the verifier's nonce (constant-time compare); an empty ``nonce`` demands an
   empty extraData (a quote made without qualifying data, which proves no freshness);
6. the quoted PCR selection equals the expected one and the supplied PCR values cover exactly it;
   SHA-1 banks refused unless allowed;
7. ``pcrDigest`` equals H(selected PCR values concatenated in selection order: banks in the order of
   the TPML_PCR_SELECTION, PCRs ascending within a bank), H being the signing scheme's hash
   (Part 3, 18.4.1 and Part 1, 'PCR Digest').

Everything after step 1 raises :class:`QuoteError` or :class:`SignatureError`.  The AK is parsed once
into an :class:`AttestationKey` (e.g. per enrolled device) that caches its ``cryptography`` key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from protocol.errors import EventLogMismatchError, QuoteError, SignatureError, VerificationError
from protocol.tpm.constants import HASH_ALGS, TPM_GENERATED_VALUE, Alg, ObjectAttr, StructureTag
from protocol.tpm.structures import (
    ClockInfo,
    EccSignature,
    PublicArea,
    PublicKey,
    Signature,
    alg_name,
    parse_tpm2b_public,
    unpack_attest,
    unpack_signature,
)

__all__ = [
    "AK_REQUIRED_ATTRIBUTES",
    "AttestationKey",
    "QuoteInfo",
    "check_ak_attributes",
    "check_replay",
    "verify_quote",
]

# cryptography hash objects per TPM hash algorithm (reused: building them per call costs time).
_CRYPTO_HASHES: dict[int, hashes.HashAlgorithm] = {
    Alg.SHA1: hashes.SHA1(),  # noqa: S303 - only reachable with allow_sha1, for legacy TPMs
    Alg.SHA256: hashes.SHA256(),
    Alg.SHA384: hashes.SHA384(),
    Alg.SHA512: hashes.SHA512(),
    Alg.SHA3_256: hashes.SHA3_256(),
    Alg.SHA3_384: hashes.SHA3_384(),
    Alg.SHA3_512: hashes.SHA3_512(),
}
_ECDSA: dict[int, ec.ECDSA] = {alg: ec.ECDSA(h) for alg, h in _CRYPTO_HASHES.items()}
_PKCS1V15 = padding.PKCS1v15()
# RSASSA-PSS: the TPM picks the salt length (the reference code uses the digest size, capped by the
# key size; TPMs built on older revisions of Part 1, B.7 use the largest salt that fits). The verifier
# recovers the salt from the encoding, as the TPM's own PssDecode() does, so any salt length is accepted;
# PSS security does not depend on it.
_PSS: dict[int, padding.PSS] = {alg: padding.PSS(padding.MGF1(h), padding.PSS.AUTO)
                                for alg, h in _CRYPTO_HASHES.items()}
# Fast hash constructors for the PCR digest (hashlib.new(name) is slower than the named constructor).
_HASHLIB: dict[int, Callable[[], hashlib._Hash]] = {
    Alg.SHA1: hashlib.sha1,
    Alg.SHA256: hashlib.sha256,
    Alg.SHA384: hashlib.sha384,
    Alg.SHA512: hashlib.sha512,
    Alg.SHA3_256: hashlib.sha3_256,
    Alg.SHA3_384: hashlib.sha3_384,
    Alg.SHA3_512: hashlib.sha3_512,
}
_BANK_SIZES: dict[str, int] = {name: size for name, size, _ in HASH_ALGS.values()}

# TPMA_OBJECT bits an attestation key must have (Part 2, 8.3; TCG 'TPM 2.0 Keys for Device Identity and
# Attestation', 'Attestation Key'): a restricted signing key that never left this TPM, created in it.
AK_REQUIRED_ATTRIBUTES: dict[str, int] = {
    "fixedTPM": ObjectAttr.FIXED_TPM,
    "fixedParent": ObjectAttr.FIXED_PARENT,
    "sensitiveDataOrigin": ObjectAttr.SENSITIVE_DATA_ORIGIN,
    "restricted": ObjectAttr.RESTRICTED,
    "sign": ObjectAttr.SIGN_ENCRYPT,
}


def check_ak_attributes(public: PublicArea) -> None:
    """Raise :class:`VerificationError` unless ``public`` is a restricted signing key fit to be an AK.

    Required: fixedTPM, fixedParent, sensitiveDataOrigin, restricted and sign set, decrypt clear (a
    restricted key that can also decrypt could be used to make the TPM sign outside data), and a Name
    algorithm (Part 1, 'Restricted Signing Key'; Part 2, 8.3.3 TPMA_OBJECT).
    """
    attrs = public.object_attributes
    missing = [name for name, bit in AK_REQUIRED_ATTRIBUTES.items() if not attrs & bit]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if attrs & ObjectAttr.DECRYPT:
        problems.append("decrypt is set")
    if public.name_alg not in HASH_ALGS:
        problems.append(f"nameAlg is {alg_name(public.name_alg)}")
    if problems:
        raise VerificationError(f"not an attestation key (objectAttributes 0x{attrs:08x}): "
                                + "; ".join(problems))


# Plain-int copies of enum members used on the hot path (an Enum attribute lookup costs ~80 ns).
_ECDSA_ID = int(Alg.ECDSA)
_RSASSA_ID = int(Alg.RSASSA)
_RSAPSS_ID = int(Alg.RSAPSS)
_NULL_ID = int(Alg.NULL)
_SHA1_ID = int(Alg.SHA1)
_ST_QUOTE = int(StructureTag.ATTEST_QUOTE)
_BANK_NAMES: dict[int, str] = {int(alg): name for alg, (name, _, _) in HASH_ALGS.items()}
_SIG_NAMES: dict[int, str] = {_ECDSA_ID: "ecdsa", _RSASSA_ID: "rsassa", _RSAPSS_ID: "rsapss"}


@dataclass(frozen=True, slots=True)
class AttestationKey:
    """An AK public area parsed once and kept (e.g. per enrolled device), with its key object cached.

    Build it with :meth:`from_tpm2b_public` (bytes of ``tpm2_createak -u``) or :meth:`from_public`;
    construction raises :class:`StructureError` if the public area is not a usable RSA or ECC key.
    ``name`` is the AK's Name (nameAlg || H(TPMT_PUBLIC)), what ``tpm2_createak -n`` writes.
    """

    public: PublicArea
    key: PublicKey = field(init=False, repr=False, compare=False)
    name: bytes = field(init=False, repr=False, compare=False)
    _ecc: ec.EllipticCurvePublicKey | None = field(init=False, repr=False, compare=False)
    _rsa: rsa.RSAPublicKey | None = field(init=False, repr=False, compare=False)
    _scheme: int = field(init=False, repr=False, compare=False)
    _scheme_hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = self.public.public_key()
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "name", self.public.name())
        object.__setattr__(self, "_ecc", key if isinstance(key, ec.EllipticCurvePublicKey) else None)
        object.__setattr__(self, "_rsa", key if isinstance(key, rsa.RSAPublicKey) else None)
        object.__setattr__(self, "_scheme", int(self.public.parameters.scheme.scheme))
        object.__setattr__(self, "_scheme_hash", int(self.public.parameters.scheme.hash_alg))

    @classmethod
    def from_tpm2b_public(cls, data: bytes) -> AttestationKey:
        """Parse a TPM2B_PUBLIC and prepare the key (raises StructureError)."""
        return cls(parse_tpm2b_public(data))

    @classmethod
    def from_public(cls, public: PublicArea) -> AttestationKey:
        """Prepare an already parsed public area (raises StructureError if it is not a usable key)."""
        return cls(public)

    def verify_signature(self, sig: Signature, message: bytes, *, allow_sha1: bool = False) -> None:
        """Verify a parsed TPMT_SIGNATURE over ``message`` as given; raise SignatureError.

        Checks first that the scheme fits this key (see :func:`verify_quote`).
        """
        if isinstance(sig, EccSignature):
            self._verify(sig.sig_alg, sig.hash_alg, sig.r, sig.s, message, allow_sha1)
        else:
            self._verify(sig.sig_alg, sig.hash_alg, sig.sig, b"", message, allow_sha1)

    def _verify(self, sig_alg: int, hash_alg: int, first: bytes, second: bytes, message: bytes,
                allow_sha1: bool) -> None:
        ecc_key, rsa_key = self._ecc, self._rsa
        if ecc_key is not None:
            if sig_alg != _ECDSA_ID:
                raise SignatureError(f"{alg_name(sig_alg)} signature from an ECC attestation key")
        elif sig_alg != _RSASSA_ID and sig_alg != _RSAPSS_ID:
            raise SignatureError(f"{alg_name(sig_alg)} signature from an RSA attestation key")
        if self._scheme != _NULL_ID and (self._scheme != sig_alg or self._scheme_hash != hash_alg):
            # A key whose public area fixes a scheme signs only with it (Part 2, 11.2.4.2 / 11.2.5.6).
            raise SignatureError(
                f"signature scheme {alg_name(sig_alg)}/{alg_name(hash_alg)} differs from the AK's "
                f"{alg_name(self._scheme)}/{alg_name(self._scheme_hash)}")
        if hash_alg == _SHA1_ID and not allow_sha1:
            raise SignatureError("SHA-1 signature refused (allow_sha1 is not set)")
        algorithm = _CRYPTO_HASHES.get(hash_alg)
        if algorithm is None:
            raise SignatureError(f"unsupported signature hash {alg_name(hash_alg)}")
        try:
            if ecc_key is not None:
                # TPMS_SIGNATURE_ECC carries r and s as unsigned big-endian integers; cryptography wants DER.
                der = encode_dss_signature(int.from_bytes(first, "big"), int.from_bytes(second, "big"))
                ecc_key.verify(der, message, _ECDSA[hash_alg])
            elif rsa_key is not None:
                pad = _PKCS1V15 if sig_alg == _RSASSA_ID else _PSS[hash_alg]
                rsa_key.verify(first, message, pad, algorithm)
            else:  # unreachable: public_key() returns an RSA or an ECC key
                raise SignatureError("attestation key is neither RSA nor ECC")
        except InvalidSignature:
            raise SignatureError("quote signature does not verify with the attestation key") from None
        except (ValueError, TypeError) as exc:  # e.g. wrong RSA signature length
            raise SignatureError(f"quote signature is unusable: {exc}") from None


@dataclass(frozen=True, slots=True)
class QuoteInfo:
    """What a verified quote tells: the TPM's clock, firmware, signer and the attested PCR selection.

    ``selection`` lists (bank, PCRs ascending) in the quote's order.  The full TPMS_ATTEST is available
    with ``parse_attest(attest)`` on the bytes the caller verified (not parsed again here: this result
    is built on the server's hot path).
    """

    clock: int            # TPMS_CLOCK_INFO (Part 2, 10.11.1), see ClockInfo
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    qualified_signer: bytes
    selection: tuple[tuple[str, tuple[int, ...]], ...]
    pcr_digest: bytes
    hash_alg: str         # the signature's hash, which is also the pcrDigest hash ("sha256")
    sig_alg: str          # "ecdsa", "rsassa" or "rsapss"

    @property
    def clock_info(self) -> ClockInfo:
        return ClockInfo(self.clock, self.reset_count, self.restart_count, self.safe)

    def selection_dict(self) -> dict[str, list[int]]:
        """``{"sha256": [0, 1, 7]}`` in the quote's bank order."""
        return {bank: list(pcrs) for bank, pcrs in self.selection}


def _describe(selection: Mapping[str, tuple[int, ...]]) -> str:
    return "; ".join(f"{bank}:{','.join(map(str, pcrs))}" for bank, pcrs in selection.items()) or "nothing"


def _normalize_expected(expected: Mapping[str, Iterable[int]]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for bank, pcrs in expected.items():
        ordered = tuple(sorted(set(pcrs)))
        if ordered:
            out[bank] = ordered
    return out


def verify_quote(*, ak: AttestationKey, attest: bytes, signature: bytes, nonce: bytes,
                 pcr_values: Mapping[str, Mapping[int, bytes]],
                 expected_selection: Mapping[str, Iterable[int]] | None = None,
                 allow_sha1: bool = False) -> QuoteInfo:
    """Verify a TPM2_Quote; return what it attests or raise (see the module docstring for the checks).

    ``attest`` and ``signature`` are the TPMS_ATTEST and TPMT_SIGNATURE bytes as received
    (``tpm2_quote -m`` / ``-s``); ``nonce`` is the challenge the verifier issued; ``pcr_values`` are the
    device's claimed PCR values (bank -> PCR -> digest).  ``expected_selection`` is the selection the
    verifier asked for; by default exactly the PCRs present in ``pcr_values``.  Supplied values for PCRs
    the quote does not cover are refused (they would be unauthenticated), so after success every value in
    ``pcr_values`` is vouched for by the TPM.

    Raises :class:`StructureError` (malformed input), :class:`SignatureError` or :class:`QuoteError`.
    """
    # This is the server's hot path: it unpacks into locals instead of building the dataclasses that
    # parse_attest()/parse_signature() return (same code underneath, same errors).
    if not isinstance(attest, bytes):
        attest = bytes(attest)
    if not isinstance(signature, bytes):
        signature = bytes(signature)
    sig_alg, hash_alg, first, second = unpack_signature(signature)
    magic, st, signer, extra, clock, reset, restart, safe, firmware, _, raw_selection, quoted_digest = (
        unpack_attest(attest))
    ak._verify(sig_alg, hash_alg, first, second, attest, allow_sha1)

    # TPMS_ATTEST header (Part 2, 10.12.12): only the TPM produces structures starting with
    # TPM_GENERATED_VALUE, which stops a signing key from being used to forge attestation data.
    if magic != TPM_GENERATED_VALUE:
        raise QuoteError(f"magic 0x{magic:08x} is not TPM_GENERATED_VALUE: not made by a TPM")
    if raw_selection is None or quoted_digest is None:
        raise QuoteError(f"attestation type 0x{st:04x} is not TPM_ST_ATTEST_QUOTE")
    # extraData is the qualifyingData of TPM2_Quote: the verifier's nonce proves freshness.
    if not hmac.compare_digest(extra, nonce):
        if not nonce:
            raise QuoteError(f"quote has a nonce (extraData of {len(extra)} bytes) where none was expected")
        raise QuoteError("quote nonce (extraData) does not match the challenge nonce")

    # The quoted selection, in quote order. Empty selections add nothing to the digest and are skipped;
    # a bank listed twice would be hashed twice and cannot be described by a bank -> values mapping.
    selection: dict[str, tuple[int, ...]] = {}
    for alg, _, pcrs in raw_selection:
        if pcrs:
            bank = _BANK_NAMES[alg]
            if bank in selection:
                raise QuoteError(f"quote selects PCR bank {bank} more than once")
            selection[bank] = pcrs
    if "sha1" in selection and not allow_sha1:
        raise QuoteError("quote covers the SHA-1 PCR bank, refused (allow_sha1 is not set)")

    supplied = {bank: tuple(sorted(values)) for bank, values in pcr_values.items() if values}
    expected = supplied if expected_selection is None else _normalize_expected(expected_selection)
    if selection != expected:
        raise QuoteError(f"quoted PCR selection ({_describe(selection)}) differs from the expected "
                         f"selection ({_describe(expected)})")
    if supplied != selection:
        raise QuoteError(f"supplied PCR values ({_describe(supplied)}) do not match the quoted selection "
                         f"({_describe(selection)})")

    # pcrDigest = H_sign(PCR[sel0][i0] || PCR[sel0][i1] || ... || PCR[sel1][...]) (Part 3, 18.4.1).
    # Each value must have its bank's digest size: otherwise values of wrong lengths could concatenate to
    # the quoted bytes while individually being wrong.
    hasher = _HASHLIB[hash_alg]()
    for bank, pcrs in selection.items():
        values = pcr_values[bank]
        parts = [values[pcr] for pcr in pcrs]
        size = _BANK_SIZES[bank]
        if set(map(len, parts)) != {size}:
            pcr = next(p for p in pcrs if len(values[p]) != size)
            raise QuoteError(f"supplied {bank} PCR {pcr} is {len(values[pcr])} bytes, expected {size}")
        hasher.update(b"".join(parts))
    digest = hasher.digest()
    if not hmac.compare_digest(digest, quoted_digest):
        raise QuoteError("PCR digest in the quote does not match the supplied PCR values")

    return QuoteInfo(clock, reset, restart, safe == 1, firmware, signer, tuple(selection.items()),
                     quoted_digest, _BANK_NAMES[hash_alg], _SIG_NAMES[sig_alg])


def check_replay(replayed: Mapping[str, Mapping[int, bytes]],
                 pcr_values: Mapping[str, Mapping[int, bytes]]) -> tuple[tuple[str, int], ...]:
    """Require the event-log replay to reproduce every quoted PCR value the log covers.

    ``replayed`` is the replay of the device's event log, ``pcr_values`` the values the quote vouches for
    (the ``pcr_values`` a successful :func:`verify_quote` accepted).  PCRs the log does not extend, and
    banks it does not carry, are not judged here (whether they must be covered is a policy question).
    Raises :class:`EventLogMismatchError` naming bank and PCR of every mismatch; otherwise returns the
    (bank, PCR) pairs that were compared, so that callers can tell a match from "nothing covered".
    """
    mismatches = []
    checked = []
    for bank, values in pcr_values.items():
        log_bank = replayed.get(bank)
        if not log_bank:
            continue
        for pcr in sorted(values):
            log_value = log_bank.get(pcr)
            if log_value is None:
                continue
            checked.append((bank, pcr))
            if not hmac.compare_digest(log_value, values[pcr]):
                mismatches.append(f"{bank} PCR {pcr}")
    if mismatches:
        raise EventLogMismatchError(
            "event log replay differs from the quoted value of " + ", ".join(mismatches))
    return tuple(checked)
