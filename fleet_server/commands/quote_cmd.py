"""`fleet-server quote verify`: check a TPM quote made by tpm2-tools, offline.

Inputs are the files tpm2-tools writes: ``tpm2_createak -u`` / ``tpm2_readpublic -o`` (TPM2B_PUBLIC),
``tpm2_quote -m`` (TPMS_ATTEST) and ``-s`` (TPMT_SIGNATURE), plus the PCR values as ``tpm2_pcrread``
prints them, as ``tpm2_quote -o`` writes them (``-F serialized``, the default) or as JSON
``{"pcrs": {"sha256": {"0": "<hex>"}}}``, and optionally the TCG event log to replay.

``--nonce ''`` checks a quote made without qualifying data (extraData empty), as ``tpm2_checkquote``
without ``-q`` does, e.g. one taken by a cloud provider's shielded-VM API; a warning on stderr says that
freshness is then not proven.

Exit codes: 0 the quote is valid, 1 it is not (one line on stderr says why), 2 usage error (missing or
unreadable file, bad hex nonce, PCR file of the wrong shape).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_server.verifier.quote import AttestationKey, QuoteInfo, check_replay, verify_quote
from protocol.errors import ConfigError, EdgeError
from protocol.tpm.constants import BANK_TO_ALG, HASH_ALGS

__all__ = [
    "UsageError",
    "load_pcr_file",
    "load_pcr_json",
    "load_pcr_serialized",
    "load_pcr_yaml",
    "register",
]


class UsageError(ConfigError):
    """The command line or an input file's shape is wrong: the handler exits with code 2."""


@dataclass(frozen=True, slots=True)
class _Inputs:
    ak_public: bytes
    message: bytes
    signature: bytes
    nonce: bytes
    pcrs: dict[str, dict[int, bytes]]
    eventlog: bytes | None


def register(subparsers: Any) -> None:
    """Add ``quote verify`` to the ``fleet-server`` sub-command parsers."""
    quote = subparsers.add_parser("quote", help="TPM quote commands",
                                  description="TPM 2.0 quote commands.")
    sub = quote.add_subparsers(dest="quote_command", metavar="SUBCOMMAND", required=True)
    verify = sub.add_parser(
        "verify", help="verify a TPM quote (tpm2_quote output) against an AK and PCR values",
        description="Verify a TPM2_Quote: signature by the AK over the TPMS_ATTEST as written, "
                    "TPM_GENERATED magic, quote type, nonce, PCR selection and PCR digest; optionally "
                    "replay an event log against the quoted PCRs. Exit 0 valid, 1 invalid, 2 usage error.")
    verify.add_argument("--ak-public", required=True, type=Path, metavar="FILE",
                        help="AK public area, TPM2B_PUBLIC (tpm2_createak -u, tpm2_readpublic -o)")
    verify.add_argument("--message", required=True, type=Path, metavar="FILE",
                        help="quoted TPMS_ATTEST (tpm2_quote -m)")
    verify.add_argument("--signature", required=True, type=Path, metavar="FILE",
                        help="TPMT_SIGNATURE (tpm2_quote -s)")
    verify.add_argument("--nonce", required=True, metavar="HEX",
                        help="the challenge nonce in hex (tpm2_quote -q); '' for a quote made without "
                             "one (extraData empty, as tpm2_checkquote without -q): freshness is then "
                             "not proven and a warning is printed")
    verify.add_argument("--pcrs", required=True, type=Path, metavar="FILE",
                        help="PCR values: tpm2_pcrread output, tpm2_quote -o (-F serialized) or JSON "
                             '{"pcrs": {"sha256": {"0": "<hex>"}}} (told apart by content); the quote '
                             "must select exactly these PCRs")
    verify.add_argument("--eventlog", type=Path, metavar="FILE",
                        help="TCG event log to replay; every quoted PCR it extends must match")
    verify.add_argument("--allow-sha1", action="store_true",
                        help="accept SHA-1 signatures and the SHA-1 PCR bank (legacy TPMs)")
    verify.add_argument("--json", action="store_true", help="print the result as a JSON object")
    verify.set_defaults(handler=_verify_command)


