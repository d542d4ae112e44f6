"""The key broker's pure core (fleet_server/keybroker): every check of a key request, table-driven with
a software attestation key that signs TPMS_ATTEST structures the way a TPM does, then the same checks
on a real TPM (swtpm through the agent's adapter): the certified bound key is accepted and the wrapped
data key unwraps in that TPM only, and only in the attested boot state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fleet_server.keybroker import (
    BootCounters,
    BusinessHours,
    KeyRequestError,
    check_key_request,
    wrap_data_key,
)
from fleet_server.verifier.quote import AttestationKey
from protocol.errors import ConfigError, MalformedInputError, TpmError
from protocol.messages import WRAP_LABEL, KeyRequest, key_request_qualifier
from protocol.tpm.constants import TPM_GENERATED_VALUE, Alg, ECCCurve, ObjectAttr, StructureTag
from protocol.tpm.policy import (
    TPM_CC_RSA_DECRYPT,
    bound_key_policy,
    canonical_selection,
    empty_policy,
    pcr_digest,
    policy_command_code,
    policy_pcr,
)
from protocol.tpm.structures import (
    Attest,
    AttestedCertify,
    AttestedQuote,
    ClockInfo,
    EccParms,
    EccPoint,
    EccSignature,
    PublicArea,
    RsaParms,
    Scheme,
    SymDef,
    parse_attest,
)

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import DeviceFactory, SimDevice  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures")

DEVICE = "cam-1"
MODEL, VERSION = "classifier", "1.2.3"
SELECTION = {"sha256": (0, 1, 2, 7)}
PCRS = {"sha256": {i: hashlib.sha256(bytes([i])).digest() for i in SELECTION["sha256"]}}
BOOT = BootCounters(reset_count=7, restart_count=0)
NOW = 1_790_000_000_000
GOOD_ATTRS = (ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT | ObjectAttr.SENSITIVE_DATA_ORIGIN
              | ObjectAttr.DECRYPT | ObjectAttr.ADMIN_WITH_POLICY)
AK_ATTRS = (ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT | ObjectAttr.SENSITIVE_DATA_ORIGIN
            | ObjectAttr.USER_WITH_AUTH | ObjectAttr.RESTRICTED | ObjectAttr.SIGN_ENCRYPT)


# --------------------------------------------------------------------------------------------------
# a software "TPM": an ECC AK that signs TPMS_ATTEST, RSA keys with TPM public areas
# --------------------------------------------------------------------------------------------------
@dataclass
class SoftTpm:
    ak_key: ec.EllipticCurvePrivateKey
    ak: AttestationKey

    @classmethod
    def create(cls) -> SoftTpm:
        key = ec.generate_private_key(ec.SECP256R1())
        nums = key.public_key().public_numbers()
        public = PublicArea(Alg.ECC, Alg.SHA256, AK_ATTRS, b"",
                            EccParms(SymDef(), Scheme(Alg.ECDSA, Alg.SHA256), ECCCurve.NIST_P256, Scheme()),
                            EccPoint(nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big")))
        return cls(key, AttestationKey.from_public(public))

    def sign(self, attest: bytes) -> bytes:
        r, s = decode_dss_signature(self.ak_key.sign(attest, ec.ECDSA(hashes.SHA256())))
        return EccSignature(Alg.ECDSA, Alg.SHA256, r.to_bytes(32, "big"), s.to_bytes(32, "big")).marshal()


_RSA: list[rsa.RSAPrivateKey] = []


def rsa_key() -> rsa.RSAPrivateKey:
    if not _RSA:  # one 2048-bit key for the whole module (generating one takes ~50 ms)
        _RSA.append(rsa.generate_private_key(65537, 2048))
    return _RSA[0]


OAEP_SHA256 = Scheme(Alg.OAEP, Alg.SHA256)
NO_SYMMETRIC = SymDef()


def bound_public(*, attrs: int = GOOD_ATTRS, policy: bytes | None = None, bits: int = 2048,
                 scheme: Scheme = OAEP_SHA256, symmetric: SymDef = NO_SYMMETRIC,
                 name_alg: int = Alg.SHA256, key: rsa.RSAPrivateKey | None = None) -> PublicArea:
    priv = key or (rsa_key() if bits == 2048 else rsa.generate_private_key(65537, bits))
    modulus = priv.public_key().public_numbers().n.to_bytes(bits // 8, "big")
    digest = bound_key_policy(canonical_selection(SELECTION), PCRS).digest if policy is None else policy
    return PublicArea(Alg.RSA, name_alg, attrs, digest, RsaParms(symmetric, scheme, bits, 0), modulus)


def certify(tpm: SoftTpm, public: PublicArea, *, qualifier: bytes | None = None,
            magic: int = TPM_GENERATED_VALUE, name: bytes | None = None,
            clock: ClockInfo | None = None) -> Attest:
    """TPM2_Certify's TPMS_ATTEST of ``public`` (as the TPM would make it; fields overridable)."""
    extra = key_request_qualifier(DEVICE, MODEL, VERSION) if qualifier is None else qualifier
    return Attest(magic=magic, type=StructureTag.ATTEST_CERTIFY, qualified_signer=tpm.ak.name,
                  extra_data=extra,
                  clock_info=clock or ClockInfo(123456, BOOT.reset_count, BOOT.restart_count, True),
                  firmware_version=0x20191023,
                  attested=AttestedCertify(name or public.name(), b"\x00\x0b" + b"q" * 32))


