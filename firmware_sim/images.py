"""Deterministic boot images of a simulated edge device, and the public test vendor keys that sign them.

Every image is a function of ``(component, version, variant)`` only (:class:`ImageSpec`), so every
golden device of a class and firmware version carries byte-identical images and therefore identical
measurements: one set of reference values covers the whole fleet.

Components and the files they become in ``<device>/images/``:

=================  ===================  ==========  =====================================================
component          file                 size        signed by the vendor key
=================  ===================  ==========  =====================================================
``firmware``       ``firmware.bin``     96 KiB      yes (boot ROM / UEFI firmware volume)
``bootloader``     ``bootloader.efi``   40 KiB      yes (Secure Boot: db holds the vendor certificate)
``kernel``         ``vmlinuz``          128 KiB     yes
``initrd``         ``initrd.img``       64 KiB      no
``rootfs``         ``rootfs.img``       160 KiB     no (measured by the initrd, like a dm-verity root)
``agent-config``   ``agent-class.toml`` < 1 KiB     no (device-CLASS configuration, no device identity)
=================  ===================  ==========  =====================================================

Binary image format "EDGEIMG1" (all integers little-endian)::

    offset  size  field
         0     8  magic b"EDGEIMG1"
         8     4  header size (128)
        12     4  body size B
        16     4  flags (bit 0: a vendor signature block follows the body)
        20    12  reserved, zero
        32    16  component, ASCII, NUL-padded
        48    32  version, ASCII, NUL-padded
        80    32  build id = SHA-256("edge-sim-build|<component>|<version>")
       112    16  reserved, zero
       128     B  body: SHAKE-256("edge-sim-body|<component>|<version>") (stands in for code)
     128+B   108  vendor signature block (if flag bit 0):
                    8  magic b"EDGESIG1"
                    2  algorithm, 1 = Ed25519
                    2  reserved, zero
                   32  signer public key (raw Ed25519)
                   64  Ed25519 signature over bytes [0, 128+B)

A *variant* other than ``""`` models an attacker's modification of the genuine build: the body is
patched in place (an "implant" marker at a fixed offset) while the vendor signature block is kept,
so the signature no longer verifies.  That is what a tampered file on a device looks like.

Test keys.  The keys are derived from constant, public seeds, so that measurements and
signatures are stable across runs and machines.  They are TEST keys: anybody can sign with them.

* vendor (image signing, Secure Boot ``db``):
  seed ``SHA-256(b"edge-attest/firmware_sim/test-key/vendor/v1")``, Ed25519 public key
  ``a0235a7e185f7a03d51c855d4058a29570363bfc8b2445cd970b8a51f664233f``
* platform key (Secure Boot ``PK``): label ``platform-key``, public key
  ``c4cdde64017c78b3a0fad77f2094ba14458bbbc97bdf4fa246c69b85101e87a7``
* key exchange key (Secure Boot ``KEK``): label ``key-exchange-key``, public key
  ``abd00ee2d3eb64195d9193cf040ee4e052bb4f4f5e5a2af18bc5039edbe80c1d``

Their X.509 certificates (:func:`certificate_der`) are self-signed with fixed serials and validity,
and Ed25519 signatures are deterministic, so the certificate bytes are stable too.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from protocol.errors import MalformedInputError, SignatureError

# --- components ------------------------------------------------------------------------------------

FIRMWARE = "firmware"
BOOTLOADER = "bootloader"
KERNEL = "kernel"
INITRD = "initrd"
ROOTFS = "rootfs"
AGENT_CONFIG = "agent-config"

#: Boot order of the components.
COMPONENTS: tuple[str, ...] = (FIRMWARE, BOOTLOADER, KERNEL, INITRD, ROOTFS, AGENT_CONFIG)

#: File name of each component inside ``<device>/images/``.
IMAGE_FILES: dict[str, str] = {
    FIRMWARE: "firmware.bin",
    BOOTLOADER: "bootloader.efi",
    KERNEL: "vmlinuz",
    INITRD: "initrd.img",
    ROOTFS: "rootfs.img",
    AGENT_CONFIG: "agent-class.toml",
}

#: Body sizes of the binary components (modest, so that hundreds of devices are quick to create).
BODY_SIZES: dict[str, int] = {
    FIRMWARE: 96 * 1024 - 236,
    BOOTLOADER: 40 * 1024 - 236,
    KERNEL: 128 * 1024 - 236,
    INITRD: 64 * 1024 - 128,
    ROOTFS: 160 * 1024 - 128,
}

#: Components whose genuine builds carry a vendor signature block.
SIGNED_COMPONENTS: frozenset[str] = frozenset({FIRMWARE, BOOTLOADER, KERNEL})

IMAGE_MAGIC = b"EDGEIMG1"
SIGNATURE_MAGIC = b"EDGESIG1"
SIG_ALG_ED25519 = 1
HEADER_SIZE = 128
SIGNATURE_BLOCK_SIZE = 8 + 2 + 2 + 32 + 64
FLAG_SIGNED = 0x1
#: Where in the body a tampered variant carries its implant (inside every component's body).
IMPLANT_OFFSET = 4096

_HEADER = struct.Struct("<8sIII12s16s32s32s16s")
assert _HEADER.size == HEADER_SIZE

# --- test keys -------------------------------------------------------------------------------------

VENDOR_KEY_LABEL = "vendor"
PLATFORM_KEY_LABEL = "platform-key"
KEK_LABEL = "key-exchange-key"

#: Raw Ed25519 public key of the vendor test key (documented above; checked by the tests).
VENDOR_PUBLIC_KEY_HEX = "a0235a7e185f7a03d51c855d4058a29570363bfc8b2445cd970b8a51f664233f"

_KEY_NAMES = {
    VENDOR_KEY_LABEL: "EdgeSim Test Vendor Image Signing",
    PLATFORM_KEY_LABEL: "EdgeSim Test Platform Key",
    KEK_LABEL: "EdgeSim Test Key Exchange Key",
}
_CERT_SERIALS = {VENDOR_KEY_LABEL: 0x0ED6E5101, PLATFORM_KEY_LABEL: 0x0ED6E5102, KEK_LABEL: 0x0ED6E5103}
_CERT_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_CERT_NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)


def key_seed(label: str) -> bytes:
    """The public, constant 32-byte seed of test key ``label``."""
    return hashlib.sha256(f"edge-attest/firmware_sim/test-key/{label}/v1".encode()).digest()


@functools.cache
def private_key(label: str) -> Ed25519PrivateKey:
    """The Ed25519 test key ``label`` (vendor, platform-key, key-exchange-key). Public knowledge!"""
    if label not in _KEY_NAMES:
        raise KeyError(label)
    return Ed25519PrivateKey.from_private_bytes(key_seed(label))


def vendor_private_key() -> Ed25519PrivateKey:
    """The vendor's (test) image signing key."""
    return private_key(VENDOR_KEY_LABEL)


