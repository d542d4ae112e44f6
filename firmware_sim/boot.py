"""The measured boot of a simulated edge device: which stage measures what, into which PCR.

:func:`build_boot_log` turns the boot images and the platform settings into the ordered list of
TCG events (pure, no TPM); :func:`measured_boot` extends those events' digests into a TPM (both
the SHA-1 and the SHA-256 bank, exactly the digests of the log) with TPM2_PCR_Extend and writes
the binary log.  The same :func:`build_boot_log` gives the reference values in software
(:func:`firmware_sim.profiles.reference_pcrs`), so the log, the TPM and the reference can only
agree or all be wrong together, and the tests compare all three with tpm2-tools.

PCR map (TCG PC Client PFP 1.05, section 3.3.4 "PCR Usage"; 8-9 as GRUB uses them; 13-14 ours):

====  ==========================================  ==================================================
PCR   what                                        events
====  ==========================================  ==================================================
0     S-CRTM, platform firmware (3.3.4.1)         [EV_NO_ACTION StartupLocality, optional, not
                                                  extended], EV_S_CRTM_VERSION,
                                                  EV_EFI_PLATFORM_FIRMWARE_BLOB2, EV_SEPARATOR
1     platform configuration (3.3.4.2)            EV_EFI_VARIABLE_BOOT BootOrder, Boot0000,
                                                  EV_SEPARATOR
2     option ROM code (3.3.4.3)                   EV_SEPARATOR (no option ROMs on this device)
3     option ROM configuration (3.3.4.4)          EV_SEPARATOR
4     boot manager code, boot attempts (3.3.4.5)  EV_EFI_ACTION "Calling EFI Application from Boot
                                                  Option", EV_SEPARATOR,
                                                  EV_EFI_BOOT_SERVICES_APPLICATION bootloader,
                                                  EV_EFI_BOOT_SERVICES_APPLICATION kernel
5     boot manager configuration (3.3.4.6)        EV_SEPARATOR, EV_EFI_ACTION "Exit Boot Services
                                                  Invocation" / "... Returned with Success"
6     platform manufacturer specific (3.3.4.7)    EV_SEPARATOR
7     Secure Boot policy (3.3.4.8)                EV_EFI_VARIABLE_DRIVER_CONFIG SecureBoot, PK, KEK,
                                                  db, dbx, EV_SEPARATOR, EV_EFI_VARIABLE_AUTHORITY
                                                  (db entry that verified the boot images; only
                                                  when Secure Boot is enabled)
8     bootloader commands, kernel command line    EV_IPL "grub_cmd: linux ...", "grub_cmd: initrd
                                                  ...", "kernel_cmdline: ..." (digest = hash of the
                                                  text after the prefix, without the NUL)
9     files the bootloader reads                  EV_IPL "(hd0,gpt1)/vmlinuz", "(hd0,gpt1)/initrd.img"
                                                  (digest = hash of the file)
13    root filesystem / application               EV_IPL "rootfs: ..." (digest = hash of rootfs.img)
14    agent device-class configuration            EV_IPL "agent-class: ..." (hash of agent-class.toml)
====  ==========================================  ==================================================

So a tampered bootloader changes PCR 4; a tampered kernel PCR 4 and 9 (the firmware measures the
EFI stub, GRUB the file); an initrd PCR 9; a firmware rollback PCR 0; disabling Secure Boot PCR 7;
a changed command line PCR 8; the root filesystem PCR 13; the class configuration PCR 14.

Digests (PFP 10.4.1 and 3.3.4): the digest is the hash of the event data for EV_S_CRTM_VERSION,
EV_SEPARATOR, EV_EFI_ACTION, EV_EFI_VARIABLE_DRIVER_CONFIG and EV_EFI_VARIABLE_AUTHORITY (the
whole UEFI_VARIABLE_DATA); for EV_EFI_VARIABLE_BOOT it is the hash of the variable's value only
(UEFI_VARIABLE_DATA.VariableData), as EDK II firmware does.  The PFP text reads as the whole
structure; real logs have both forms and verifiers (fleet_server.verifier.eventlog, tpm2-tools)
accept both, so we follow the firmware most devices run.  For EV_EFI_PLATFORM_FIRMWARE_BLOB2 and
EV_EFI_BOOT_SERVICES_APPLICATION it is the hash of the image (a real firmware uses the PE/COFF
Authenticode hash; our images are not PE files, so it is the hash of the file).

The simulator measures what it is given and does not enforce Secure Boot: a tampered image is
measured (and its db authority logged) as if the attacker had bypassed enforcement, which is
exactly the case remote attestation must catch.  The OS-level measurements of PCRs 13 and 14 are
appended to the same log for simplicity (a real device would keep them in an OS-level log).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from firmware_sim import eventlog_writer as ew
from firmware_sim.eventlog_writer import EventLogWriter, LogEvent
from firmware_sim.images import (
    BOOTLOADER,
    COMPONENTS,
    IMAGE_FILES,
    KEK_LABEL,
    PLATFORM_KEY_LABEL,
    VENDOR_KEY_LABEL,
    ImageSpec,
    certificate_der,
    generate_image,
    parse_image_header,
)
from protocol.errors import ConfigError, EdgeError, MalformedInputError, TpmError
from protocol.tpm.constants import BANK_TO_ALG, EventType, hash_name

#: PCRs a boot of this simulator extends.
MEASURED_PCRS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14)
#: Bank names every simulated TPM has active and every log carries.
DEFAULT_BANKS: tuple[str, ...] = ("sha1", "sha256")

ROOTFS_PCR = 13
AGENT_CONFIG_PCR = 14

DEFAULT_CMDLINE = "root=/dev/mmcblk0p2 ro rootwait console=ttyS0,115200 quiet"

# Identifiers of the simulated platform (constant: they are the same on every device of the class).
#: SignatureOwner of the vendor's Secure Boot database entries.
VENDOR_OWNER_GUID = uuid.UUID("5e1c0a2b-7d4e-4c3f-9a8b-6d2e1f0c3b4a")
#: GPT partition GUID of the EFI system partition.
ESP_PARTITION_GUID = uuid.UUID("3f0e4b6a-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
#: A known-vulnerable older bootloader build, revoked in dbx by its SHA-256.
REVOKED_BOOTLOADER = ImageSpec(BOOTLOADER, "2.04-edge0")

FIRMWARE_BLOB_DESCRIPTION = b"EdgeSim FV MAIN"
FIRMWARE_BASE = 0xFF000000
BOOTLOADER_LOAD_ADDRESS = 0x7E6E0000
KERNEL_LOAD_ADDRESS = 0x7C000000
BOOTLOADER_PATH = "\\EFI\\BOOT\\BOOTAA64.EFI"
KERNEL_PATH = "\\vmlinuz"
BOOT_OPTION_DESCRIPTION = "EdgeSim Linux"

# PFP 3.3.4.5 / 3.3.4.6: the EV_EFI_ACTION strings (ASCII, no terminator).
ACTION_CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
ACTION_EXIT_BOOT_SERVICES = b"Exit Boot Services Invocation"
ACTION_EXIT_BOOT_SERVICES_OK = b"Exit Boot Services Returned with Success"


@dataclass(frozen=True, slots=True)
class BootMedia:
    """The bytes the boot chain measures: one image per component."""

    firmware: bytes
    bootloader: bytes
    kernel: bytes
    initrd: bytes
    rootfs: bytes
    agent_config: bytes

    @classmethod
    def from_specs(cls, specs: Mapping[str, ImageSpec]) -> BootMedia:
        """Media generated from image specs (component -> spec), without touching the disk."""
        missing = [c for c in COMPONENTS if c not in specs]
        if missing:
            raise ConfigError(f"no image spec for {', '.join(missing)}")
        return cls(**{_field(c): generate_image(specs[c]) for c in COMPONENTS})

    @classmethod
    def from_directory(cls, images_dir: Path) -> BootMedia:
        """Read the images of a boot slot (``<device>/boot/slot-a``...), as its boot chain would."""
        values = {}
        for component in COMPONENTS:
            path = Path(images_dir) / IMAGE_FILES[component]
            try:
                values[_field(component)] = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read boot image {path}: {exc.strerror or exc}") from exc
        return cls(**values)


def _field(component: str) -> str:
    return component.replace("-", "_")


@dataclass(frozen=True, slots=True)
class BootSettings:
    """Platform settings that are not images: UEFI Secure Boot state and the kernel command line.

    ``startup_locality`` is the locality of TPM2_Startup logged in an EV_NO_ACTION
    StartupLocality event (PFP 10.4.5.3); ``None`` (the default) omits the event.  swtpm runs
    TPM2_Startup from locality 0, so only 0 matches a real boot.  The event is optional because
    tpm2-tools 5.4's ``tpm2_eventlog`` wrongly extends the zero digests of EV_NO_ACTION events
    after the header into PCR 0 (fixed in later tpm2-tools); logs that carry it replay correctly
    everywhere else, which makes them a good test of a verifier.
    """

    secure_boot: bool = True
    kernel_cmdline: str = DEFAULT_CMDLINE
    startup_locality: int | None = None


@dataclass(frozen=True, slots=True)
class BootRecord:
    """The outcome of one measured boot: the events, the log bytes, the PCR values they imply."""

    events: tuple[LogEvent, ...]
    eventlog: bytes
    pcrs: dict[str, dict[int, bytes]]


# --- the boot chain (pure) -------------------------------------------------------------------------


def crtm_version(firmware: bytes) -> str:
    """The S-CRTM version string a firmware image reports (from its header)."""
    try:
        header = parse_image_header(firmware)
    except MalformedInputError:
        return "EdgeSim Firmware (unknown build)"
    return f"EdgeSim Firmware {header.version}"


def secure_boot_variables(secure_boot: bool) -> list[tuple[uuid.UUID, str, bytes]]:
    """(vendor GUID, name, value) of the Secure Boot variables measured into PCR 7, in the order of
    PFP 3.3.4.8: SecureBoot, PK, KEK, db, dbx."""
    x509 = ew.EFI_CERT_X509_GUID
    owner = VENDOR_OWNER_GUID
    revoked = hashlib.sha256(generate_image(REVOKED_BOOTLOADER)).digest()
    return [
        (ew.EFI_GLOBAL_VARIABLE_GUID, "SecureBoot", b"\x01" if secure_boot else b"\x00"),
        (ew.EFI_GLOBAL_VARIABLE_GUID, "PK",
         ew.efi_signature_list(x509, [(owner, certificate_der(PLATFORM_KEY_LABEL))])),
        (ew.EFI_GLOBAL_VARIABLE_GUID, "KEK",
         ew.efi_signature_list(x509, [(owner, certificate_der(KEK_LABEL))])),
        (ew.EFI_IMAGE_SECURITY_DATABASE_GUID, "db",
         ew.efi_signature_list(x509, [(owner, certificate_der(VENDOR_KEY_LABEL))])),
        (ew.EFI_IMAGE_SECURITY_DATABASE_GUID, "dbx",
         ew.efi_signature_list(ew.EFI_CERT_SHA256_GUID, [(owner, revoked)])),
    ]


def esp_device_path(path: str) -> bytes:
    """Device path of a file on the EFI system partition: HD(1,GPT,...)/File(path)/End."""
    return (ew.hard_drive_node(1, 2048, 131072, ESP_PARTITION_GUID) + ew.file_path_node(path)
            + ew.end_of_device_path())


def build_boot_log(media: BootMedia, settings: BootSettings = BootSettings(),
                   banks: Sequence[str] = DEFAULT_BANKS) -> EventLogWriter:
    """The events of one boot of ``media`` with ``settings``, in the order the stages run."""
    E = EventType
    try:
        log = EventLogWriter([BANK_TO_ALG[b] for b in banks])
    except KeyError as exc:
        raise ConfigError(f"unknown PCR bank {exc.args[0]!r}") from exc

    # --- SEC/PEI: the S-CRTM measures itself and the firmware volume into PCR 0 (PFP 3.3.4.1).
    if settings.startup_locality is not None:
        log.no_action(ew.startup_locality_event(settings.startup_locality))
    log.extend(0, E.EV_S_CRTM_VERSION, ew.ucs2(crtm_version(media.firmware)))
    log.extend(0, E.EV_EFI_PLATFORM_FIRMWARE_BLOB2,
               ew.uefi_platform_firmware_blob2(FIRMWARE_BLOB_DESCRIPTION, FIRMWARE_BASE,
                                               len(media.firmware)),
               measured=media.firmware)

    # --- DXE: Secure Boot configuration into PCR 7, then its separator (PFP 3.3.4.8); the digest
    # is the hash of the whole UEFI_VARIABLE_DATA.
    for guid, name, value in secure_boot_variables(settings.secure_boot):
        log.extend(7, E.EV_EFI_VARIABLE_DRIVER_CONFIG, ew.uefi_variable_data(guid, name, value))
    log.extend(7, E.EV_SEPARATOR, ew.SEPARATOR_DATA)

    # --- BDS, ReadyToBoot: boot variables into PCR 1 (digest over the variable value only, see the
    # module docstring), the boot attempt into PCR 4, then the separators of PCRs 0-6 (PFP 3.3.2.2).
    boot0000 = ew.efi_load_option(BOOT_OPTION_DESCRIPTION, esp_device_path(BOOTLOADER_PATH))
    for name, value in (("BootOrder", b"\x00\x00"), ("Boot0000", boot0000)):
        log.extend(1, E.EV_EFI_VARIABLE_BOOT,
                   ew.uefi_variable_data(ew.EFI_GLOBAL_VARIABLE_GUID, name, value), measured=value)
    log.extend(4, E.EV_EFI_ACTION, ACTION_CALLING_EFI_APPLICATION)
    for pcr in range(7):
        log.extend(pcr, E.EV_SEPARATOR, ew.SEPARATOR_DATA)

    # --- The bootloader: verified against db (authority into PCR 7, once per authority, PFP
    # 3.3.4.8), then measured as a boot services application into PCR 4 (PFP 3.3.4.5).
    if settings.secure_boot:
        entry = ew.efi_signature_data(VENDOR_OWNER_GUID, certificate_der(VENDOR_KEY_LABEL))
        log.extend(7, E.EV_EFI_VARIABLE_AUTHORITY,
                   ew.uefi_variable_data(ew.EFI_IMAGE_SECURITY_DATABASE_GUID, "db", entry))
    log.extend(4, E.EV_EFI_BOOT_SERVICES_APPLICATION,
               ew.uefi_image_load_event(BOOTLOADER_LOAD_ADDRESS, len(media.bootloader), 0,
                                        esp_device_path(BOOTLOADER_PATH)),
               measured=media.bootloader)

    # --- GRUB: commands and the kernel command line into PCR 8, the files it reads into PCR 9.
    cmdline = f"BOOT_IMAGE=/vmlinuz {settings.kernel_cmdline}"
    _grub_string(log, "grub_cmd", f"linux /vmlinuz {settings.kernel_cmdline}")
    log.extend(9, E.EV_IPL, b"(hd0,gpt1)/vmlinuz\x00", measured=media.kernel)
    _grub_string(log, "kernel_cmdline", cmdline)
    _grub_string(log, "grub_cmd", "initrd /initrd.img")
    log.extend(9, E.EV_IPL, b"(hd0,gpt1)/initrd.img\x00", measured=media.initrd)
    # GRUB starts the kernel's EFI stub through LoadImage: the firmware measures it into PCR 4.
    log.extend(4, E.EV_EFI_BOOT_SERVICES_APPLICATION,
               ew.uefi_image_load_event(KERNEL_LOAD_ADDRESS, len(media.kernel), 0,
                                        esp_device_path(KERNEL_PATH)),
               measured=media.kernel)

    # --- The kernel's EFI stub leaves boot services (PFP 3.3.4.6: actions into PCR 5).
    log.extend(5, E.EV_EFI_ACTION, ACTION_EXIT_BOOT_SERVICES)
    log.extend(5, E.EV_EFI_ACTION, ACTION_EXIT_BOOT_SERVICES_OK)

    # --- The initrd measures the root filesystem / application and the agent's class
    # configuration before handing over (PCRs 13 and 14, documented above).
    log.extend(ROOTFS_PCR, E.EV_IPL, b"rootfs: /dev/mmcblk0p2 rootfs.img\x00", measured=media.rootfs)
    log.extend(AGENT_CONFIG_PCR, E.EV_IPL, b"agent-class: /etc/edge-agent/agent-class.toml\x00",
               measured=media.agent_config)
    return log


def _grub_string(log: EventLogWriter, kind: str, text: str) -> None:
    """A GRUB string measurement: event data ``"<kind>: <text>\\0"``, digest over ``text`` only."""
    log.extend(8, EventType.EV_IPL, f"{kind}: {text}".encode() + b"\x00", measured=text.encode())


# --- the TPM side ----------------------------------------------------------------------------------


def _tss_error(action: str, exc: Exception) -> TpmError:
    rc = getattr(exc, "rc", None)
    return TpmError(f"{action}: {exc}", rc=int(rc) if rc is not None else None)


def extend_events(tcti: str, events: Iterable[LogEvent]) -> None:
    """TPM2_PCR_Extend each extending event's digests (all banks in one command) via ESAPI."""
    from tpm2_pytss import ESAPI, TPML_DIGEST_VALUES, TPMT_HA, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR

    try:
        with ESAPI(tcti) as ectx:
            for event in events:
                if not event.extends:  # EV_NO_ACTION: logged, never extended (PFP 10.4.5)
                    continue
                values = []
                for alg, digest in event.digests:
                    ha = TPMT_HA(hashAlg=alg)
                    setattr(ha.digest, hash_name(alg), digest)
                    values.append(ha)
                ectx.pcr_extend(ESYS_TR(ESYS_TR.PCR0 + event.pcr), TPML_DIGEST_VALUES(values))
    except TSS2_Exception as exc:
        raise _tss_error("TPM2_PCR_Extend failed", exc) from exc


