"""``fleet-server eventlog``: inspect and replay TCG firmware event logs offline.

* ``fleet-server eventlog replay LOG [--json] [--bank BANK]...`` prints the PCR values replaying the log
  gives, for every PCR at least one event extends (the tpm2-tools-compatible JSON with ``--json``:
  ``{"pcrs": {"sha256": {"0": "<hex>"}}}``).
* ``fleet-server eventlog show LOG [--json]`` prints every event: index, PCR, type, digests and the
  decoded event data.

``LOG`` is a file (``-`` for standard input) of at most :data:`MAX_LOG_BYTES`.  A malformed log, a
missing or oversized file is reported by ``fleet-server`` as one line on stderr with exit status 1;
usage errors exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, BinaryIO

from fleet_server.verifier.eventlog import NUM_PCRS, EventLog, describe_event, parse_eventlog, replay
from protocol.errors import EdgeError, MalformedInputError

#: Largest event log accepted (real logs are 2-100 KiB; a firmware log area is at most a few MiB).
MAX_LOG_BYTES = 64 * 1024 * 1024
_CHUNK = 1024 * 1024
_TEXT_HEX_MAX = 64  # bytes of undecoded data shown in the text view


def register(subparsers: Any) -> None:
    """Add the ``eventlog`` command and its sub-commands to ``fleet-server``'s sub-parsers."""
    parser = subparsers.add_parser(
        "eventlog", help="inspect and replay TCG firmware event logs",
        description="Inspect and replay TCG PC Client firmware event logs (crypto-agile or SHA-1).")
    sub = parser.add_subparsers(dest="eventlog_command", metavar="SUBCOMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("log", metavar="LOG", help="binary event log file ('-' reads standard input)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--no-verify-digests", dest="verify_digests", action="store_false",
                        help="do not check digests against event data where the spec defines them")
    common.add_argument("--allow-padding", action="store_true",
                        help="accept trailing 0x00/0xFF padding after the last event")

    rep = sub.add_parser("replay", parents=[common], help="replay the log and print PCR values",
                         description="Replay the log: print every PCR at least one event extends, per bank.")
    rep.add_argument("--bank", action="append", metavar="BANK",
                     help="replay only this bank (repeatable; default: every bank of the log)")
    rep.set_defaults(handler=_replay)

    show = sub.add_parser("show", parents=[common], help="print the events",
                          description="Print every event with its digests and decoded data.")
    show.set_defaults(handler=_show)


# --- input ----------------------------------------------------------------------------------------


def read_log_file(path: str, limit: int = MAX_LOG_BYTES) -> bytes:
    """Read ``path`` (``-`` = stdin), refusing more than ``limit`` bytes.

    Files such as ``/sys/kernel/security/tpm0/binary_bios_measurements`` report size 0, so the bound is
    enforced while reading, not only from ``stat``.
    """
    if path == "-":
        return _read_bounded(sys.stdin.buffer, path, limit)
    try:
        with open(path, "rb") as handle:
            return _read_bounded(handle, path, limit)
    except OSError as exc:
        raise EdgeError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_bounded(handle: BinaryIO, path: str, limit: int) -> bytes:
    try:
        size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. a pipe wrapper)
        size = 0
    if size > limit:
        raise MalformedInputError(f"{path} is {size} bytes, over the {limit}-byte limit for event logs")
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = handle.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise MalformedInputError(f"{path} is over the {limit}-byte limit for event logs")
    return b"".join(chunks)


def _load(args: argparse.Namespace) -> EventLog:
    data = read_log_file(args.log)
    return parse_eventlog(data, verify_digests=args.verify_digests, allow_padding=args.allow_padding)


# --- replay ---------------------------------------------------------------------------------------


def pcrs_json(values: Mapping[str, Mapping[int, bytes]]) -> dict[str, dict[str, dict[str, str]]]:
    """The tpm2-tools-compatible JSON form; banks without any extended PCR are left out."""
    return {"pcrs": {bank: {str(pcr): value.hex() for pcr, value in sorted(pcrs.items())}
                     for bank, pcrs in values.items() if pcrs}}


def _replay(args: argparse.Namespace) -> int:
    log = _load(args)
    values = replay(log, args.bank)
    if args.json:
        return _emit([json.dumps(pcrs_json(values), indent=1)])
    rows = [(bank, pcr, value.hex()) for bank, pcrs in values.items() for pcr, value in sorted(pcrs.items())]
    lines = [f"{log.format} event log, {len(log.events)} events, banks: {', '.join(log.banks)}"
             + (f", startup locality {log.startup_locality}" if log.startup_locality is not None else "")]
    if not rows:
        lines.append("no PCR is extended by this log")
        return _emit(lines)
    width = max(len("bank"), *(len(bank) for bank, _, _ in rows))
    lines.append(f"{'bank':<{width}}  {'pcr':>3}  value")
    lines.extend(f"{bank:<{width}}  {pcr:>3}  {value}" for bank, pcr, value in rows)
    return _emit(lines)


def _emit(lines: list[str]) -> int:
    """Write the output in one go; a closed pipe (``| head``) is not an error."""
    try:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Keep the interpreter from complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


# --- show -----------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    log = _load(args)
    if args.json:
        document = {
            "format": log.format,
            "banks": list(log.banks),
            "digest_sizes": {str(alg): size for alg, size in log.digest_sizes.items()},
            "size": log.size,
            "padding": log.padding,
            "startup_locality": log.startup_locality,
            "events": [describe_event(ev) for ev in log.events],
        }
        return _emit([json.dumps(document, indent=1)])
    lines = [f"{log.format} event log: {len(log.events)} events, {log.size} bytes, "
             f"banks: {', '.join(log.banks)}"]
    if log.startup_locality is not None:
        lines.append(f"startup locality: {log.startup_locality}")
    for ev in log.events:
        info = describe_event(ev)
        lines.append("")
        # An index outside 0-23 (firmware uses 0xFFFFFFFF) names no PCR: shown in hex, not extended.
        pcr = f"{ev.pcr:<2}" if ev.pcr < NUM_PCRS else f"0x{ev.pcr:08x} (not extended)"
        lines.append(f"#{ev.index:<4} PCR {pcr} {info['type_name']}  (offset {ev.offset}, "
                     f"{len(ev.data)} data bytes)")
        lines.extend(f"      {bank}: {digest.hex()}" for bank, digest in ev.digests.items())
        data = info["data"]
        if isinstance(data, Mapping):
            lines.extend(_text_lines(data, "      "))
    return _emit(lines)


def _short(value: object) -> str:
    text = str(value)
    is_hex = isinstance(value, str) and all(c in "0123456789abcdef" for c in text)
    if is_hex and len(text) > 2 * _TEXT_HEX_MAX:
        return f"{text[: 2 * _TEXT_HEX_MAX]}... ({len(text) // 2} bytes)"
    return text


def _text_lines(data: Mapping[str, object], indent: str) -> list[str]:
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines.append(f"{indent}{key}:")
            lines.extend(_text_lines(value, indent + "  "))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            lines.append(f"{indent}{key}:")
            for item in value:
                lines.append(f"{indent}  - " + ", ".join(f"{k}={_short(v)}" for k, v in item.items()))
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: {', '.join(_short(v) for v in value)}")
        elif key == "text":
            lines.append(f"{indent}{json.dumps(value, ensure_ascii=False)}")
        else:
            lines.append(f"{indent}{key}: {_short(value)}")
    return lines
