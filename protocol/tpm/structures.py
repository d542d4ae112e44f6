"""Pure-Python codecs for the TPM 2.0 structures the verifier meets (no tpm2-pytss, no I/O).

Parsed here (TPM 2.0 Library, Part 2 'Structures', section numbers of revision 1.59):

* ``TPMS_ATTEST`` (10.12.12) with every ``TPMU_ATTEST`` arm (10.12.11): quote, certify, creation,
  command audit, session audit, time, NV and NV digest;
* ``TPMT_SIGNATURE`` (11.3.4) for RSASSA, RSAPSS and ECDSA; any other scheme is refused;
* ``TPM2B_PUBLIC`` / ``TPMT_PUBLIC`` (12.2.4, 12.2.5) for RSA and ECC keys, with the object Name
  (Part 1, 16 'Names') and conversion to a ``cryptography`` public key;
* ``TPML_PCR_SELECTION`` (10.9.7), parsed and marshalled (the agent builds selections with it).

Every top-level structure keeps the bytes it was parsed from in ``raw``, so signatures and Names are
computed over the bytes as received, never over a re-serialization.  Each parsed value is a frozen
dataclass and also knows how to marshal itself again (``marshal()``), which the tests and the
benchmark use to build structures and which round-trips exactly.

The verifier's hot path uses the ``unpack_*`` functions, which return plain tuples instead of
dataclasses (building frozen dataclasses costs more than the parse); the ``parse_*`` functions are
built on them, so both share one implementation and one set of error messages.

All malformed input raises :class:`protocol.errors.StructureError` naming the field and its offset.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from protocol.errors import StructureError
from protocol.tpm.constants import BANK_TO_ALG, HASH_ALGS, Alg, ECCCurve, StructureTag
from protocol.tpm.marshal import Reader, Writer, structure_error, tpm2b_at, truncated

__all__ = [
    "Attest",
    "AttestTuple",
    "AttestedCertify",
    "AttestedCommandAudit",
    "AttestedCreation",
    "AttestedInfo",
    "AttestedNV",
    "AttestedNVDigest",
    "AttestedQuote",
    "AttestedSessionAudit",
    "AttestedTime",
    "ClockInfo",
    "EccParms",
    "EccPoint",
    "EccSignature",
    "PcrSelection",
    "PublicArea",
    "PublicKey",
    "RsaParms",
    "RsaSignature",
    "Scheme",
    "Signature",
    "SymDef",
    "alg_name",
    "marshal_pcr_selection",
    "marshal_tpm2b_public",
    "parse_attest",
    "parse_pcr_selection",
    "parse_signature",
    "parse_tpm2b_public",
    "parse_tpmt_public",
    "pcr_selection_from_mapping",
    "unpack_attest",
    "unpack_pcr_selection",
    "unpack_signature",
]

# --- algorithm ids the constants module does not name (Part 2, 6.3 'TPM_ALG_ID') -------------------
ALG_MGF1 = 0x0007
ALG_SM4 = 0x0013
ALG_SM2 = 0x001B
ALG_ECMQV = 0x001D
ALG_KDF2 = 0x0021
ALG_CAMELLIA = 0x0026

# --- size bounds (Part 2 table definitions, with the reference implementation's maxima) ------------
MAX_DIGEST = 64          # TPM2B_DIGEST: sizeof(TPMU_HA), SHA-512
MAX_DATA = 66            # TPM2B_DATA: sizeof(TPMT_HA)
MAX_NAME = 66            # TPM2B_NAME: sizeof(TPMU_NAME) = sizeof(TPMT_HA)
MAX_ECC_BYTES = 80       # TPM2B_ECC_PARAMETER: MAX_ECC_KEY_BYTES (BN P638 is the largest curve)
MAX_RSA_BYTES = 512      # TPM2B_PUBLIC_KEY_RSA: MAX_RSA_KEY_BYTES (RSA-4096)
MAX_NV_BUFFER = 2048     # TPM2B_MAX_NV_BUFFER: MAX_NV_BUFFER_SIZE (libtpms: 2048)
MAX_PUBLIC = 1024        # TPM2B_PUBLIC: comfortably above sizeof(TPMT_PUBLIC) for RSA-4096 / ECC
MAX_ATTEST = 4096        # TPM2B_ATTEST: above sizeof(TPMS_ATTEST) with the largest NV contents
MAX_HASH_COUNT = 16      # TPML_PCR_SELECTION.count: HASH_COUNT bound
MAX_SIZEOF_SELECT = 32   # TPMS_PCR_SELECTION.sizeofSelect: PCR_SELECT_MAX (up to 256 PCRs)
DEFAULT_SIZEOF_SELECT = 3  # PCR_SELECT_MIN for a PC Client TPM with 24 PCRs

_HEADER_SIZE = struct.Struct(">IHH")  # TPMS_ATTEST.magic, .type, qualifiedSigner.size
_CLOCK_FW = struct.Struct(">QIIBQ")   # TPMS_CLOCK_INFO (clock, reset, restart, safe), firmwareVersion
_CLOCK = struct.Struct(">QIIB")       # TPMS_CLOCK_INFO alone
_SEL_HEAD = struct.Struct(">HB")      # TPMS_PCR_SELECTION.hash, .sizeofSelect
_SIG_HEAD = struct.Struct(">HH")      # TPMT_SIGNATURE.sigAlg, TPMS_SIGNATURE_*.hash
_PUB_HEAD = struct.Struct(">HHI")     # TPMT_PUBLIC.type, .nameAlg, .objectAttributes

# Bit positions set in each byte value: pcrSelect bit n of byte i selects PCR 8*i + n (Part 2, 10.6.1).
_BITS: tuple[tuple[int, ...], ...] = tuple(tuple(b for b in range(8) if v >> b & 1) for v in range(256))

# _BYTE_PCRS[j][v]: the PCRs that byte value v selects at pcrSelect octet j, for the usual 3-4 octets
# (one table lookup per octet instead of a bit loop; larger selections use the _BITS loop).
_BYTE_PCRS: tuple[tuple[tuple[int, ...], ...], ...] = tuple(
    tuple(tuple(8 * j + b for b in _BITS[v]) for v in range(256)) for j in range(4))

# Plain-int copies of the enum members the hot paths compare with (an Enum attribute lookup costs more
# than the comparison itself).
_ECDSA = int(Alg.ECDSA)
_RSASSA = int(Alg.RSASSA)
_RSAPSS = int(Alg.RSAPSS)
_ST_QUOTE = int(StructureTag.ATTEST_QUOTE)
_HASH_IDS = frozenset(int(a) for a in HASH_ALGS)


def alg_name(alg: int) -> str:
    """Readable TPM_ALG_ID name for messages: ``'SHA256'``, or ``'0x1234'`` if unknown."""
    try:
        return Alg(alg).name
    except ValueError:
        return {ALG_MGF1: "MGF1", ALG_SM4: "SM4", ALG_SM2: "SM2", ALG_ECMQV: "ECMQV", ALG_KDF2: "KDF2",
                ALG_CAMELLIA: "CAMELLIA"}.get(alg, f"0x{alg:04x}")


def _hash_alg(r: Reader, field_name: str, *, allow_null: bool = False) -> int:
    """TPMI_ALG_HASH (Part 2, 9.27): a hash algorithm this project knows, or NULL where the type has '+'."""
    at = r.offset
    alg = r.u16(field_name)
    if alg in HASH_ALGS or (allow_null and alg == Alg.NULL):
        return alg
    raise r.error(field_name, f"not a supported hash algorithm: {alg_name(alg)}", offset=at)


# =================================================================================================
# PCR selections
# =================================================================================================
@dataclass(frozen=True, slots=True)
class PcrSelection:
    """TPMS_PCR_SELECTION (Part 2, 10.6.2): one bank and the PCRs selected in it, ascending."""

    hash_alg: int
    pcrs: tuple[int, ...]
    size_of_select: int = DEFAULT_SIZEOF_SELECT

    @property
    def bank(self) -> str:
        """Bank name as tpm2-tools spells it (``'sha256'``)."""
        return HASH_ALGS[self.hash_alg][0]

    def bitmap(self) -> bytes:
        """The ``pcrSelect`` octets: bit ``n % 8`` of byte ``n // 8`` selects PCR ``n``."""
        out = bytearray(self.size_of_select)
        for pcr in self.pcrs:
            if not 0 <= pcr < 8 * self.size_of_select:
                raise StructureError(
                    f"TPMS_PCR_SELECTION: PCR {pcr} does not fit in sizeofSelect {self.size_of_select}")
            out[pcr >> 3] |= 1 << (pcr & 7)
        return bytes(out)