def vendor_public_key() -> Ed25519PublicKey:
    """The vendor's image signing public key (what a verifier pins)."""
    return vendor_private_key().public_key()


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@functools.cache
def certificate_der(label: str) -> bytes:
    """DER of the self-signed X.509 certificate of test key ``label`` (deterministic bytes)."""
    key = private_key(label)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeSim Test Vendor"),
        x509.NameAttribute(NameOID.COMMON_NAME, _KEY_NAMES[label]),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_CERT_SERIALS[label])
        .not_valid_before(_CERT_NOT_BEFORE)
        .not_valid_after(_CERT_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)  # Ed25519: no separate hash algorithm; signatures are deterministic
    )
    return cert.public_bytes(serialization.Encoding.DER)


# --- image specs and generation --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """What an image is built from. ``variant`` ``""`` is the vendor's genuine build.

    For ``agent-config`` the version is ``"<device class>/<revision>"``.
    """

    component: str
    version: str
    variant: str = ""

    def __post_init__(self) -> None:
        if self.component not in IMAGE_FILES:
            raise MalformedInputError(f"unknown image component {self.component!r}")
        if not self.version or len(self.version.encode()) > 32 or not self.version.isascii():
            raise MalformedInputError(f"image version {self.version!r} must be 1-32 ASCII characters")
        if self.component == AGENT_CONFIG and "/" not in self.version:
            raise MalformedInputError("agent-config version must be '<device class>/<revision>'")

    @property
    def file_name(self) -> str:
        return IMAGE_FILES[self.component]

    @property
    def genuine(self) -> ImageSpec:
        """The vendor's build this spec derives from."""
        return ImageSpec(self.component, self.version)


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """The parsed header of an EDGEIMG1 image."""

    component: str
    version: str
    build_id: bytes
    body_size: int
    signed: bool


def _body(component: str, version: str) -> bytes:
    seed = f"edge-sim-body|{component}|{version}".encode()
    return hashlib.shake_256(seed).digest(BODY_SIZES[component])


def _signature_block(signed_part: bytes) -> bytes:
    key = vendor_private_key()
    return (SIGNATURE_MAGIC + struct.pack("<HH", SIG_ALG_ED25519, 0) + raw_public_key(key.public_key())
            + key.sign(signed_part))


