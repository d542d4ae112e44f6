"""`fleet-server quote verify`: check a TPM quote made by tpm2-tools, offline.

Inputs are the files tpm2-tools writes: ``tpm2_createak -u`` / ``tpm2_readpublic -o`` (TPM2B_PUBLIC),
``tpm2_quote -m`` (TPMS_ATTEST) and ``-s`` (TPMT_SIGNATURE), plus the PCR values as JSON
``{"pcrs": {"sha256": {"0": "<hex>"}}}`` and optionally the TCG event log to replay.

``--nonce ''`` checks a quote made without qualifying data (extraData empty), as ``tpm2_checkquote``
without ``-q`` does, e.g. one taken by a cloud provider's shielded-VM API; a warning on stderr says that
freshness is then not proven.

Exit codes: 0 the quote is valid, 1 it is not (one line on stderr says why), 2 usage error (missing or
unreadable file, bad hex nonce, PCR file of the wrong shape).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_server.verifier.quote import AttestationKey, QuoteInfo, check_replay, verify_quote
from protocol.errors import ConfigError, EdgeError
from protocol.tpm.constants import BANK_TO_ALG, HASH_ALGS

__all__ = ["UsageError", "load_pcr_json", "register"]


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
                        help='PCR values, JSON {"pcrs": {"sha256": {"0": "<hex>"}}}; the quote must '
                             "select exactly these PCRs")
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


def load_pcr_json(data: bytes | str) -> dict[str, dict[int, bytes]]:
    """Decode ``{"pcrs": {"<bank>": {"<pcr index>": "<hex>"}}}`` (the tpm2-tools-compatible form).

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
        alg = BANK_TO_ALG.get(bank)
        if alg is None:
            raise UsageError(f"PCR file: unknown PCR bank {bank!r}")
        if not isinstance(values, dict):
            raise UsageError(f"PCR file: bank {bank!r} must map PCR indices to hex values")
        size = HASH_ALGS[alg][1]
        bank_values: dict[int, bytes] = {}
        for index, value in values.items():
            if not (isinstance(index, str) and index.isascii() and index.isdigit() and 0 <= int(index) < 256):
                raise UsageError(f"PCR file: {bank} index {index!r} is not a PCR number")
            if not isinstance(value, str):
                raise UsageError(f"PCR file: {bank} PCR {index} value must be a hex string")
            try:
                digest = bytes.fromhex(value)
            except ValueError:
                raise UsageError(f"PCR file: {bank} PCR {index} value is not hex") from None
            if len(digest) != size:
                raise UsageError(
                    f"PCR file: {bank} PCR {index} value has {len(digest)} bytes, expected {size}")
            if int(index) in bank_values:
                raise UsageError(f"PCR file: {bank} PCR {int(index)} is given twice")
            bank_values[int(index)] = digest
        out[bank] = bank_values
    return out


def _load(args: argparse.Namespace) -> _Inputs:
    nonce = _parse_nonce(args.nonce)
    pcrs = load_pcr_json(_read(args.pcrs, "PCR file"))
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
