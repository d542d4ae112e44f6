"""Benchmark: server-side quote verification against a bare ECDSA P-256 verify.

The quote is made offline in software, so no TPM is needed: a P-256 key stands in for the AK and signs a
TPMS_ATTEST marshalled with :mod:`protocol.tpm.structures`, exactly as a TPM would lay it out.  The
helpers that build it (:func:`software_ak`, :func:`build_quote`) are also used by the tests to make
quotes a TPM would never produce (wrong magic, wrong type).

``run()`` returns operations per second for both, measured in the same process with the calls
interleaved, so the ratio is meaningful on any machine.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fleet_server.verifier.quote import AttestationKey, verify_quote
from protocol.tpm.constants import TPM_GENERATED_VALUE, Alg, ECCCurve, ObjectAttr, StructureTag
from protocol.tpm.structures import (
    Attest,
    AttestedQuote,
    ClockInfo,
    EccParms,
    EccPoint,
    EccSignature,
    PublicArea,
    Scheme,
    SymDef,
    pcr_selection_from_mapping,
)

# Attributes of a `tpm2_createak` key: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign.
AK_ATTRIBUTES = (ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT | ObjectAttr.SENSITIVE_DATA_ORIGIN
                 | ObjectAttr.USER_WITH_AUTH | ObjectAttr.RESTRICTED | ObjectAttr.SIGN_ENCRYPT)


def software_ak(private_key: ec.EllipticCurvePrivateKey | None = None, *,
                attributes: int = AK_ATTRIBUTES) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A P-256 ECDSA-SHA256 'AK' in software: (private key, its TPM2B_PUBLIC bytes)."""
    key = private_key or ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    public = PublicArea(
        type=Alg.ECC, name_alg=Alg.SHA256, object_attributes=attributes, auth_policy=b"",
        parameters=EccParms(SymDef(), Scheme(Alg.ECDSA, Alg.SHA256), ECCCurve.NIST_P256, Scheme()),
        unique=EccPoint(numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")),
    )
    return key, public.marshal_tpm2b()


def build_quote(*, nonce: bytes, pcr_values: Mapping[str, Mapping[int, bytes]], signer: bytes = b"",
                clock: ClockInfo | None = None, firmware_version: int = 0x2019_1023_0016_3636,
                magic: int = TPM_GENERATED_VALUE, attest_type: int = StructureTag.ATTEST_QUOTE,
                digest_alg: Callable[[bytes], hashlib._Hash] = hashlib.sha256) -> bytes:
    """Marshal a TPMS_ATTEST quoting ``pcr_values`` (banks in mapping order, PCRs ascending)."""
    selection = pcr_selection_from_mapping({bank: list(v) for bank, v in pcr_values.items()})
    digest = digest_alg(b"".join(pcr_values[sel.bank][pcr] for sel in selection for pcr in sel.pcrs))
    attest = Attest(
        magic=magic, type=attest_type, qualified_signer=signer or b"\x00\x0b" + bytes(32), extra_data=nonce,
        clock_info=clock or ClockInfo(clock=123456, reset_count=3, restart_count=0, safe=True),
        firmware_version=firmware_version, attested=AttestedQuote(selection, digest.digest()),
    )
    return attest.marshal()


def sign_ecdsa(key: ec.EllipticCurvePrivateKey, message: bytes, hash_alg: int = Alg.SHA256) -> bytes:
    """TPMT_SIGNATURE (ECDSA) over ``message``, as a TPM would return it."""
    algorithms: dict[int, hashes.HashAlgorithm] = {
        Alg.SHA256: hashes.SHA256(), Alg.SHA384: hashes.SHA384(), Alg.SHA1: hashes.SHA1()}  # noqa: S303
    algorithm = algorithms[hash_alg]
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(algorithm)))
    size = (key.curve.key_size + 7) // 8
    return EccSignature(Alg.ECDSA, hash_alg, r.to_bytes(size, "big"), s.to_bytes(size, "big")).marshal()


def _interleaved_rates(fns: Mapping[str, Callable[[], object]], n: int,
                       warmup: int = 200) -> dict[str, float]:
    """Operations per second of each function, from the median of ``n`` timed calls.

    Calls alternate between the functions one by one, so that frequency scaling or a busy neighbour
    (CI machines, parallel test runs) affects them alike, and the median ignores interrupted calls.
    The per-call timer costs well under 1 % of a signature verification.
    """
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {name: [] for name in fns}
    items = list(fns.items())
    for i in range(warmup + n):
        for name, fn in items:
            start = clock()
            fn()
            elapsed = clock() - start
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: 1e9 / statistics.median(times) for name, times in samples.items()}


def run(n: int = 5000) -> dict[str, float]:
    """Operations per second: bare ECDSA P-256 verify and a full :func:`verify_quote` (ECC AK, no log)."""
    key, ak_public = software_ak()
    ak = AttestationKey.from_tpm2b_public(ak_public)
    nonce = bytes(range(32))
    pcrs = {"sha256": {i: hashlib.sha256(bytes([i])).digest() for i in range(10)}}
    attest = build_quote(nonce=nonce, pcr_values=pcrs)
    signature = sign_ecdsa(key, attest)
    der = key.sign(attest, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()
    ecdsa = ec.ECDSA(hashes.SHA256())
    verify_quote(ak=ak, attest=attest, signature=signature, nonce=nonce, pcr_values=pcrs)  # must pass

    def bare() -> None:
        public.verify(der, attest, ecdsa)

    def full() -> object:
        return verify_quote(ak=ak, attest=attest, signature=signature, nonce=nonce, pcr_values=pcrs)

    return _interleaved_rates({"ecdsa_p256_verify_per_s": bare, "quote_verify_only_per_s": full}, n)


if __name__ == "__main__":
    result = run()
    for name, value in result.items():
        print(f"{name}: {value:,.0f} ({1e6 / value:.1f} µs)")
    print(f"ratio: {result['ecdsa_p256_verify_per_s'] / result['quote_verify_only_per_s']:.3f}")