def request(tpm: SoftTpm, public: PublicArea, attest: Attest | bytes, *,
            signer: SoftTpm | None = None) -> KeyRequest:
    raw = attest if isinstance(attest, bytes) else attest.marshal()
    return KeyRequest(name=MODEL, version=VERSION, key_public=public.marshal_tpm2b(), certify_attest=raw,
                      certify_signature=(signer or tpm).sign(raw))


def check(tpm: SoftTpm, req: KeyRequest, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {"device_id": DEVICE, "ak": tpm.ak, "attested_pcrs": PCRS,
                              "selection": SELECTION, "now": NOW, "trusted_until": NOW + 60_000, "boot": BOOT}
    kwargs.update(overrides)
    return check_key_request(req, **kwargs)


@pytest.fixture(scope="module")
def tpm() -> SoftTpm:
    return SoftTpm.create()


def test_a_well_formed_request_is_accepted_and_the_key_wraps_to_it(tpm: SoftTpm) -> None:
    public = bound_public()
    certified = check(tpm, request(tpm, public, certify(tpm, public)))
    assert certified.name == public.name() and certified.name[:2] == b"\x00\x0b"
    assert certified.policy_digest == bound_key_policy(canonical_selection(SELECTION), PCRS).digest
    assert certified.clock_info.reset_count == BOOT.reset_count
    # A NULL scheme (the decryption scheme chosen per call) is accepted too.
    null_scheme = bound_public(scheme=Scheme(Alg.NULL))
    check(tpm, request(tpm, null_scheme, certify(tpm, null_scheme)))
    # Freshness and boot binding are optional for callers that checked them themselves.
    check(tpm, request(tpm, public, certify(tpm, public)), trusted_until=None, boot=None)

    data_key = bytes(range(32))
    wrapped = wrap_data_key(data_key, certified)
    assert len(wrapped) == 256
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=WRAP_LABEL)
    assert rsa_key().decrypt(wrapped, oaep) == data_key
    assert wrapped != wrap_data_key(data_key, public)  # randomised padding
    assert rsa_key().decrypt(wrap_data_key(bytearray(data_key), public.marshal_tpm2b()), oaep) == data_key
    with pytest.raises(ValueError):  # the label takes part: another label does not decrypt
        rsa_key().decrypt(wrapped, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                                label=b"other\x00"))
    with pytest.raises(MalformedInputError):
        wrap_data_key(b"short", certified)
    with pytest.raises(KeyRequestError):  # wrap refuses a key that is not a bound decryption key
        wrap_data_key(data_key, bound_public(attrs=GOOD_ATTRS | ObjectAttr.USER_WITH_AUTH))


def _policy_without_or() -> bytes:
    sel = canonical_selection(SELECTION)
    return policy_command_code(policy_pcr(empty_policy(), sel, pcr_digest(sel, PCRS)), TPM_CC_RSA_DECRYPT)


OTHER_PCRS = {"sha256": {**PCRS["sha256"], 7: b"\x11" * 32}}
Case = Callable[[SoftTpm], tuple[KeyRequest, dict[str, Any]]]