def unpack_pcr_selection(data: bytes, pos: int, end: int, structure: str = "TPML_PCR_SELECTION",
                         ) -> tuple[tuple[tuple[int, int, tuple[int, ...]], ...], int]:
    """Unpack a TPML_PCR_SELECTION (Part 2, 10.9.7) at ``data[pos:end]`` without building objects.

    Returns ``(((hash, sizeofSelect, pcrs ascending), ...), offset after it)``: the tuple form the
    verifier's hot path uses; :func:`parse_pcr_selection` wraps it in :class:`PcrSelection` values.
    """
    if pos + 4 > end:
        raise truncated(structure, "pcrSelections.count", pos, 4, end - pos)
    count = (data[pos] << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]
    if count > MAX_HASH_COUNT:
        raise structure_error(structure, "pcrSelections.count", pos,
                              f"{count} selections exceed the maximum {MAX_HASH_COUNT}")
    pos += 4
    out = []
    for i in range(count):
        if pos + 3 > end:
            raise truncated(structure, f"pcrSelections[{i}]", pos, 3, end - pos)
        alg, size = _SEL_HEAD.unpack_from(data, pos)
        if alg not in _HASH_IDS:
            raise structure_error(structure, f"pcrSelections[{i}].hash", pos,
                                  f"not a supported hash algorithm: {alg_name(alg)}")
        if size > MAX_SIZEOF_SELECT:
            raise structure_error(structure, f"pcrSelections[{i}].sizeofSelect", pos + 2,
                                  f"{size} exceeds the maximum {MAX_SIZEOF_SELECT}")
        pos += 3
        if pos + size > end:
            raise truncated(structure, f"pcrSelections[{i}].pcrSelect", pos, size, end - pos)
        if size == 3:  # PC Client TPMs: 24 PCRs
            pcrs = _BYTE_PCRS[0][data[pos]] + _BYTE_PCRS[1][data[pos + 1]] + _BYTE_PCRS[2][data[pos + 2]]
        else:
            pcrs = tuple(8 * j + b for j in range(size) for b in _BITS[data[pos + j]])
        out.append((alg, size, pcrs))
        pos += size
    return tuple(out), pos


def _read_pcr_selection(r: Reader) -> tuple[PcrSelection, ...]:
    """TPML_PCR_SELECTION (Part 2, 10.9.7): UINT32 count, then count TPMS_PCR_SELECTIONs."""
    raw, end = unpack_pcr_selection(r.data, r.offset, r.end, r.structure)
    r.seek(end)
    return tuple(PcrSelection(alg, pcrs, size) for alg, size, pcrs in raw)


def parse_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    """Parse a marshalled TPML_PCR_SELECTION that must use exactly ``data``."""
    r = Reader(data, "TPML_PCR_SELECTION")
    selection = _read_pcr_selection(r)
    r.expect_end()
    return selection


