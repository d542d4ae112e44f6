"""The firmware bundle file (protocol/firmware_bundle.py): round trip and hostile input."""

from __future__ import annotations

import hashlib

import pytest

from protocol.firmware_bundle import MAGIC, BundleError, pack, unpack

MANIFEST = {"format": 1, "device_class": "edge-camera", "version": "1.3.0"}
FILES = {"firmware.bin": b"F" * 100, "vmlinuz": b"K" * 50, "agent-class.toml": b"x = 1\n"}


def test_round_trip_is_deterministic() -> None:
    raw = pack(MANIFEST, FILES)
    assert raw == pack(MANIFEST, dict(reversed(list(FILES.items()))))
    b = unpack(raw)
    assert dict(b.files) == FILES and dict(b.manifest) == MANIFEST


@pytest.mark.parametrize("mutate", [
    lambda r: r[:-1],                       # truncated
    lambda r: r + b"\0",                    # trailing bytes
    lambda r: b"EDGEFWB2" + r[8:],          # wrong magic
    lambda r: r[:8] + (10**6).to_bytes(4, "big") + r[12:],  # header length beyond the file
    lambda r: r[:-3] + b"zzz",              # content differs from its digest
])
def test_malformed_bundles_are_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BundleError):
        unpack(mutate(pack(MANIFEST, FILES)))


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", "UPPER", ""])
def test_file_names_must_be_plain(name: str) -> None:
    with pytest.raises(BundleError):
        pack(MANIFEST, {name: b"x"})
    # and a hand-made header with such a name is refused on unpack too
    from protocol.encoding import canonical_bytes
    header = canonical_bytes({"format": 1, "manifest": {}, "files": [
        {"name": name, "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}]})
    with pytest.raises(BundleError):
        unpack(MAGIC + len(header).to_bytes(4, "big") + header + b"x")
