"""The soft TPM (firmware_sim.soft_tpm) against independent references and the server's own code.

References: ``tpm2_checkquote`` (tpm2-tools) for its quotes, a real swtpm quote of the same PCR values
and nonce (made through the agent's TpmAdapter) for the TPMS_ATTEST / TPMT_SIGNATURE / TPMT_PUBLIC
layouts, the server's parsers and verifiers (fleet_server.verifier.quote, fleet_server.enrollment), the
server's TPM2_MakeCredential for credential activation, and a real Agent on a SoftTpm enrolling and
attesting against the real worker on Mosquitto.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tools_env

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import AgentFactory, wait_status  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402
from mqtt_fixtures import Credentials  # noqa: E402
from test_agent_fleet_server import Server, agent_config  # noqa: E402
from test_agent_fleet_server import server as fleet_worker  # noqa: E402,F401  (a fixture, see worker)
from test_agent_vault_units import SELECTION as VAULT_SELECTION  # noqa: E402
from test_agent_vault_units import release_for  # noqa: E402

from agent.tpm.adapter import TpmAdapter  # noqa: E402
from agent.update.floor import TpmVersionFloor, parse_version  # noqa: E402
from agent.vault.counters import StateKeeper  # noqa: E402
from agent.vault.keys import BoundKeys, StateSigner  # noqa: E402
from firmware_sim.boot import BootMedia  # noqa: E402
from firmware_sim.broker import MosquittoBroker  # noqa: E402
from firmware_sim.manufacturer import ManufacturerCA  # noqa: E402
from firmware_sim.profiles import get_profile  # noqa: E402
from firmware_sim.soft_tpm import (  # noqa: E402
    TPM_RH_ENDORSEMENT,
    EkIssuer,
    SoftTpm,
    qualified_name,
    soft_measured_boot,
)
from firmware_sim.swtpm import Swtpm  # noqa: E402
from fleet_server.appraisal.policy import policy_from_eventlog  # noqa: E402
from fleet_server.enrollment.credential import make_credential  # noqa: E402
from fleet_server.enrollment.ekcert import (  # noqa: E402
    check_ek_public_matches,
    load_trust_bundle,
    verify_ek_certificate,
)
from fleet_server.service.admin import preregister_ek, store_policy  # noqa: E402
from fleet_server.verifier.eventlog import parse_eventlog  # noqa: E402
from fleet_server.verifier.quote import AttestationKey, check_ak_attributes, verify_quote  # noqa: E402
from protocol.errors import ConfigError, MalformedInputError, QuoteError, TpmError  # noqa: E402
from protocol.tpm.constants import TPM_GENERATED_VALUE, Alg, StructureTag  # noqa: E402
from protocol.tpm.structures import (  # noqa: E402
    AttestedCertify,
    AttestedQuote,
    EccSignature,
    PublicArea,
    parse_attest,
    parse_signature,
    parse_tpm2b_public,
)

pytest_plugins = ("mqtt_fixtures", "agent_fixtures")

SEL10: dict[str, list[int]] = {"sha256": list(range(10))}
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def issuer(manufacturer_ca: ManufacturerCA) -> EkIssuer:
    return EkIssuer.from_ca(manufacturer_ca)


@pytest.fixture
def soft(issuer: EkIssuer) -> SoftTpm:
    return SoftTpm.manufacture(issuer, now=NOW)


def extend(tpm: SoftTpm, pcr: int, data: bytes) -> None:
    tpm.extend(pcr, [(Alg.SHA1, hashlib.sha1(data).digest()), (Alg.SHA256, hashlib.sha256(data).digest())])


def serialized_pcrs(bank_alg: int, values: dict[int, bytes]) -> bytes:
    """A tpm2-tools ``-F serialized`` PCR file (lib/pcr.c; layout in fleet_server.commands.quote_cmd):
    TPML_PCR_SELECTION with 16 slots, then the TPML_DIGEST lists of 8 slots each, little endian."""
    pcrs = sorted(values)
    select = bytearray(4)
    for i in pcrs:
        select[i // 8] |= 1 << (i % 8)
    out = bytearray(struct.pack("<I", 1) + struct.pack("<HB4sx", bank_alg, 3, bytes(select)))
    out += bytes(15 * 8)
    chunks = [pcrs[i:i + 8] for i in range(0, len(pcrs), 8)]
    out += struct.pack("<I", len(chunks))
    for chunk in chunks:
        out += struct.pack("<I", len(chunk))
        for k in range(8):
            digest = values[chunk[k]] if k < len(chunk) else b""
            out += struct.pack("<H64s", len(digest), digest)
    return bytes(out)


def swtpm_extend(tpm: Swtpm, pcr: int, data: bytes) -> None:
    """tpm2_pcrextend of both banks with the hashes of ``data``."""
    subprocess.run(["tpm2_pcrextend",
                    f"{pcr}:sha1={hashlib.sha1(data).hexdigest()},sha256={hashlib.sha256(data).hexdigest()}"],
                   env=tools_env(tpm), check=True, capture_output=True, timeout=60)


def checkquote(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tpm2_checkquote", *args], cwd=work, capture_output=True, text=True, timeout=60,
                          check=False)


# ---------------------------------------------------------------------------------------------
# Quotes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ak_alg", ["ecc", "rsa"])
def test_quote_is_accepted_by_tpm2_checkquote(issuer: EkIssuer, tmp_path: Path, ak_alg: str) -> None:
    tpm = SoftTpm.manufacture(issuer, now=NOW, ak_alg=ak_alg)
    extend(tpm, 8, b"grub command line")
    extend(tpm, 9, b"kernel image")
    nonce = secrets.token_bytes(20)
    q = tpm.quote(nonce, SEL10)
    assert sorted(q.pcrs["sha256"]) == list(range(10)) and q.pcrs["sha256"][9] != bytes(32)
    (tmp_path / "ak.pub").write_bytes(tpm.ak_public)
    (tmp_path / "quote.msg").write_bytes(q.attest)
    (tmp_path / "quote.sig").write_bytes(q.signature)
    (tmp_path / "pcrs.ser").write_bytes(serialized_pcrs(Alg.SHA256, q.pcrs["sha256"]))
    args = ["-u", "ak.pub", "-m", "quote.msg", "-s", "quote.sig", "-f", "pcrs.ser", "-g", "sha256"]
    ok = checkquote(tmp_path, *args, "-q", nonce.hex())
    assert ok.returncode == 0, ok.stderr
    wrong = checkquote(tmp_path, *args, "-q", secrets.token_bytes(20).hex())
    assert wrong.returncode != 0 and "nonce" in wrong.stderr
    # Values that are not the quoted ones are refused too.
    extend(tpm, 9, b"another kernel")
    (tmp_path / "pcrs.ser").write_bytes(serialized_pcrs(Alg.SHA256, tpm.read_pcrs(SEL10)["sha256"]))
    assert checkquote(tmp_path, *args, "-q", nonce.hex()).returncode != 0


def test_quote_verifies_with_the_servers_verifier(soft: SoftTpm) -> None:
    extend(soft, 16, b"measured")
    nonce = secrets.token_bytes(32)
    sel = {"sha1": [16, 0], "sha256": [16, 7, 0]}
    q = soft.quote(nonce, sel)
    ak = AttestationKey.from_tpm2b_public(soft.ak_public)
    info = verify_quote(ak=ak, attest=q.attest, signature=q.signature, nonce=nonce, pcr_values=q.pcrs,
                        allow_sha1=True)
    assert info.selection_dict() == {"sha1": [0, 16], "sha256": [0, 7, 16]}
    assert (info.reset_count, info.restart_count, info.safe) == (0, 0, True)
    with pytest.raises(QuoteError, match="nonce"):
        verify_quote(ak=ak, attest=q.attest, signature=q.signature, nonce=b"x" * 32, pcr_values=q.pcrs,
                     allow_sha1=True)
    # A power cycle resets the PCRs (17-22 to ones, as PC Client TPMs) and counts the reset.
    soft.power_cycle()
    after = soft.quote(nonce, {"sha256": [16, 17]})
    assert after.pcrs["sha256"] == {16: bytes(32), 17: b"\xff" * 32}
    assert parse_attest(after.attest).clock_info.reset_count == 1
    assert soft.quote(nonce, SEL10, with_pcrs=False).pcrs == {}


def test_quote_refuses_bad_input(soft: SoftTpm) -> None:
    with pytest.raises(MalformedInputError, match="nonce"):
        soft.quote(b"", SEL10)
    with pytest.raises(MalformedInputError, match="nonce"):
        soft.quote(b"n" * 65, SEL10)
    with pytest.raises(TpmError, match="sha384 is not allocated"):
        soft.quote(b"n", {"sha384": [0]})
    with pytest.raises(TpmError, match="not allocated"):
        soft.extend(0, [(Alg.SHA384, bytes(48))])


def _without_unique(area: PublicArea) -> PublicArea:
    return dataclasses.replace(area, unique=b"", raw=b"")


@pytest.mark.swtpm
def test_structures_have_the_layout_of_a_swtpm_quote_for_the_same_inputs(
        swtpm: Swtpm, tmp_path: Path, issuer: EkIssuer) -> None:
    """Same PCR values, nonce and clock info: the soft TPMS_ATTEST is swtpm's byte for byte, apart from
    the signer's qualified name; TPMT_SIGNATURE and the AK/EK TPMT_PUBLIC have swtpm's form."""
    events = [(8, b"grub command line"), (9, b"kernel image"), (0, b"firmware")]
    sel = {"sha1": [0, 8], "sha256": list(range(10))}
    nonce = secrets.token_bytes(32)
    for pcr, data in events:
        swtpm_extend(swtpm, pcr, data)
    with TpmAdapter(swtpm.tcti, tmp_path / "adapter", ak_alg="ecc", ek_alg="rsa") as adapter:
        hw = adapter.quote(nonce, sel)
        hw_ak, hw_ek = adapter.ak_public, adapter.ek_public("rsa")
    hw_attest = parse_attest(hw.attest)
    tpm = SoftTpm.manufacture(issuer, now=NOW, ek_alg="rsa", firmware_version=hw_attest.firmware_version)
    for pcr, data in events:
        extend(tpm, pcr, data)
    soft = tpm.quote(nonce, sel)
    assert soft.pcrs == hw.pcrs  # same reset values and extend semantics
    soft_attest = parse_attest(soft.attest)

    # Byte-identical once the two inputs that differ (signer, clock) are the same.
    same_inputs = dataclasses.replace(hw_attest, qualified_signer=soft_attest.qualified_signer,
                                      clock_info=soft_attest.clock_info)
    assert same_inputs.marshal() == soft.attest
    assert hw_attest.magic == soft_attest.magic == TPM_GENERATED_VALUE
    assert hw_attest.type == soft_attest.type == StructureTag.ATTEST_QUOTE
    assert isinstance(soft_attest.attested, AttestedQuote) and isinstance(hw_attest.attested, AttestedQuote)
    assert soft_attest.attested == hw_attest.attested
    # qualifiedSigner is the AK's qualified name under the EK in the endorsement hierarchy, for both.
    for attest, ak, ek in ((hw_attest, hw_ak, hw_ek), (soft_attest, tpm.ak_public, tpm.ek_public())):
        ek_qn = qualified_name(TPM_RH_ENDORSEMENT.to_bytes(4, "big"), parse_tpm2b_public(ek).name())
        assert attest.qualified_signer == qualified_name(ek_qn, parse_tpm2b_public(ak).name())

    hw_sig, soft_sig = parse_signature(hw.signature), parse_signature(soft.signature)
    assert isinstance(hw_sig, EccSignature) and isinstance(soft_sig, EccSignature)
    ecdsa_sha256 = (Alg.ECDSA, Alg.SHA256)
    assert (soft_sig.sig_alg, soft_sig.hash_alg) == (hw_sig.sig_alg, hw_sig.hash_alg) == ecdsa_sha256
    assert len(soft_sig.r) == len(soft_sig.s) == len(hw_sig.r) == len(hw_sig.s) == 32
    assert len(soft.signature) == len(hw.signature)

    assert _without_unique(parse_tpm2b_public(tpm.ak_public)) == _without_unique(parse_tpm2b_public(hw_ak))
    assert _without_unique(parse_tpm2b_public(tpm.ek_public())) == _without_unique(parse_tpm2b_public(hw_ek))
    assert len(tpm.ak_public) == len(hw_ak) and len(tpm.ek_public()) == len(hw_ek)


# ---------------------------------------------------------------------------------------------
# Keys and enrollment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ak_alg", ["ecc", "rsa"])
def test_ak_public_parses_with_the_servers_parser_and_its_name_matches(issuer: EkIssuer, ak_alg: str) -> None:
    tpm = SoftTpm.manufacture(issuer, now=NOW, ak_alg=ak_alg)
    area = parse_tpm2b_public(tpm.ak_public)
    check_ak_attributes(area)
    assert area.name() == tpm.ak.name == tpm.ak_name and tpm.ak.alg == ak_alg
    assert area.marshal_tpm2b() == tpm.ak_public
    assert AttestationKey.from_tpm2b_public(tpm.ak_public).public == area


@pytest.mark.parametrize("ek_alg", ["ecc", "rsa"])
def test_ek_certificate_chains_to_the_manufacturer_ca_and_holds_the_ek(
        issuer: EkIssuer, manufacturer_ca: ManufacturerCA, ek_alg: str) -> None:
    tpm = SoftTpm.manufacture(issuer, now=NOW, ek_alg=ek_alg)
    identity = verify_ek_certificate(tpm.ek_certificate(ek_alg),
                                     load_trust_bundle(manufacturer_ca.bundle.read_bytes()), now=NOW)
    check_ek_public_matches(identity, parse_tpm2b_public(tpm.ek_public()))
    other = "rsa" if ek_alg == "ecc" else "ecc"
    with pytest.raises(TpmError, match=f"no {other.upper()} EK"):
        tpm.ek_certificate(other)
    with pytest.raises(ConfigError):
        tpm.ek_public("dsa")
    # A certificate of another EK is refused when the TPM is made (as the adapter refuses such an EK).
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if ek_alg == "ecc" else rsa.generate_private_key(65537, 2048))
    with pytest.raises(ConfigError, match="does not certify its EK"):
        SoftTpm(ek_key=key, ek_certificate=tpm.ek_certificate())


@pytest.mark.parametrize("ek_alg", ["ecc", "rsa"])
def test_activate_credential_of_the_servers_make_credential(issuer: EkIssuer, ek_alg: str) -> None:
    tpm = SoftTpm.manufacture(issuer, now=NOW, ek_alg=ek_alg)
    ek = parse_tpm2b_public(tpm.ek_public())
    secret = secrets.token_bytes(32)
    blob, encrypted = make_credential(ek, tpm.ak.name, secret)
    assert tpm.activate_credential(blob, encrypted) == secret
    # Made for another AK: the integrity check fails, as TPM_RC_INTEGRITY on a TPM.
    other = SoftTpm.manufacture(issuer, now=NOW, ek_alg=ek_alg)
    blob, encrypted = make_credential(ek, other.ak.name, secret)
    with pytest.raises(TpmError, match="INTEGRITY"):
        tpm.activate_credential(blob, encrypted)
    # Made for another EK.
    blob, encrypted = make_credential(parse_tpm2b_public(other.ek_public()), tpm.ak.name, secret)
    with pytest.raises(TpmError):
        tpm.activate_credential(blob, encrypted)
    with pytest.raises(MalformedInputError):
        tpm.activate_credential(blob[:-1], encrypted)


# ---------------------------------------------------------------------------------------------
# Bound keys and NV
# ---------------------------------------------------------------------------------------------
def test_bound_key_unwraps_only_in_its_pcr_state_and_is_certified_by_the_ak(soft: SoftTpm) -> None:
    extend(soft, 13, b"rootfs")
    key = soft.create_bound_key({"sha256": [13]})
    assert soft.bound_key(key.key_id) == key
    public = parse_tpm2b_public(key.public)
    assert public.name() == key.name and public.auth_policy == key.policy_digest
    pub_key = public.public_key()
    assert isinstance(pub_key, rsa.RSAPublicKey)
    label = b"model-key\x00"
    data_key = secrets.token_bytes(32)
    wrapped = pub_key.encrypt(data_key, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                     algorithm=hashes.SHA256(), label=label))
    assert soft.unwrap(key, wrapped, label) == data_key

    cert = soft.certify(key.key_id, b"q" * 16)
    attest = parse_attest(cert.attest)
    assert attest.type == StructureTag.ATTEST_CERTIFY and attest.extra_data == b"q" * 16
    assert isinstance(attest.attested, AttestedCertify) and attest.attested.name == key.name
    AttestationKey.from_tpm2b_public(soft.ak_public).verify_signature(parse_signature(cert.signature),
                                                                      cert.attest)

    extend(soft, 13, b"another rootfs")
    with pytest.raises(TpmError, match="policy check failed"):
        soft.unwrap(key, wrapped, label)
    with pytest.raises(TpmError, match="no bound key"):
        soft.bound_key("0" * 32)


def test_nv_counter_and_data_index(soft: SoftTpm) -> None:
    with pytest.raises(TpmError, match="not defined"):
        soft.counter_read()
    soft.counter_define()
    soft.counter_define()  # idempotent
    first = soft.counter_read()
    assert soft.counter_increment() == first + 1 == soft.counter_read()
    index = 0x01800B01
    assert soft.nv_data_read(index, 8) is None
    soft.nv_data_write(index, b"12345678")
    soft.power_cycle()  # NV survives a reset
    assert soft.nv_data_read(index, 8) == b"12345678" and soft.counter_read() == first + 1
    with pytest.raises(TpmError, match="not an owner-authorized 4-byte"):
        soft.nv_data_read(index, 4)
    with pytest.raises(ConfigError, match="owner range"):
        soft.nv_data_write(0x01C00002, b"x")


def test_the_agents_vault_keys_state_signer_and_update_floor_run_on_a_soft_tpm(soft: SoftTpm,
                                                                                tmp_path: Path) -> None:
    """The agent's own vault and update-floor classes on the soft TPM (as test_agent_vault_units on swtpm)."""
    folder = tmp_path / "vault"
    folder.mkdir()
    keys = BoundKeys(lambda: soft, folder, "cam-0001", clock=time.time)
    key = keys.current_key(VAULT_SELECTION)
    assert keys.current_key(VAULT_SELECTION).key_id == key.key_id
    data_key = secrets.token_bytes(32)
    release = release_for(key.public, key.name, data_key)
    assert bytes(keys.unwrap(release)) == data_key
    extend(soft, 7, b"another boot state")
    with pytest.raises(TpmError, match="a policy check failed"):
        keys.unwrap(release)
    assert keys.current_key(VAULT_SELECTION).key_id != key.key_id

    signer = StateSigner(lambda: soft, folder)
    digest = hashlib.sha256(b"state").digest()
    signer.verify(digest, signer.sign(digest, create=True))
    keeper = StateKeeper(folder, lambda: soft, signer)
    first = keeper.load()
    assert first.generation == soft.counter_read()
    assert keeper.save({"classifier": "1.0.0"}, {}).generation == first.generation + 1

    floor = TpmVersionFloor(lambda: soft)
    assert floor.minimum() is None
    floor.raise_to(parse_version("1.2.3"))
    assert floor.minimum() == parse_version("1.2.3")