def pcr_selection_from_mapping(selection: Mapping[str, Iterable[int]], *,
                               size_of_select: int | None = None) -> tuple[PcrSelection, ...]:
    """Build TPMS_PCR_SELECTIONs from ``{"sha256": [0, 1, 7]}``, banks in the mapping's order.

    ``size_of_select`` defaults to the PC Client minimum of 3 octets (24 PCRs), or more if a selected PCR
    needs it.
    """
    out = []
    for bank, pcrs in selection.items():
        alg = BANK_TO_ALG.get(bank)
        if alg is None:
            raise StructureError(f"TPML_PCR_SELECTION: unknown PCR bank {bank!r}")
        ordered = tuple(sorted(set(pcrs)))
        if ordered and ordered[0] < 0:
            raise StructureError(f"TPML_PCR_SELECTION: negative PCR index in bank {bank}")
        size = size_of_select
        if size is None:
            size = max(DEFAULT_SIZEOF_SELECT, (ordered[-1] // 8 + 1) if ordered else 0)
        if not 0 <= size <= MAX_SIZEOF_SELECT:
            raise StructureError(f"TPML_PCR_SELECTION: sizeofSelect {size} out of range")
        out.append(PcrSelection(alg, ordered, size))
    return tuple(out)


def _write_pcr_selection(w: Writer, selection: Sequence[PcrSelection]) -> None:
    if len(selection) > MAX_HASH_COUNT:
        raise StructureError(f"TPML_PCR_SELECTION: {len(selection)} selections exceed {MAX_HASH_COUNT}")
    w.u32(len(selection), "count")
    for sel in selection:
        w.u16(sel.hash_alg, "hash").u8(sel.size_of_select, "sizeofSelect").raw(sel.bitmap())


def marshal_pcr_selection(selection: Mapping[str, Iterable[int]] | Sequence[PcrSelection], *,
                          size_of_select: int | None = None) -> bytes:
    """Marshal a TPML_PCR_SELECTION from ``{"sha256": [0, 7]}`` or from :class:`PcrSelection` values."""
    if isinstance(selection, Mapping):
        selection = pcr_selection_from_mapping(selection, size_of_select=size_of_select)
    w = Writer("TPML_PCR_SELECTION")
    _write_pcr_selection(w, selection)
    return w.to_bytes()


# =================================================================================================
# TPMS_ATTEST
# =================================================================================================
@dataclass(frozen=True, slots=True)
class ClockInfo:
    """TPMS_CLOCK_INFO (Part 2, 10.11.1)."""

    clock: int            # milliseconds the TPM has been powered (monotonic across power cycles)
    reset_count: int      # TPM2_Startup(CLEAR) count: a reboot increments it
    restart_count: int    # TPM Resume/Restart count since the last reset
    safe: bool            # no Clock value was ever reported that is later than the current one


@dataclass(frozen=True, slots=True)
class AttestedQuote:
    """TPMS_QUOTE_INFO (Part 2, 10.12.1)."""

    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True, slots=True)
class AttestedCertify:
    """TPMS_CERTIFY_INFO (Part 2, 10.12.3)."""

    name: bytes
    qualified_name: bytes


@dataclass(frozen=True, slots=True)
class AttestedCreation:
    """TPMS_CREATION_INFO (Part 2, 10.12.6)."""

    object_name: bytes
    creation_hash: bytes


@dataclass(frozen=True, slots=True)
class AttestedCommandAudit:
    """TPMS_COMMAND_AUDIT_INFO (Part 2, 10.12.4)."""

    audit_counter: int
    digest_alg: int
    audit_digest: bytes
    command_digest: bytes


@dataclass(frozen=True, slots=True)
class AttestedSessionAudit:
    """TPMS_SESSION_AUDIT_INFO (Part 2, 10.12.5)."""

    exclusive_session: bool
    session_digest: bytes


@dataclass(frozen=True, slots=True)
class AttestedTime:
    """TPMS_TIME_ATTEST_INFO (Part 2, 10.12.2): TPMS_TIME_INFO (time, clockInfo) and firmwareVersion."""

    time: int
    clock_info: ClockInfo
    firmware_version: int


@dataclass(frozen=True, slots=True)
class AttestedNV:
    """TPMS_NV_CERTIFY_INFO (Part 2, 10.12.8)."""

    index_name: bytes
    offset: int
    nv_contents: bytes


@dataclass(frozen=True, slots=True)
class AttestedNVDigest:
    """TPMS_NV_DIGEST_CERTIFY_INFO (Part 2, 10.12.9)."""

    index_name: bytes
    nv_digest: bytes


AttestedInfo = (AttestedQuote | AttestedCertify | AttestedCreation | AttestedCommandAudit
                | AttestedSessionAudit | AttestedTime | AttestedNV | AttestedNVDigest)


@dataclass(frozen=True, slots=True)
class Attest:
    """TPMS_ATTEST (Part 2, 10.12.12). ``raw`` holds the bytes as received (what the TPM signed).

    The parser does not judge ``magic``: checking it against TPM_GENERATED_VALUE is the verifier's job,
    so that it can report the failure as a verification error.
    """

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    attested: AttestedInfo
    raw: bytes = field(default=b"", repr=False, compare=False)

    def marshal(self) -> bytes:
        """Marshal to TPMS_ATTEST bytes (equal to ``raw`` for a parsed value)."""
        w = Writer("TPMS_ATTEST")
        w.u32(self.magic, "magic").u16(self.type, "type")
        w.tpm2b(self.qualified_signer, "qualifiedSigner", MAX_NAME)
        w.tpm2b(self.extra_data, "extraData", MAX_DATA)
        _write_clock(w, self.clock_info)
        w.u64(self.firmware_version, "firmwareVersion")
        writer = _ATTESTED_WRITERS.get(self.type)
        expected = _ATTESTED_TYPES.get(self.type)
        if writer is None or expected is None or not isinstance(self.attested, expected):
            raise StructureError(
                f"TPMS_ATTEST.attested: {type(self.attested).__name__} does not match type 0x{self.type:04x}")
        writer(w, self.attested)
        return w.to_bytes()


def _read_clock(r: Reader, name: str) -> ClockInfo:
    at = r.offset
    clock, reset, restart, safe = r.unpack(_CLOCK, name)
    if safe > 1:  # TPMI_YES_NO (Part 2, 9.2)
        raise r.error(name + ".safe", f"TPMI_YES_NO must be 0 or 1, got {safe}", offset=at + 16)
    return ClockInfo(clock, reset, restart, bool(safe))


def _write_clock(w: Writer, c: ClockInfo) -> None:
    w.u64(c.clock, "clock").u32(c.reset_count, "resetCount").u32(c.restart_count, "restartCount")
    w.u8(1 if c.safe else 0, "safe")


def _read_quote(r: Reader) -> AttestedQuote:
    sel = _read_pcr_selection(r)
    return AttestedQuote(sel, r.tpm2b("pcrDigest", MAX_DIGEST))


def _read_certify(r: Reader) -> AttestedCertify:
    return AttestedCertify(r.tpm2b("name", MAX_NAME), r.tpm2b("qualifiedName", MAX_NAME))


def _read_creation(r: Reader) -> AttestedCreation:
    return AttestedCreation(r.tpm2b("objectName", MAX_NAME), r.tpm2b("creationHash", MAX_DIGEST))


def _read_command_audit(r: Reader) -> AttestedCommandAudit:
    counter = r.u64("auditCounter")
    alg = _hash_alg(r, "digestAlg")
    return AttestedCommandAudit(counter, alg, r.tpm2b("auditDigest", MAX_DIGEST),
                                r.tpm2b("commandDigest", MAX_DIGEST))


def _read_session_audit(r: Reader) -> AttestedSessionAudit:
    at = r.offset
    exclusive = r.u8("exclusiveSession")
    if exclusive > 1:
        raise r.error("exclusiveSession", f"TPMI_YES_NO must be 0 or 1, got {exclusive}", offset=at)
    return AttestedSessionAudit(bool(exclusive), r.tpm2b("sessionDigest", MAX_DIGEST))


def _read_time(r: Reader) -> AttestedTime:
    time = r.u64("time.time")
    clock = _read_clock(r, "time.clockInfo")
    return AttestedTime(time, clock, r.u64("firmwareVersion"))


def _read_nv(r: Reader) -> AttestedNV:
    name = r.tpm2b("indexName", MAX_NAME)
    offset = r.u16("offset")
    return AttestedNV(name, offset, r.tpm2b("nvContents", MAX_NV_BUFFER))


def _read_nv_digest(r: Reader) -> AttestedNVDigest:
    return AttestedNVDigest(r.tpm2b("indexName", MAX_NAME), r.tpm2b("nvDigest", MAX_DIGEST))


def _write_quote(w: Writer, a: AttestedInfo) -> None:
    assert isinstance(a, AttestedQuote)
    _write_pcr_selection(w, a.pcr_select)
    w.tpm2b(a.pcr_digest, "pcrDigest", MAX_DIGEST)


def _write_certify(w: Writer, a: AttestedInfo) -> None:
    assert isinstance(a, AttestedCertify)
    w.tpm2b(a.name, "name", MAX_NAME).tpm2b(a.qualified_name, "qualifiedName", MAX_NAME)


def _write_creation(w: Writer, a: AttestedInfo) -> None:
    assert isinstance(a, AttestedCreation)
    w.tpm2b(a.object_name, "objectName", MAX_NAME).tpm2b(a.creation_hash, "creationHash", MAX_DIGEST)


def _write_command_audit(w: Writer, a: AttestedInfo) -> None:
    assert isinstance(a, AttestedCommandAudit)
    w.u64(a.audit_counter, "auditCounter").u16(a.digest_alg, "digestAlg")
    w.tpm2b(a.audit_digest, "auditDigest", MAX_DIGEST).tpm2b(a.command_digest, "commandDigest", MAX_DIGEST)


def _write_session_audit(w: Writer, a: AttestedInfo) -> None:
    assert isinstance(a, AttestedSessionAudit)
    w.u8(1 if a.exclusive_session else 0).tpm2b(a.session_digest, "sessionDigest", MAX_DIGEST)


def _write_time(w: Writer, a: AttestedInfo) -> None:
    assert isinstance(a, AttestedTime)
    w.u64(a.time, "time")
    _write_clock(w, a.clock_info)
    w.u64(a.firmware_version, "firmwareVersion")


def _write_nv(w: Writer, a: AttestedInfo) -> None:
    assert isinstance(a, AttestedNV)
    w.tpm2b(a.index_name, "indexName", MAX_NAME).u16(a.offset, "offset")
    w.tpm2b(a.nv_contents, "nvContents", MAX_NV_BUFFER)


def _write_nv_digest(w: Writer, a: AttestedInfo) -> None:
    assert isinstance(a, AttestedNVDigest)
    w.tpm2b(a.index_name, "indexName", MAX_NAME).tpm2b(a.nv_digest, "nvDigest", MAX_DIGEST)


# TPMU_ATTEST selectors (Part 2, 10.12.11): TPMI_ST_ATTEST value -> arm.
_ATTESTED_READERS: dict[int, Callable[[Reader], AttestedInfo]] = {
    StructureTag.ATTEST_QUOTE: _read_quote,
    StructureTag.ATTEST_CERTIFY: _read_certify,
    StructureTag.ATTEST_CREATION: _read_creation,
    StructureTag.ATTEST_COMMAND_AUDIT: _read_command_audit,
    StructureTag.ATTEST_SESSION_AUDIT: _read_session_audit,
    StructureTag.ATTEST_TIME: _read_time,
    StructureTag.ATTEST_NV: _read_nv,
    StructureTag.ATTEST_NV_DIGEST: _read_nv_digest,
}
_ATTESTED_WRITERS: dict[int, Callable[[Writer, AttestedInfo], None]] = {
    StructureTag.ATTEST_QUOTE: _write_quote,
    StructureTag.ATTEST_CERTIFY: _write_certify,
    StructureTag.ATTEST_CREATION: _write_creation,
    StructureTag.ATTEST_COMMAND_AUDIT: _write_command_audit,
    StructureTag.ATTEST_SESSION_AUDIT: _write_session_audit,
    StructureTag.ATTEST_TIME: _write_time,
    StructureTag.ATTEST_NV: _write_nv,
    StructureTag.ATTEST_NV_DIGEST: _write_nv_digest,
}
_ATTESTED_TYPES: dict[int, type] = {
    StructureTag.ATTEST_QUOTE: AttestedQuote,
    StructureTag.ATTEST_CERTIFY: AttestedCertify,
    StructureTag.ATTEST_CREATION: AttestedCreation,
    StructureTag.ATTEST_COMMAND_AUDIT: AttestedCommandAudit,
    StructureTag.ATTEST_SESSION_AUDIT: AttestedSessionAudit,
    StructureTag.ATTEST_TIME: AttestedTime,
    StructureTag.ATTEST_NV: AttestedNV,
    StructureTag.ATTEST_NV_DIGEST: AttestedNVDigest,
}


def _tpm2b_error(data: bytes, pos: int, field_name: str, max_size: int, structure: str) -> NoReturn:
    """Raise the precise error for a TPM2B at ``pos`` that an inline fast path found out of bounds."""
    tpm2b_at(data, pos, len(data), structure, field_name, max_size)
    raise structure_error(structure, field_name, pos, "invalid TPM2B")  # not reached: tpm2b_at raised


# One unpacked TPMS_ATTEST: magic, type, qualifiedSigner, extraData, clock, resetCount, restartCount, safe,
# firmwareVersion, offset of the attested union, then for a quote the PCR selection and pcrDigest.
AttestTuple = tuple[int, int, bytes, bytes, int, int, int, int, int, int,
                    tuple[tuple[int, int, tuple[int, ...]], ...] | None, bytes | None]


def unpack_attest(data: bytes) -> AttestTuple:
    """Unpack a TPMS_ATTEST (Part 2, 10.12.12) into a tuple, without building objects.

    Returns ``(magic, type, qualifiedSigner, extraData, clock, resetCount, restartCount, safe,
    firmwareVersion, union offset, selection, pcrDigest)``.  For TPM_ST_ATTEST_QUOTE the TPMS_QUOTE_INFO
    arm is unpacked too (``selection`` as from :func:`unpack_pcr_selection`) and must end the data;
    for other types the last two items are None and the caller parses the arm from the union offset.
    This is the server's hot path (and what :func:`parse_attest` builds on): TPM2B fields are read
    inline, and only an out-of-bounds one goes through :func:`tpm2b_at` for its error message.
    """
    n = len(data)
    if n > MAX_ATTEST:
        raise StructureError(f"TPMS_ATTEST: {n} bytes exceed the maximum {MAX_ATTEST}")
    if n < 8:
        if n < 6:
            raise truncated("TPMS_ATTEST", "magic", 0, 6, n)
        _tpm2b_error(data, 6, "qualifiedSigner", MAX_NAME, "TPMS_ATTEST")
    magic, st, size = _HEADER_SIZE.unpack_from(data, 0)
    if st not in _ATTESTED_READERS:
        raise structure_error("TPMS_ATTEST", "type", 4, f"not a TPMI_ST_ATTEST value: 0x{st:04x}")
    pos = 8 + size
    if size > MAX_NAME or pos > n:
        _tpm2b_error(data, 6, "qualifiedSigner", MAX_NAME, "TPMS_ATTEST")
    signer = data[8:pos]
    if pos + 2 > n:
        _tpm2b_error(data, pos, "extraData", MAX_DATA, "TPMS_ATTEST")
    size = (data[pos] << 8) | data[pos + 1]
    start = pos + 2
    pos = start + size
    if size > MAX_DATA or pos > n:
        _tpm2b_error(data, start - 2, "extraData", MAX_DATA, "TPMS_ATTEST")
    extra = data[start:pos]
    if pos + 25 > n:
        raise truncated("TPMS_ATTEST", "clockInfo", pos, 25, n - pos)
    clock, reset, restart, safe, firmware = _CLOCK_FW.unpack_from(data, pos)
    if safe > 1:  # TPMI_YES_NO (Part 2, 9.2)
        raise structure_error("TPMS_ATTEST", "clockInfo.safe", pos + 16,
                              f"TPMI_YES_NO must be 0 or 1, got {safe}")
    arm = pos + 25
    if st != _ST_QUOTE:
        return magic, st, signer, extra, clock, reset, restart, safe, firmware, arm, None, None
    # TPMS_QUOTE_INFO (Part 2, 10.12.1): TPML_PCR_SELECTION pcrSelect, TPM2B_DIGEST pcrDigest.
    selection, pos = unpack_pcr_selection(data, arm, n, "TPMS_ATTEST")
    if pos + 2 > n:
        _tpm2b_error(data, pos, "pcrDigest", MAX_DIGEST, "TPMS_ATTEST")
    size = (data[pos] << 8) | data[pos + 1]
    start = pos + 2
    pos = start + size
    if size > MAX_DIGEST or pos > n:
        _tpm2b_error(data, start - 2, "pcrDigest", MAX_DIGEST, "TPMS_ATTEST")
    if pos != n:
        raise structure_error("TPMS_ATTEST", "end", pos, f"{n - pos} unexpected trailing bytes")
    return magic, st, signer, extra, clock, reset, restart, safe, firmware, arm, selection, data[start:pos]


def parse_attest(data: bytes) -> Attest:
    """Parse a TPMS_ATTEST (``tpm2_quote -m``, ``tpm2_certify -o``); it must use all of ``data``."""
    if not isinstance(data, bytes):
        data = bytes(data)
    magic, st, signer, extra, clock, reset, restart, safe, firmware, pos, selection, digest = (
        unpack_attest(data))
    attested: AttestedInfo
    if selection is not None and digest is not None:
        pcr_select = tuple(PcrSelection(alg, pcrs, size) for alg, size, pcrs in selection)
        attested = AttestedQuote(pcr_select, digest)
    else:
        r = Reader(data, "TPMS_ATTEST", start=pos)
        attested = _ATTESTED_READERS[st](r)
        r.expect_end()
    return Attest(magic, st, signer, extra, ClockInfo(clock, reset, restart, bool(safe)), firmware,
                  attested, data)


# =================================================================================================
# TPMT_SIGNATURE
# =================================================================================================
@dataclass(frozen=True, slots=True)
class RsaSignature:
    """TPMT_SIGNATURE with TPMS_SIGNATURE_RSA (Part 2, 11.3.1): RSASSA or RSAPSS."""

    sig_alg: int
    hash_alg: int
    sig: bytes
    raw: bytes = field(default=b"", repr=False, compare=False)

    def marshal(self) -> bytes:
        w = Writer("TPMT_SIGNATURE").u16(self.sig_alg, "sigAlg").u16(self.hash_alg, "hash")
        return w.tpm2b(self.sig, "sig", MAX_RSA_BYTES).to_bytes()


@dataclass(frozen=True, slots=True)
class EccSignature:
    """TPMT_SIGNATURE with TPMS_SIGNATURE_ECC (Part 2, 11.3.2): ECDSA, r and s as big-endian octets."""

    sig_alg: int
    hash_alg: int
    r: bytes
    s: bytes
    raw: bytes = field(default=b"", repr=False, compare=False)

    def marshal(self) -> bytes:
        w = Writer("TPMT_SIGNATURE").u16(self.sig_alg, "sigAlg").u16(self.hash_alg, "hash")
        w.tpm2b(self.r, "signatureR", MAX_ECC_BYTES).tpm2b(self.s, "signatureS", MAX_ECC_BYTES)
        return w.to_bytes()


Signature = RsaSignature | EccSignature


def unpack_signature(data: bytes) -> tuple[int, int, bytes, bytes]:
    """Unpack a TPMT_SIGNATURE (Part 2, 11.3.4) without building objects; it must use all of ``data``.

    Returns ``(sigAlg, hash, first, second)``: ECDSA gives ``(r, s)``, RSASSA/RSAPSS ``(sig, b"")``.
    Only those three schemes are accepted; anything else (HMAC, ECDAA, SM2, ECSCHNORR, NULL) raises
    :class:`StructureError` naming the scheme, because the verifier has no business with it.
    """
    n = len(data)
    if n < 4:
        raise truncated("TPMT_SIGNATURE", "sigAlg", 0, 4, n)
    sig_alg, hash_alg = _SIG_HEAD.unpack_from(data, 0)
    if sig_alg == _ECDSA:  # TPMS_SIGNATURE_ECC: TPM2B_ECC_PARAMETER signatureR, signatureS
        size = (data[4] << 8) | data[5] if n >= 6 else MAX_ECC_BYTES + 1
        mid = 6 + size
        if size > MAX_ECC_BYTES or mid > n:
            _tpm2b_error(data, 4, "signature.signatureR", MAX_ECC_BYTES, "TPMT_SIGNATURE")
        first = data[6:mid]
        if mid + 2 > n:
            _tpm2b_error(data, mid, "signature.signatureS", MAX_ECC_BYTES, "TPMT_SIGNATURE")
        size = (data[mid] << 8) | data[mid + 1]
        pos = mid + 2 + size
        if size > MAX_ECC_BYTES or pos > n:
            _tpm2b_error(data, mid, "signature.signatureS", MAX_ECC_BYTES, "TPMT_SIGNATURE")
        second = data[mid + 2:pos]
    elif sig_alg in (_RSASSA, _RSAPSS):  # TPMS_SIGNATURE_RSA: TPM2B_PUBLIC_KEY_RSA sig
        first, pos = tpm2b_at(data, 4, n, "TPMT_SIGNATURE", "signature.sig", MAX_RSA_BYTES)
        second = b""
    else:
        raise structure_error("TPMT_SIGNATURE", "sigAlg", 0, f"unsupported signature scheme "
                              f"{alg_name(sig_alg)}; only RSASSA, RSAPSS and ECDSA are accepted")
    if hash_alg not in _HASH_IDS:
        raise structure_error("TPMT_SIGNATURE", "signature.hash", 2,
                              f"not a supported hash algorithm: {alg_name(hash_alg)}")
    if pos != n:
        raise structure_error("TPMT_SIGNATURE", "end", pos, f"{n - pos} unexpected trailing bytes")
    return sig_alg, hash_alg, first, second


def parse_signature(data: bytes) -> Signature:
    """Parse a TPMT_SIGNATURE (what ``tpm2_quote -s`` writes); see :func:`unpack_signature`."""
    if not isinstance(data, bytes):
        data = bytes(data)
    sig_alg, hash_alg, first, second = unpack_signature(data)
    if sig_alg == _ECDSA:
        return EccSignature(sig_alg, hash_alg, first, second, data)
    return RsaSignature(sig_alg, hash_alg, first, data)


# =================================================================================================
# TPMT_PUBLIC / TPM2B_PUBLIC
# =================================================================================================
@dataclass(frozen=True, slots=True)
class SymDef:
    """TPMT_SYM_DEF_OBJECT (Part 2, 11.1.7); ``key_bits`` and ``mode`` are 0 when ``algorithm`` is NULL."""

    algorithm: int = Alg.NULL
    key_bits: int = 0
    mode: int = 0


@dataclass(frozen=True, slots=True)
class Scheme:
    """TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_KDF_SCHEME (Part 2, 11.2.4.2, 11.2.5.6, 11.2.3.3).

    ``hash_alg`` is NULL when the scheme carries no hash (NULL, RSAES); ``count`` is only used by ECDAA.
    """

    scheme: int = Alg.NULL
    hash_alg: int = Alg.NULL
    count: int = 0


@dataclass(frozen=True, slots=True)
class RsaParms:
    """TPMS_RSA_PARMS (Part 2, 12.2.3.5). ``exponent`` 0 means the default 2**16 + 1."""

    symmetric: SymDef
    scheme: Scheme
    key_bits: int
    exponent: int


@dataclass(frozen=True, slots=True)
class EccParms:
    """TPMS_ECC_PARMS (Part 2, 12.2.3.6)."""

    symmetric: SymDef
    scheme: Scheme
    curve: int
    kdf: Scheme


@dataclass(frozen=True, slots=True)
class EccPoint:
    """TPMS_ECC_POINT (Part 2, 11.2.5.2)."""

    x: bytes
    y: bytes


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# TPM_ECC_CURVE -> (cryptography curve class, coordinate size in bytes).
_CURVES: dict[int, tuple[type[ec.EllipticCurve], int]] = {
    ECCCurve.NIST_P192: (ec.SECP192R1, 24),
    ECCCurve.NIST_P224: (ec.SECP224R1, 28),
    ECCCurve.NIST_P256: (ec.SECP256R1, 32),
    ECCCurve.NIST_P384: (ec.SECP384R1, 48),
    ECCCurve.NIST_P521: (ec.SECP521R1, 66),
}

_SYM_OBJECT_ALGS = frozenset({Alg.AES, ALG_SM4, ALG_CAMELLIA})          # TPMI_ALG_SYM_OBJECT
_RSA_SCHEMES_WITH_HASH = frozenset({Alg.RSASSA, Alg.RSAPSS, Alg.OAEP})  # TPMI_ALG_RSA_SCHEME
_RSA_SCHEMES_EMPTY = frozenset({Alg.RSAES, Alg.NULL})
_ECC_SCHEMES_WITH_HASH = frozenset({Alg.ECDSA, Alg.ECDAA, ALG_SM2, Alg.ECSCHNORR, Alg.ECDH, ALG_ECMQV})
_KDF_SCHEMES = frozenset({ALG_MGF1, Alg.KDF1_SP800_56A, ALG_KDF2, Alg.KDF1_SP800_108})  # TPMI_ALG_KDF


@dataclass(frozen=True, slots=True)
class PublicArea:
    """TPMT_PUBLIC (Part 2, 12.2.4) of an RSA or ECC key.

    ``unique`` is the RSA modulus (bytes) or the ECC public point (:class:`EccPoint`). ``raw`` holds
    the TPMT_PUBLIC bytes as received (without the TPM2B size); the Name is computed over them.
    """

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: RsaParms | EccParms
    unique: bytes | EccPoint
    raw: bytes = field(default=b"", repr=False, compare=False)

    def marshal(self) -> bytes:
        """Marshal to TPMT_PUBLIC bytes (equal to ``raw`` for a parsed value)."""
        w = Writer("TPMT_PUBLIC")
        w.u16(self.type, "type").u16(self.name_alg, "nameAlg").u32(self.object_attributes, "objectAttributes")
        w.tpm2b(self.auth_policy, "authPolicy", MAX_DIGEST)
        p = self.parameters
        _write_symdef(w, p.symmetric)
        _write_scheme(w, p.scheme)
        if self.type == Alg.RSA and isinstance(p, RsaParms) and isinstance(self.unique, bytes):
            w.u16(p.key_bits, "keyBits").u32(p.exponent, "exponent")
            w.tpm2b(self.unique, "unique.rsa", MAX_RSA_BYTES)
        elif self.type == Alg.ECC and isinstance(p, EccParms) and isinstance(self.unique, EccPoint):
            w.u16(p.curve, "curveID")
            _write_scheme(w, p.kdf)
            w.tpm2b(self.unique.x, "unique.ecc.x", MAX_ECC_BYTES).tpm2b(self.unique.y, "unique.ecc.y",
                                                                       MAX_ECC_BYTES)
        else:
            raise StructureError(f"TPMT_PUBLIC: type {alg_name(self.type)} does not match its parameters")
        return w.to_bytes()

    def marshal_tpm2b(self) -> bytes:
        """TPM2B_PUBLIC bytes (what ``tpm2_readpublic -o`` writes)."""
        return Writer("TPM2B_PUBLIC").tpm2b(self.raw or self.marshal(), "publicArea", MAX_PUBLIC).to_bytes()

    def name(self) -> bytes:
        """The object's Name: nameAlg (UINT16) || H_nameAlg(TPMT_PUBLIC as received) (Part 1, 16)."""
        if self.name_alg not in HASH_ALGS:
            raise StructureError(f"TPMT_PUBLIC.nameAlg: {alg_name(self.name_alg)} has no Name digest")
        body = self.raw or self.marshal()
        return self.name_alg.to_bytes(2, "big") + hashlib.new(HASH_ALGS[self.name_alg][2], body).digest()

    def public_key(self) -> PublicKey:
        """The key as a ``cryptography`` public key object; raises StructureError if it is not a valid key."""
        p = self.parameters
        if isinstance(p, RsaParms) and isinstance(self.unique, bytes):
            if len(self.unique) * 8 != p.key_bits:
                raise StructureError(f"TPMT_PUBLIC.unique.rsa: {len(self.unique)}-byte modulus for a "
                                     f"{p.key_bits}-bit key")
            # Part 2, 12.2.3.5: an exponent of zero means the default exponent 2**16 + 1.
            exponent = p.exponent or 65537
            try:
                return rsa.RSAPublicNumbers(exponent, int.from_bytes(self.unique, "big")).public_key()
            except ValueError as exc:
                raise StructureError(f"TPMT_PUBLIC: invalid RSA public key: {exc}") from None
        if isinstance(p, EccParms) and isinstance(self.unique, EccPoint):
            curve = _CURVES.get(p.curve)
            if curve is None:
                raise StructureError(f"TPMT_PUBLIC.curveID: unsupported curve 0x{p.curve:04x}")
            curve_cls, size = curve
            x, y = self.unique.x, self.unique.y
            if len(x) > size or len(y) > size:
                raise StructureError(f"TPMT_PUBLIC.unique.ecc: coordinate longer than {size} bytes")
            point = b"\x04" + x.rjust(size, b"\x00") + y.rjust(size, b"\x00")
            try:
                return ec.EllipticCurvePublicKey.from_encoded_point(curve_cls(), point)
            except ValueError as exc:
                raise StructureError(f"TPMT_PUBLIC.unique.ecc: not a point on the curve: {exc}") from None
        raise StructureError(f"TPMT_PUBLIC: type {alg_name(self.type)} does not match its parameters")


def _read_symdef(r: Reader) -> SymDef:
    """TPMT_SYM_DEF_OBJECT+ (Part 2, 11.1.7): algorithm, then keyBits and mode unless NULL."""
    at = r.offset
    alg = r.u16("parameters.symmetric.algorithm")
    if alg == Alg.NULL:
        return SymDef()
    if alg not in _SYM_OBJECT_ALGS:
        raise r.error("parameters.symmetric.algorithm",
                      f"not a symmetric object algorithm: {alg_name(alg)}", offset=at)
    return SymDef(alg, r.u16("parameters.symmetric.keyBits"), r.u16("parameters.symmetric.mode"))


def _write_symdef(w: Writer, s: SymDef) -> None:
    w.u16(s.algorithm, "symmetric.algorithm")
    if s.algorithm != Alg.NULL:
        w.u16(s.key_bits, "symmetric.keyBits").u16(s.mode, "symmetric.mode")


def _read_scheme(r: Reader, field_name: str, with_hash: frozenset[int], empty: frozenset[int]) -> Scheme:
    """A TPMT_*_SCHEME: scheme id then, for schemes that have one, the hash (ECDAA adds a count)."""
    at = r.offset
    scheme = r.u16(field_name + ".scheme")
    if scheme in empty:
        return Scheme(scheme)
    if scheme not in with_hash:
        raise r.error(field_name + ".scheme", f"scheme {alg_name(scheme)} is not allowed here", offset=at)
    hash_alg = _hash_alg(r, field_name + ".details.hashAlg")
    count = r.u16(field_name + ".details.count") if scheme == Alg.ECDAA else 0  # TPMS_SCHEME_ECDAA
    return Scheme(scheme, hash_alg, count)


def _write_scheme(w: Writer, s: Scheme) -> None:
    w.u16(s.scheme, "scheme")
    if s.scheme not in _RSA_SCHEMES_EMPTY:
        w.u16(s.hash_alg, "details.hashAlg")
        if s.scheme == Alg.ECDAA:
            w.u16(s.count, "details.count")


_EMPTY_NULL = frozenset({Alg.NULL})


def _read_tpmt_public(r: Reader) -> PublicArea:
    start = r.offset
    kind, name_alg, attributes = r.unpack(_PUB_HEAD, "type")
    if kind not in (Alg.RSA, Alg.ECC):
        raise r.error("type", f"unsupported key type {alg_name(kind)}; only RSA and ECC keys are accepted",
                      offset=start)
    if name_alg not in HASH_ALGS and name_alg != Alg.NULL:
        raise r.error("nameAlg", f"not a supported hash algorithm: {alg_name(name_alg)}", offset=start + 2)
    policy = r.tpm2b("authPolicy", MAX_DIGEST)
    symmetric = _read_symdef(r)
    parameters: RsaParms | EccParms
    unique: bytes | EccPoint
    if kind == Alg.RSA:
        scheme = _read_scheme(r, "parameters.scheme", _RSA_SCHEMES_WITH_HASH, _RSA_SCHEMES_EMPTY)
        key_bits = r.u16("parameters.keyBits")
        exponent = r.u32("parameters.exponent")
        parameters = RsaParms(symmetric, scheme, key_bits, exponent)
        unique = r.tpm2b("unique.rsa", MAX_RSA_BYTES)
    else:
        scheme = _read_scheme(r, "parameters.scheme", _ECC_SCHEMES_WITH_HASH, _EMPTY_NULL)
        curve = r.u16("parameters.curveID")
        kdf = _read_scheme(r, "parameters.kdf", _KDF_SCHEMES, _EMPTY_NULL)
        parameters = EccParms(symmetric, scheme, curve, kdf)
        unique = EccPoint(r.tpm2b("unique.ecc.x", MAX_ECC_BYTES), r.tpm2b("unique.ecc.y", MAX_ECC_BYTES))
    raw = r.data[start:r.offset]
    return PublicArea(kind, name_alg, attributes, policy, parameters, unique, raw)


def parse_tpmt_public(data: bytes) -> PublicArea:
    """Parse a bare TPMT_PUBLIC that must use exactly ``data``."""
    r = Reader(data, "TPMT_PUBLIC")
    public = _read_tpmt_public(r)
    r.expect_end()
    return public


def parse_tpm2b_public(data: bytes) -> PublicArea:
    """Parse a TPM2B_PUBLIC (``tpm2_readpublic -o``, ``tpm2_createak -u``); it must use all of ``data``.

    The TPM2B size must match the TPMT_PUBLIC exactly (Part 2, 12.2.5).
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    outer = Reader(data, "TPM2B_PUBLIC")
    inner = outer.sized("publicArea", MAX_PUBLIC)
    if inner.remaining == 0:
        raise inner.error("size", "empty public area")
    public = _read_tpmt_public(inner)
    inner.expect_end()
    outer.expect_end()
    return public


def marshal_tpm2b_public(public: PublicArea) -> bytes:
    """TPM2B_PUBLIC bytes of ``public`` (its ``raw`` bytes if it was parsed)."""
    return public.marshal_tpm2b()
