"""The firmware bundle file: one release's boot images and manifest as one TUF target (``*.fwb``).

``firmware-sim release build`` writes a bundle *folder* (``release.json``, ``reference-values.json``
and ``images/``); ``fleet-server release add`` packs it into this single file, which becomes a target
of the ``firmware`` role; the agent unpacks it into its inactive A/B slot.  TUF already proves the
file's length and hashes; this format adds nothing cryptographic, it only has to be unambiguous and
bounded, so a hostile file cannot make the unpacker allocate or write more than it says.

Layout (integers big-endian)::

    b"EDGEFWB1" | u32 header length H | header (canonical JSON, H bytes) | file 1 | file 2 | ...

    header = {"format": 1, "manifest": {...},                         # release.json's content
              "files": [{"name": "firmware.bin", "size": N, "sha256": "<hex>"}, ...]}

Files follow in header order, back to back; the bundle ends exactly after the last one.  Names are
plain file names (``[a-z0-9][a-z0-9._-]{0,63}``, no folders), unique, at most :data:`MAX_FILES`.

Pure: bytes in, :class:`Bundle` out, or :class:`BundleError`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from protocol.encoding import JsonValue, canonical_bytes, decode_object
from protocol.errors import MalformedInputError

MAGIC = b"EDGEFWB1"
FORMAT = 1
MAX_FILES = 32
MAX_HEADER = 64 * 1024
MAX_BUNDLE = 512 * 1024 * 1024
FILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SUFFIX = ".fwb"


class BundleError(MalformedInputError):
    """A firmware bundle is malformed, truncated, oversized or inconsistent with its header."""


@dataclass(frozen=True, slots=True)
class Bundle:
    manifest: Mapping[str, JsonValue]
    files: Mapping[str, bytes]  # name -> content, in header order


def pack(manifest: Mapping[str, JsonValue], files: Mapping[str, bytes]) -> bytes:
    """The bundle bytes for ``manifest`` and ``files`` (deterministic: files in name order)."""
    if len(files) > MAX_FILES:
        raise BundleError(f"firmware bundle: at most {MAX_FILES} files")
    entries: list[JsonValue] = []
    for name in sorted(files):
        if FILE_NAME_RE.fullmatch(name) is None:
            raise BundleError(f"firmware bundle: invalid file name {name[:80]!r}")
        entries.append({"name": name, "size": len(files[name]),
                        "sha256": hashlib.sha256(files[name]).hexdigest()})
    header = canonical_bytes({"format": FORMAT, "manifest": dict(manifest), "files": entries})
    if len(header) > MAX_HEADER:
        raise BundleError("firmware bundle: manifest too large")
    out = b"".join([MAGIC, len(header).to_bytes(4, "big"), header, *(files[n] for n in sorted(files))])
    if len(out) > MAX_BUNDLE:
        raise BundleError(f"firmware bundle: larger than {MAX_BUNDLE} bytes")
    return out


def unpack(data: bytes) -> Bundle:
    """Strictly decode a bundle: every size, name and digest must match its header."""
    if len(data) > MAX_BUNDLE:
        raise BundleError(f"firmware bundle: larger than {MAX_BUNDLE} bytes")
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise BundleError("firmware bundle: not an EDGEFWB1 file")
    hlen = int.from_bytes(data[8:12], "big")
    if hlen > MAX_HEADER or 12 + hlen > len(data):
        raise BundleError("firmware bundle: bad header length")
    try:
        header = decode_object(data[12 : 12 + hlen], max_size=MAX_HEADER)
    except MalformedInputError as exc:
        raise BundleError(f"firmware bundle: header is not canonical JSON ({exc})") from None
    if not isinstance(header, dict) or set(header) != {"format", "manifest", "files"} \
            or header["format"] != FORMAT or not isinstance(header["manifest"], dict) \
            or not isinstance(header["files"], list) or len(header["files"]) > MAX_FILES:
        raise BundleError("firmware bundle: header must be {format: 1, manifest: {...}, files: [...]}")
    pos = 12 + hlen
    files: dict[str, bytes] = {}
    for entry in header["files"]:
        if not isinstance(entry, dict) or set(entry) != {"name", "size", "sha256"}:
            raise BundleError("firmware bundle: a file entry must have name, size and sha256")
        name, size, digest = entry["name"], entry["size"], entry["sha256"]
        if not isinstance(name, str) or FILE_NAME_RE.fullmatch(name) is None or name in files:
            raise BundleError(f"firmware bundle: invalid or repeated file name {str(name)[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or pos + size > len(data):
            raise BundleError(f"firmware bundle: {name}: size out of range")
        if not isinstance(digest, str) or re.fullmatch(r"[0-9a-f]{64}", digest) is None:
            raise BundleError(f"firmware bundle: {name}: sha256 must be 64 hex digits")
        content = data[pos : pos + size]
        if not hmac.compare_digest(hashlib.sha256(content).hexdigest(), digest):
            raise BundleError(f"firmware bundle: {name}: content does not match its sha256")
        files[name] = content
        pos += size
    if pos != len(data):
        raise BundleError("firmware bundle: bytes after the last file")
    return Bundle(manifest=MappingProxyType(dict(header["manifest"])), files=MappingProxyType(files))