# ---------------------------------------------------------------------------------------------
# A real agent on a soft TPM against the real server
# ---------------------------------------------------------------------------------------------
@dataclass
class SoftDevice:
    """What tests' agent_config reads from a device: its event log (the TCTI is not used)."""

    eventlog_path: Path
    tcti: str = "soft-tpm"


@pytest.fixture
def soft_device(tmp_path: Path, issuer: EkIssuer) -> Iterator[tuple[SoftTpm, SoftDevice]]:
    tpm = SoftTpm.manufacture(issuer, now=dt.datetime.now(dt.UTC))
    device = SoftDevice(tmp_path / "eventlog.bin")
    profile = get_profile("golden")
    soft_measured_boot(tpm, BootMedia.from_specs(profile.image_specs()), profile.boot_settings,
                       device.eventlog_path)
    yield tpm, device


@pytest.fixture
def worker(request: pytest.FixtureRequest) -> Server:
    """The real fleet-server worker (SQLite, on the test's Mosquitto) of test_agent_fleet_server."""
    server: Server = request.getfixturevalue("fleet_worker")
    return server


def _golden_policy(device: SoftDevice, server: Server) -> None:
    log = parse_eventlog(device.eventlog_path.read_bytes())
    policy = policy_from_eventlog(log, name="edge-camera-1.0.0", device_class="edge-camera",
                                  firmware_version="1.0.0")
    store_policy(server.repo, policy, now=server.now_ms())