def _binary_image(component: str, version: str) -> bytes:
    body = _body(component, version)
    signed = component in SIGNED_COMPONENTS
    build_id = hashlib.sha256(f"edge-sim-build|{component}|{version}".encode()).digest()
    header = _HEADER.pack(IMAGE_MAGIC, HEADER_SIZE, len(body), FLAG_SIGNED if signed else 0, b"",
                          component.encode(), version.encode(), build_id, b"")
    image = header + body
    return image + _signature_block(image) if signed else image


def agent_class_config(device_class: str, revision: str) -> bytes:
    """The device-class agent configuration (TOML). Identical for every device of the class."""
    return (
        "# Edge agent device-class configuration, generated by firmware_sim.\n"
        f"# Common to every device of class {device_class!r}: it carries no per-device identity.\n"
        "# Measured at boot into PCR 14 (see firmware_sim.boot).\n"
        "\n"
        "[class]\n"
        f'name = "{device_class}"\n'
        f'config_revision = "{revision}"\n'
        "\n"
        "[attestation]\n"
        'banks = ["sha256"]\n'
        "pcrs = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14]\n"
        "interval_seconds = 300\n"
        "\n"
        "[inference]\n"
        "max_requests_per_minute = 60\n"
        "debug_shell = false\n"
    ).encode()


def tamper_image(component: str, genuine: bytes, variant: str) -> bytes:
    """Apply the attacker's modification ``variant`` to an image of ``component`` (signature block
    kept).  Used for the tampered variants, and by a simulated device that boots a patched image."""
    if component == AGENT_CONFIG:
        # An attacker loosening the class policy: e.g. enabling the debug shell.
        patched = genuine.replace(b"debug_shell = false", b"debug_shell = true ")
        return patched + f"# {variant}\n".encode()
    implant = b"IMPLANT:" + hashlib.sha256(f"{component}|{variant}".encode()).digest()
    start = HEADER_SIZE + IMPLANT_OFFSET
    return genuine[:start] + implant + genuine[start + len(implant):]


@functools.lru_cache(maxsize=128)
def generate_image(spec: ImageSpec) -> bytes:
    """The bytes of the image ``spec`` describes (cached: many devices share the same images)."""
    if spec.component == AGENT_CONFIG:
        device_class, revision = spec.version.rsplit("/", 1)
        genuine = agent_class_config(device_class, revision)
    else:
        genuine = _binary_image(spec.component, spec.version)
    return genuine if not spec.variant else tamper_image(spec.component, genuine, spec.variant)


# --- parsing and verification ----------------------------------------------------------------------


def parse_image_header(data: bytes) -> ImageHeader:
    """Parse the header of an EDGEIMG1 image; raises :class:`MalformedInputError` if it is not one."""
    if len(data) < HEADER_SIZE:
        raise MalformedInputError(f"image of {len(data)} bytes is shorter than its header")
    magic, hsize, body_size, flags, _r1, comp, ver, build_id, _r2 = _HEADER.unpack_from(data)
    if magic != IMAGE_MAGIC or hsize != HEADER_SIZE:
        raise MalformedInputError("not an EDGEIMG1 image")
    expected = HEADER_SIZE + body_size + (SIGNATURE_BLOCK_SIZE if flags & FLAG_SIGNED else 0)
    if len(data) != expected:
        raise MalformedInputError(f"image has {len(data)} bytes, its header says {expected}")
    try:
        component = comp.rstrip(b"\x00").decode("ascii")
        version = ver.rstrip(b"\x00").decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedInputError("image header names are not ASCII") from exc
    return ImageHeader(component, version, build_id, body_size, bool(flags & FLAG_SIGNED))


def verify_vendor_signature(data: bytes, public_key: Ed25519PublicKey | None = None) -> ImageHeader:
    """Check an image's vendor signature block against ``public_key`` (default: the vendor test key).

    Returns the parsed header; raises :class:`SignatureError` if the image is unsigned, signed by
    another key, or modified after signing, and :class:`MalformedInputError` if it is not an image.
    """
    header = parse_image_header(data)
    if not header.signed:
        raise SignatureError(f"{header.component} image carries no vendor signature block")
    signed_len = HEADER_SIZE + header.body_size
    block = data[signed_len:]
    magic, alg, _reserved = struct.unpack_from("<8sHH", block)
    if magic != SIGNATURE_MAGIC or alg != SIG_ALG_ED25519:
        raise SignatureError("unknown vendor signature block format")
    signer = block[12:44]
    signature = block[44:108]
    pinned = public_key if public_key is not None else vendor_public_key()
    if signer != raw_public_key(pinned):
        raise SignatureError(f"{header.component} image is signed by an unknown key {signer.hex()[:16]}...")
    try:
        pinned.verify(signature, data[:signed_len])
    except InvalidSignature as exc:
        raise SignatureError(f"{header.component} {header.version} image signature does not verify") from exc
    return header