# -- input loading (usage errors) ------------------------------------------------------------------
def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def _parse_nonce(text: str) -> bytes:
    """Hex nonce; ``''`` (given explicitly) is the empty nonce: the quote's extraData must be empty."""
    if text == "":
        return b""
    hex_text = text[2:] if text[:2].lower() == "0x" else text
    try:
        nonce = bytes.fromhex(hex_text)
    except ValueError:
        raise UsageError(f"--nonce is not hexadecimal: {text!r}") from None
    if not nonce or not hex_text.isascii() or any(c.isspace() for c in hex_text):
        raise UsageError(f"--nonce must be a hex string (or '' for an empty nonce): {text!r}")
    return nonce


def _add_value(out: dict[str, dict[int, bytes]], bank: str, index: int, digest: bytes) -> None:
    """Check one PCR value (known bank, index 0-255, the bank's digest size, given once) and add it."""
    alg = BANK_TO_ALG.get(bank)
    if alg is None:
        raise UsageError(f"PCR file: unknown PCR bank {bank!r}")
    if not 0 <= index < 256:
        raise UsageError(f"PCR file: {bank} index {index} is not a PCR number")
    size = HASH_ALGS[alg][1]
    if len(digest) != size:
        raise UsageError(f"PCR file: {bank} PCR {index} value has {len(digest)} bytes, expected {size}")
    values = out.setdefault(bank, {})
    if index in values:
        raise UsageError(f"PCR file: {bank} PCR {index} is given twice")
    values[index] = digest