@pytest.mark.mqtt
@pytest.mark.slow
def test_agent_on_a_soft_tpm_enrolls_and_attests_trusted_with_the_real_server(
        tmp_path: Path, soft_device: tuple[SoftTpm, SoftDevice], mqtt_broker: MosquittoBroker,
        credentials: Credentials, worker: Server, make_agent: AgentFactory) -> None:
    tpm, device = soft_device
    server = worker
    _golden_policy(device, server)
    preregister_ek(server.repo, tpm.ek_certificate(), now=server.now_ms())
    config = agent_config(tmp_path / "agent", device, mqtt_broker, credentials, server)
    agent = make_agent(config, tpm_factory=tpm.factory())
    wait_status(agent, lambda s: s.trusted, "a trusted verdict from the fleet server")
    status = agent.status()
    assert status.enrolled and status.verdict_reasons == ()
    assert not (tmp_path / "agent" / "state" / "tpm").exists()  # no TpmAdapter was opened


@pytest.mark.mqtt
@pytest.mark.slow
def test_agent_on_a_soft_tpm_with_a_tampered_boot_is_untrusted(
        tmp_path: Path, soft_device: tuple[SoftTpm, SoftDevice], mqtt_broker: MosquittoBroker,
        credentials: Credentials, worker: Server, make_agent: AgentFactory) -> None:
    tpm, device = soft_device
    server = worker
    _golden_policy(device, server)
    preregister_ek(server.repo, tpm.ek_certificate(), now=server.now_ms())
    profile = get_profile("tampered-cmdline")  # the kernel command line (PCR 8) differs from the policy
    soft_measured_boot(tpm, BootMedia.from_specs(profile.image_specs()), profile.boot_settings,
                       device.eventlog_path)
    config = agent_config(tmp_path / "agent", device, mqtt_broker, credentials, server)
    agent = make_agent(config, tpm_factory=tpm.factory())
    wait_status(agent, lambda s: s.verdict == "untrusted", "an untrusted verdict")
    assert any("PCR 8" in reason for reason in agent.status().verdict_reasons), agent.status().verdict_reasons