def _case_attrs(attrs: int) -> Case:
    def make(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
        public = bound_public(attrs=attrs)
        return request(tpm, public, certify(tpm, public)), {}
    return make


def _case_key(**kwargs: Any) -> Case:
    def make(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
        public = bound_public(**kwargs)
        return request(tpm, public, certify(tpm, public)), {}
    return make


def _ecc_key(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
    public = dataclasses.replace(tpm.ak.public, object_attributes=GOOD_ATTRS,
                                 auth_policy=bound_key_policy(canonical_selection(SELECTION), PCRS).digest,
                                 parameters=EccParms(SymDef(), Scheme(), ECCCurve.NIST_P256, Scheme()),
                                 raw=b"")
    return request(tpm, public, certify(tpm, public)), {}


def _signed_by_other(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
    public = bound_public()
    return request(tpm, public, certify(tpm, public), signer=SoftTpm.create()), {}


def _tampered_after_signing(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
    public = bound_public()
    req = request(tpm, public, certify(tpm, public))
    later = ClockInfo(999999, BOOT.reset_count, BOOT.restart_count, True)
    forged = certify(tpm, public, clock=later).marshal()
    return dataclasses.replace(req, certify_attest=forged), {}


def _quote_not_certify(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
    public = bound_public()
    quote = dataclasses.replace(certify(tpm, public), type=StructureTag.ATTEST_QUOTE,
                                attested=AttestedQuote((), hashlib.sha256().digest()))
    return request(tpm, public, quote), {}


def _other_name(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
    public = bound_public()
    other = bound_public(key=rsa.generate_private_key(65537, 2048))
    return request(tpm, public, certify(tpm, public, name=other.name())), {}


def _with(**kwargs: Any) -> Case:
    def make(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
        public = bound_public()
        cert_kwargs = {k: v for k, v in kwargs.items() if k in ("qualifier", "magic", "clock")}
        overrides = {k: v for k, v in kwargs.items() if k not in cert_kwargs}
        return request(tpm, public, certify(tpm, public, **cert_kwargs)), overrides
    return make


def _garbage(field: str) -> Case:
    def make(tpm: SoftTpm) -> tuple[KeyRequest, dict[str, Any]]:
        public = bound_public()
        req = request(tpm, public, certify(tpm, public))
        return dataclasses.replace(req, **{field: b"\x00\x01garbage-bytes"}), {}
    return make


REFUSALS: list[tuple[str, Case, str, str]] = [
    ("signed by another key", _signed_by_other, "signature", "not signed by the device's attestation key"),
    ("attest changed after signing", _tampered_after_signing, "signature", "attestation key"),
    ("magic not TPM_GENERATED", _with(magic=0xDEADBEEF), "not_certification", "TPM_GENERATED_VALUE"),
    ("a quote, not a certification", _quote_not_certify, "not_certification", "TPM_ST_ATTEST_CERTIFY"),
    ("qualifier of another device", _with(qualifier=key_request_qualifier("cam-2", MODEL, VERSION)),
     "qualifier", "qualifying data"),
    ("qualifier of another version", _with(qualifier=key_request_qualifier(DEVICE, MODEL, "1.2.4")),
     "qualifier", "qualifying data"),
    ("qualifier of another model", _with(qualifier=key_request_qualifier(DEVICE, "other", VERSION)),
     "qualifier", "qualifying data"),
    ("certified name of another key", _other_name, "name", "another key"),
    *[(f"{attr} missing", _case_attrs(GOOD_ATTRS & ~bit), "attributes", f"{attr} is not set")
      for attr, bit in (("fixedTPM", ObjectAttr.FIXED_TPM), ("fixedParent", ObjectAttr.FIXED_PARENT),
                        ("sensitiveDataOrigin", ObjectAttr.SENSITIVE_DATA_ORIGIN),
                        ("decrypt", ObjectAttr.DECRYPT),
                        ("adminWithPolicy", ObjectAttr.ADMIN_WITH_POLICY))],
    *[(f"{attr} set", _case_attrs(GOOD_ATTRS | bit), "attributes", f"{attr} is set")
      for attr, bit in (("sign", ObjectAttr.SIGN_ENCRYPT), ("restricted", ObjectAttr.RESTRICTED),
                        ("userWithAuth", ObjectAttr.USER_WITH_AUTH), ("x509sign", ObjectAttr.X509_SIGN))],
    ("an ECC key", _ecc_key, "key_type", "not RSA"),
    ("RSA-1024", _case_key(bits=1024), "key_type", "1024 bits"),
    ("RSAES scheme", _case_key(scheme=Scheme(Alg.RSAES)), "key_type", "not OAEP/SHA256"),
    ("OAEP with SHA-1", _case_key(scheme=Scheme(Alg.OAEP, Alg.SHA1)), "key_type", "not OAEP/SHA256"),
    ("a symmetric part", _case_key(symmetric=SymDef(Alg.AES, 128, Alg.CFB)), "key_type", "symmetric part"),
    ("SHA-1 name", _case_key(name_alg=Alg.SHA1), "key_type", "nameAlg"),
    ("policy over other PCR values",
     _case_key(policy=bound_key_policy(canonical_selection(SELECTION), OTHER_PCRS).digest), "policy",
     "authPolicy"),
    ("policy over fewer PCRs", _case_key(policy=bound_key_policy(
        canonical_selection({"sha256": (0, 1)}), {"sha256": {i: PCRS["sha256"][i] for i in (0, 1)}}).digest),
     "policy", "authPolicy"),
    ("policy without the certify branch", _case_key(policy=_policy_without_or()), "policy", "authPolicy"),
    ("empty policy (password only)", _case_key(policy=b""), "policy", "authPolicy"),
    ("attested values missing a PCR", _with(attested_pcrs={"sha256": {0: PCRS["sha256"][0]}}), "policy",
     "no attested PCR values"),
    ("verdict expired", _with(trusted_until=NOW), "stale", "expired"),
    ("certified in another boot", _with(clock=ClockInfo(5, BOOT.reset_count + 1, 0, True)), "boot",
     "has not attested"),
    ("certified after a resume", _with(clock=ClockInfo(5, BOOT.reset_count, 1, True)), "boot",
     "has not attested"),
    ("garbage key_public", _garbage("key_public"), "malformed", "do not parse"),
    ("garbage attest", _garbage("certify_attest"), "malformed", "do not parse"),
    ("garbage signature", _garbage("certify_signature"), "malformed", "do not parse"),
]


@pytest.mark.parametrize(("case", "reason", "text"), [(c, r, t) for _, c, r, t in REFUSALS],
                         ids=[name for name, *_ in REFUSALS])
def test_refusals(tpm: SoftTpm, case: Case, reason: str, text: str) -> None:
    req, overrides = case(tpm)
    with pytest.raises(KeyRequestError) as info:
        check(tpm, req, **overrides)
    assert info.value.reason == reason
    assert text in info.value.diagnostics()
    assert "\n" not in info.value.diagnostics()


def test_a_request_for_another_device_is_refused_even_with_its_own_ak(tpm: SoftTpm) -> None:
    # The same certification sent from another device's topic: that device's AK did not sign it.
    public = bound_public()
    req = request(tpm, public, certify(tpm, public))
    with pytest.raises(KeyRequestError) as info:
        check(tpm, req, ak=SoftTpm.create().ak)
    assert info.value.reason == "signature"
    # ... and with the right AK but another device id the qualifier differs.
    with pytest.raises(KeyRequestError) as info:
        check(tpm, req, device_id="cam-2")
    assert info.value.reason == "qualifier"


# --------------------------------------------------------------------------------------------------
# business hours
# --------------------------------------------------------------------------------------------------
def _at(hour: int, minute: int = 0) -> int:
    return 1_789_948_800_000 + (hour * 60 + minute) * 60_000  # a UTC midnight + time of day


def test_business_hours() -> None:
    assert _at(0) % 86_400_000 == 0
    day = BusinessHours.parse("08:00-18:00")
    assert str(day) == "08:00-18:00 UTC"
    assert [day.contains(_at(h, m)) for h, m in ((7, 59), (8, 0), (12, 0), (17, 59), (18, 0), (23, 0))] == [
        False, True, True, True, False, False]
    night = BusinessHours.parse("22:00-06:00")
    assert [night.contains(_at(h)) for h in (21, 22, 23, 0, 5, 6, 12)] == [
        False, True, True, True, True, False, False]
    assert BusinessHours.parse("18:00-24:00").contains(_at(23, 59))
    assert BusinessHours.parse("18:00-00:00").contains(_at(23, 59))
    assert not BusinessHours.parse("18:00-00:00").contains(_at(0))
    for bad in ("8-18", "08:00-08:00", "25:00-26:00", "08:00-24:30", "08:60-09:00", "", "08:00 - 18:00x"):
        with pytest.raises(ConfigError):
            BusinessHours.parse(bad)


# --------------------------------------------------------------------------------------------------
# a real TPM
# --------------------------------------------------------------------------------------------------
TPM_SELECTION = {"sha256": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14]}


def _attested(dev: SimDevice) -> tuple[dict[str, dict[int, bytes]], BootCounters]:
    """What the server would have from a trusted quote of ``dev``: PCR values and boot counters."""
    quote = dev.tpm.quote(b"n" * 32, TPM_SELECTION)
    info = parse_attest(quote.attest).clock_info
    return quote.pcrs, BootCounters(info.reset_count, info.restart_count)


def _tpm_request(dev: SimDevice, key: Any) -> KeyRequest:
    cert = dev.tpm.certify(key, key_request_qualifier(dev.id, MODEL, VERSION))
    return KeyRequest(name=MODEL, version=VERSION, key_public=key.public, certify_attest=cert.attest,
                      certify_signature=cert.signature)


def _tpm_check(dev: SimDevice, req: KeyRequest, pcrs: dict[str, dict[int, bytes]], boot: BootCounters) -> Any:
    return check_key_request(req, device_id=dev.id, ak=AttestationKey.from_tpm2b_public(dev.tpm.ak_public),
                             attested_pcrs=pcrs, selection=TPM_SELECTION, now=NOW, trusted_until=NOW + 1,
                             boot=boot)


@pytest.mark.swtpm
def test_real_tpm_release_works_only_in_that_tpm_and_that_boot_state(make_device: DeviceFactory) -> None:
    a = make_device("cam-a")
    pcrs, boot = _attested(a)
    key = a.tpm.create_bound_key(TPM_SELECTION)
    certified = _tpm_check(a, _tpm_request(a, key), pcrs, boot)
    assert certified.name == key.name and certified.policy_digest == key.policy_digest
    data_key = hashlib.sha256(b"data key").digest()
    wrapped = wrap_data_key(data_key, certified)
    assert a.tpm.unwrap(key, wrapped, WRAP_LABEL) == data_key

    # Device B: its own bound key, its own TPM. The release made for A is useless there: B's key is
    # another key, and A's key blobs do not load in B's TPM.
    b = make_device("cam-b", fresh_tpm=True)
    key_b = b.tpm.create_bound_key(TPM_SELECTION)
    with pytest.raises(TpmError):
        b.tpm.unwrap(key_b, wrapped, WRAP_LABEL)
    for suffix in (".pub", ".priv", ".json"):
        shutil.copy(a.state_dir / f"bound-{key.key_id}{suffix}", b.state_dir / f"bound-{key.key_id}{suffix}")
    with pytest.raises(TpmError):
        b.tpm.unwrap(key.key_id, wrapped, WRAP_LABEL)
    # A's request replayed from B: B's AK did not sign it, and B's id is not in the qualifier.
    with pytest.raises(KeyRequestError) as info:
        _tpm_check(b, _tpm_request(a, key), *_attested(b))
    assert info.value.reason == "signature"

    # A reboots into a tampered kernel: PolicyPCR fails, the TPM refuses the unwrap.
    a.power_cycle("tampered-kernel")
    with pytest.raises(TpmError, match="policy check failed"):
        a.tpm.unwrap(key, wrapped, WRAP_LABEL)
    # In that boot, a new certification of the golden-bound key is refused (the boot is not the
    # attested one) and a key bound to the tampered values does not match the attested PCRs.
    with pytest.raises(KeyRequestError) as info:
        _tpm_check(a, _tpm_request(a, key), pcrs, boot)
    assert info.value.reason == "boot"
    tampered_key = a.tpm.create_bound_key(TPM_SELECTION)
    _, new_boot = _attested(a)
    with pytest.raises(KeyRequestError) as info:
        _tpm_check(a, _tpm_request(a, tampered_key), pcrs, new_boot)
    assert info.value.reason == "policy"
    # Back in the golden state the same release unwraps again.
    a.power_cycle("golden")
    assert a.tpm.unwrap(key, wrapped, WRAP_LABEL) == data_key