def read_pcrs(tcti: str, pcrs: Iterable[int] = MEASURED_PCRS,
              banks: Sequence[str] = DEFAULT_BANKS) -> dict[str, dict[int, bytes]]:
    """Read PCR values from the TPM with TPM2_PCR_Read (at most 8 per command, so in chunks)."""
    from tpm2_pytss import ESAPI, TSS2_Exception

    wanted = sorted(set(pcrs))
    result: dict[str, dict[int, bytes]] = {}
    try:
        with ESAPI(tcti) as ectx:
            for bank in banks:
                values: dict[int, bytes] = {}
                remaining = list(wanted)
                while remaining:
                    chunk = remaining[:8]
                    _, selection, digests = ectx.pcr_read(f"{bank}:{','.join(map(str, chunk))}")
                    got = _selected_indices(selection)
                    if not got:
                        raise TpmError(f"TPM returned no {bank} PCRs for {chunk}")
                    for index, digest in zip(got, digests, strict=True):
                        values[index] = bytes(digest)
                    remaining = [i for i in remaining if i not in values]
                result[bank] = values
    except TSS2_Exception as exc:
        raise _tss_error("TPM2_PCR_Read failed", exc) from exc
    return result


def _selected_indices(selection: object) -> list[int]:
    """PCR indices set in a TPML_PCR_SELECTION returned by TPM2_PCR_Read (one bank)."""
    indices = []
    for sel in selection:  # type: ignore[attr-defined]
        bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
        for byte_index, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (1 << bit):
                    indices.append(byte_index * 8 + bit)
    return indices


def measured_boot(tcti: str, media: BootMedia, settings: BootSettings, eventlog_path: Path,
                  banks: Sequence[str] = DEFAULT_BANKS) -> BootRecord:
    """Run a boot against a freshly started TPM: extend every event, then write the log.

    The log is written after the extends (atomically), so a reader never sees events the TPM has
    not recorded.  If extending fails the old log is removed: a device that failed to boot has
    no valid log.
    """
    log = build_boot_log(media, settings, banks)
    try:
        extend_events(tcti, log.events)
    except EdgeError:
        Path(eventlog_path).unlink(missing_ok=True)
        raise
    log.write(Path(eventlog_path))
    return BootRecord(events=log.events, eventlog=log.to_bytes(), pcrs=log.replay())