def load_pcr_json(data: bytes | str) -> dict[str, dict[int, bytes]]:
    """Decode ``{"pcrs": {"<bank>": {"<pcr index>": "<hex>"}}}`` (the project's JSON form).

    Other top-level keys are ignored.  Raises :class:`UsageError` for anything of the wrong shape: not
    JSON, unknown bank, index not a decimal integer 0-255, value not hex of the bank's digest size.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"PCR file is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("pcrs"), dict):
        raise UsageError('PCR file must be a JSON object with a "pcrs" object')
    out: dict[str, dict[int, bytes]] = {}
    for bank, values in doc["pcrs"].items():
        if bank not in BANK_TO_ALG:
            raise UsageError(f"PCR file: unknown PCR bank {bank!r}")
        if not isinstance(values, dict):
            raise UsageError(f"PCR file: bank {bank!r} must map PCR indices to hex values")
        out.setdefault(bank, {})
        for index, value in values.items():
            if not (isinstance(index, str) and index.isascii() and index.isdigit() and 0 <= int(index) < 256):
                raise UsageError(f"PCR file: {bank} index {index!r} is not a PCR number")
            if not isinstance(value, str):
                raise UsageError(f"PCR file: {bank} PCR {index} value must be a hex string")
            try:
                digest = bytes.fromhex(value)
            except ValueError:
                raise UsageError(f"PCR file: {bank} PCR {index} value is not hex") from None
            _add_value(out, bank, int(index), digest)
    return out


# tpm2_pcrread (and tpm2_checkquote) YAML: "  sha256:" then "    7 : 0x88..".  Parsed by hand: a YAML
# reader turns 0x... into an int and loses the leading zeros (and the digest length with them).
_YAML_BANK = re.compile(r"\s*([a-z0-9_]+)\s*:\s*")
_YAML_VALUE = re.compile(r"\s*([0-9]{1,3})\s*:\s*0x([0-9A-Fa-f]*)\s*")


def load_pcr_yaml(text: str) -> dict[str, dict[int, bytes]]:
    """Decode ``tpm2_pcrread`` output (an optional ``pcrs:`` line first, as tpm2_checkquote prints)."""
    out: dict[str, dict[int, bytes]] = {}
    bank: str | None = None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if lines and lines[0][1].strip() == "pcrs:":
        lines = lines[1:]
    for number, line in lines:
        if m := _YAML_VALUE.fullmatch(line):
            if bank is None:
                raise UsageError(f"PCR file line {number}: a PCR value before any bank")
            if len(m.group(2)) % 2:
                raise UsageError(f"PCR file line {number}: {bank} PCR {m.group(1)} value is not whole bytes")
            _add_value(out, bank, int(m.group(1)), bytes.fromhex(m.group(2)))
        elif m := _YAML_BANK.fullmatch(line):
            bank = m.group(1)
            if bank not in BANK_TO_ALG:
                raise UsageError(f"PCR file: unknown PCR bank {bank!r}")
            if bank in out:
                raise UsageError(f"PCR file: bank {bank} is given twice")
            out[bank] = {}
        else:
            raise UsageError("PCR file is not JSON, tpm2_pcrread output or a tpm2-tools serialized PCR "
                             f"file (line {number}: {line.strip()[:40]!r})")
    if not out:
        raise UsageError("PCR file has no PCR banks")
    return out


# tpm2_quote -o / tpm2_pcrread -o with -F serialized (tpm2-tools lib/pcr.c, pcr_fwrite_serialized): the
# C structures as in memory, little endian: TPML_PCR_SELECTION (UINT32 count, then 16 TPMS_PCR_SELECTION
# slots of UINT16 hash, UINT8 sizeofSelect, BYTE pcrSelect[4], 1 padding byte), a UINT32 number of
# TPML_DIGEST, and that many TPML_DIGEST (UINT32 count, then 8 TPM2B_DIGEST slots of UINT16 size +
# 64 bytes).  The values run through the lists in selection order (banks as selected, PCRs ascending).
_SER_BANKS, _SER_SEL = 16, struct.Struct("<HB4sx")
_SER_DIGESTS, _SER_DIGEST = 8, struct.Struct("<H64s")
_SER_HEAD = 4 + _SER_BANKS * _SER_SEL.size
_SER_LIST = 4 + _SER_DIGESTS * _SER_DIGEST.size


def load_pcr_serialized(data: bytes) -> dict[str, dict[int, bytes]]:
    """Decode a tpm2-tools ``-F serialized`` PCR file (see the layout above)."""
    if len(data) < _SER_HEAD + 4 or (len(data) - _SER_HEAD - 4) % _SER_LIST:
        raise UsageError(f"PCR file of {len(data)} bytes is not JSON, tpm2_pcrread output or a "
                         "tpm2-tools serialized PCR file")
    (count,) = struct.unpack_from("<I", data, 0)
    (lists,) = struct.unpack_from("<I", data, _SER_HEAD)
    if not 0 < count <= _SER_BANKS or lists != (len(data) - _SER_HEAD - 4) // _SER_LIST:
        raise UsageError("PCR file is not a valid tpm2-tools serialized PCR file "
                         f"({count} banks, {lists} digest lists in {len(data)} bytes)")
    selection: list[tuple[str, list[int]]] = []
    for slot in range(count):
        alg, size_of_select, select = _SER_SEL.unpack_from(data, 4 + slot * _SER_SEL.size)
        if alg not in HASH_ALGS:
            raise UsageError(f"PCR file: unknown PCR bank algorithm 0x{alg:04x}")
        if size_of_select > 4:
            raise UsageError(f"PCR file: {HASH_ALGS[alg][0]} sizeofSelect {size_of_select} is over 4")
        pcrs = [8 * i + bit for i in range(size_of_select) for bit in range(8) if select[i] >> bit & 1]
        selection.append((HASH_ALGS[alg][0], pcrs))
    digests: list[bytes] = []
    for n in range(lists):
        base = _SER_HEAD + 4 + n * _SER_LIST
        (in_list,) = struct.unpack_from("<I", data, base)
        if in_list > _SER_DIGESTS:
            raise UsageError(f"PCR file: digest list {n} holds {in_list} digests, at most {_SER_DIGESTS}")
        for k in range(in_list):
            size, buf = _SER_DIGEST.unpack_from(data, base + 4 + k * _SER_DIGEST.size)
            if size > len(buf):
                raise UsageError(f"PCR file: digest size {size} is over {len(buf)}")
            digests.append(buf[:size])
    wanted = sum(len(pcrs) for _, pcrs in selection)
    if len(digests) != wanted:
        raise UsageError(f"PCR file selects {wanted} PCRs but holds {len(digests)} values")
    out: dict[str, dict[int, bytes]] = {}
    values = iter(digests)
    for bank, pcrs in selection:
        if bank in out:
            raise UsageError(f"PCR file: bank {bank} is selected twice")
        out[bank] = {}
        for pcr in pcrs:
            _add_value(out, bank, pcr, next(values))
    return out


def load_pcr_file(data: bytes) -> dict[str, dict[int, bytes]]:
    """PCR values from any of the forms accepted by ``--pcrs``, told apart by their content.

    A serialized file always holds NUL bytes (its counts are small little-endian integers) and the text
    forms never do; of the text forms, JSON starts with a bracket and tpm2_pcrread output with a name.
    """
    if b"\x00" in data:
        return load_pcr_serialized(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("PCR file is not JSON, tpm2_pcrread output or a tpm2-tools serialized "
                         "PCR file") from None
    if text.lstrip()[:1] in ("{", "["):
        return load_pcr_json(text)
    return load_pcr_yaml(text)


def _load(args: argparse.Namespace) -> _Inputs:
    nonce = _parse_nonce(args.nonce)
    pcrs = load_pcr_file(_read(args.pcrs, "PCR file"))
    return _Inputs(
        ak_public=_read(args.ak_public, "AK public file"),
        message=_read(args.message, "quote message file"),
        signature=_read(args.signature, "signature file"),
        nonce=nonce,
        pcrs=pcrs,
        eventlog=_read(args.eventlog, "event log") if args.eventlog is not None else None,
    )


# -- verification ----------------------------------------------------------------------------------
def _quote_json(info: QuoteInfo) -> dict[str, Any]:
    return {
        "sig_alg": info.sig_alg,
        "hash_alg": info.hash_alg,
        "clock": {"clock": info.clock, "reset_count": info.reset_count,
                  "restart_count": info.restart_count, "safe": info.safe},
        "firmware_version": info.firmware_version,
        "qualified_signer": info.qualified_signer.hex(),
        "selection": info.selection_dict(),
        "pcr_digest": info.pcr_digest.hex(),
    }


def _check_eventlog(data: bytes, pcrs: Mapping[str, Mapping[int, bytes]]) -> list[str]:
    # Imported here: only this option needs the event-log module.
    from fleet_server.verifier.eventlog import parse_eventlog, replay

    replayed = replay(parse_eventlog(data))
    checked = check_replay(replayed, pcrs)
    return [f"{bank}:{pcr}" for bank, pcr in checked]


def _verify_command(args: argparse.Namespace) -> int:
    try:
        inputs = _load(args)
    except UsageError as exc:
        print(f"fleet-server: {exc}", file=sys.stderr)
        return 2
    if not inputs.nonce:
        # Still checked (extraData must be empty), but nothing shows the quote is recent: say so.
        print("fleet-server: warning: empty nonce: the quote's freshness is not proven (it may be replayed)",
              file=sys.stderr)
    result: dict[str, Any] = {"valid": False, "reason": None}
    try:
        ak = AttestationKey.from_tpm2b_public(inputs.ak_public)
        result["ak_name"] = ak.name.hex()
        info = verify_quote(ak=ak, attest=inputs.message, signature=inputs.signature, nonce=inputs.nonce,
                            pcr_values=inputs.pcrs, allow_sha1=args.allow_sha1)
        result.update(_quote_json(info))
        if inputs.eventlog is not None:
            result["eventlog"] = {"checked": _check_eventlog(inputs.eventlog, inputs.pcrs)}
    except EdgeError as exc:
        result["reason"] = exc.diagnostics()
        if args.json:
            print(json.dumps(result, indent=2))
        print(f"fleet-server: {exc.diagnostics()}", file=sys.stderr)
        return 1
    result["valid"] = True
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        selection = "; ".join(f"{bank}:{','.join(map(str, pcrs))}" for bank, pcrs in info.selection)
        checked = result.get("eventlog", {}).get("checked")
        log_note = f", event log matches {len(checked)} quoted PCRs" if checked is not None else ""
        print(f"quote valid: {info.sig_alg}/{info.hash_alg} over {selection} "
              f"(resetCount {info.reset_count}, restartCount {info.restart_count}){log_note}")
    return 0
