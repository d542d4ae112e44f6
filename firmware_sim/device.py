"""A simulated edge device: a folder with A/B boot slots, a manufactured swtpm, and a TCG event log.

Folder layout::

    <device>/
      device.json        the device's flashed profile (what the factory put in slot a, platform
                         settings) and simulator options (``trial_tamper``, below)
      boot/              the boot folder of agent.update.bootctl:
        bootctl.json     the A/B boot control (active slot, trial, last rollback)
        slot-a/          firmware.bin, bootloader.efi, vmlinuz, initrd.img, rootfs.img,
                         agent-class.toml (see firmware_sim.images) and release.json (the release's
                         manifest with its boot settings, see protocol.release): the factory images
        slot-b/          empty until the agent installs a release into it
      tpm/               swtpm state (EKs and EK certificates from the manufacturer CA)
      eventlog.bin       the TCG binary event log of the last boot; the agent reads it from here,
                         as it would read /sys/kernel/security/tpm0/binary_bios_measurements

At power-on the bootloader asks :func:`agent.update.bootctl.choose_boot_slot` which slot to boot (a
trial slot with tries left, else the active one) and the boot measures *what is on disk* in that slot
(so a file an attacker replaced is measured as such) with the boot settings of the slot's
``release.json`` (the stored profile's settings if it has none).  A trial slot whose images cannot be
read is abandoned and the active slot boots, as a bootloader falls back when a slot does not load.

``trial_tamper`` (``SimulatedDevice.create(..., trial_tamper="kernel")``) models a device that
installs a correctly signed release but boots something else: whenever it boots a trial slot, that
component's image in the slot is patched first (the tampered variant of firmware_sim.images), so its
measurements differ from the release's reference values.

Use the device as a context manager: leaving the block stops its swtpm, and the swtpm wrapper kills a
forgotten process as a last resort; :meth:`SimulatedDevice.destroy` also deletes the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.update import bootctl
from firmware_sim.boot import (
    DEFAULT_BANKS,
    MEASURED_PCRS,
    BootMedia,
    BootRecord,
    BootSettings,
    measured_boot,
    read_pcrs,
)
from firmware_sim.images import COMPONENTS, IMAGE_FILES, tamper_image
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.profiles import TAMPER_VARIANT, Profile, get_profile
from firmware_sim.release import boot_to_settings, from_profile, read_manifest, write_slot
from firmware_sim.swtpm import Swtpm
from protocol.errors import ConfigError, EdgeError, TpmError
from protocol.release import RELEASE_FILE
from protocol.tpm.constants import NV_EK_CERT_ECC, NV_EK_CERT_RSA

STATE_FILE = "device.json"
STATE_FORMAT = 1
BOOT_DIR = "boot"
TPM_DIR = "tpm"
EVENTLOG_FILE = "eventlog.bin"

#: NV index of the ECC NIST P-384 EK certificate (TCG EK Credential Profile 2.3, section 2.2.1.5.2,
#: "high range"); swtpm_setup 0.7 creates a P-384 EK and stores its certificate there.
NV_EK_CERT_ECC_P384 = 0x01C00016
#: EK certificate NV indices to try, per key kind (TCG EK Credential Profile, section 2.2.1.5).
EK_CERT_INDICES: dict[str, tuple[int, ...]] = {
    "rsa": (NV_EK_CERT_RSA,),
    "ecc": (NV_EK_CERT_ECC, NV_EK_CERT_ECC_P384),
}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class SimulatedDevice:
    """One simulated device owning ``folder``. Open an existing one with ``SimulatedDevice(folder)``,
    make a new one with :meth:`create`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._profile, self._trial_tamper = self._load_state()
        self.swtpm = Swtpm(self.tpm_dir)
        self._last_boot: BootRecord | None = None
        self._booted_slot: str | None = None

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, *, ca: ManufacturerCA, profile: Profile | str = "golden",
               trial_tamper: str | None = None) -> SimulatedDevice:
        """Create a device in ``folder`` (which must not exist or be empty): write the images of
        ``profile`` into slot a and manufacture a TPM whose EK certificates ``ca`` signs.  With
        ``trial_tamper`` (a component), the device boots that component tampered whenever it boots
        a trial slot (see the module docstring)."""
        folder = Path(folder)
        chosen = get_profile(profile)
        if trial_tamper is not None and trial_tamper not in IMAGE_FILES:
            raise ConfigError(f"unknown component {trial_tamper!r}; known: {', '.join(COMPONENTS)}")
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"{folder} exists and is not empty")
        created_folder = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            boot_dir = folder / BOOT_DIR
            for slot in bootctl.SLOTS:
                bootctl.slot_dir(boot_dir, slot).mkdir(parents=True)
            write_slot(bootctl.slot_dir(boot_dir, "a"), from_profile(chosen))
            bootctl.write(boot_dir, bootctl.BootControl())
            Swtpm(folder / TPM_DIR).manufacture(ca)
            cls._save_state(folder, chosen, trial_tamper)
        except BaseException:
            # Leave nothing half-made behind (swtpm_setup runs no lasting process).
            if created_folder:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for child in folder.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
            raise
        return cls(folder)

    # -- paths and state ---------------------------------------------------------------------------
    @property
    def boot_dir(self) -> Path:
        """The A/B boot folder (``bootctl.json``, ``slot-a/``, ``slot-b/``)."""
        return self.folder / BOOT_DIR

    def slot_dir(self, slot: str) -> Path:
        try:
            return bootctl.slot_dir(self.boot_dir, slot)
        except EdgeError as exc:
            raise ConfigError(exc.diagnostics()) from None

    @property
    def images_dir(self) -> Path:
        """The images of the active (committed) slot: what :meth:`reflash` and :meth:`write_image`
        change and what boots when no trial is pending."""
        return self.slot_dir(bootctl.read(self.boot_dir).active)

    @property
    def booted_slot(self) -> str | None:
        """The slot the last boot in this process booted (``a`` or ``b``), if any."""
        return self._booted_slot

    @property
    def trial_tamper(self) -> str | None:
        """The component this device boots tampered from a trial slot, if any."""
        return self._trial_tamper

    @property
    def tpm_dir(self) -> Path:
        return self.folder / TPM_DIR

    @property
    def eventlog_path(self) -> Path:
        return self.folder / EVENTLOG_FILE

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def image_path(self, component: str) -> Path:
        """Path of a component's image (``firmware``, ``bootloader``, ``kernel``, ...)."""
        try:
            return self.images_dir / IMAGE_FILES[component]
        except KeyError:
            raise ConfigError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}") from None

    @property
    def profile(self) -> Profile:
        """The profile currently flashed (used by the next boot or power cycle)."""
        return self._profile

    @property
    def running(self) -> bool:
        """True while the device's swtpm runs (the device is powered on)."""
        return self.swtpm.running

    @property
    def tcti(self) -> str:
        """TCTI string of the running swtpm (tpm2-pytss, tpm2-tools ``TPM2TOOLS_TCTI``)."""
        return self.swtpm.tcti

    @property
    def last_boot(self) -> BootRecord | None:
        """Events, log and expected PCRs of the last boot in this process, if any."""
        return self._last_boot

    def _load_state(self) -> tuple[Profile, str | None]:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.folder} is not a simulated device (no {STATE_FILE})") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.state_path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise ConfigError(f"{self.state_path}: unsupported device state format")
        tamper = raw.get("trial_tamper")
        if tamper is not None and tamper not in IMAGE_FILES:
            raise ConfigError(f"{self.state_path}: trial_tamper must be null or a component")
        return Profile.from_dict(raw.get("profile", {})), tamper

    @staticmethod
    def _save_state(folder: Path, profile: Profile, trial_tamper: str | None) -> None:
        state: dict[str, Any] = {"format": STATE_FORMAT, "profile": profile.to_dict(),
                                 "trial_tamper": trial_tamper}
        _write_atomic(folder / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())

    # -- power -------------------------------------------------------------------------------------
    def boot(self, profile: Profile | str | None = None) -> BootRecord:
        """Power on and run the measured boot: the bootloader chooses the slot (bootctl), swtpm
        starts with fresh PCRs (stopped first if it runs: TPM2_Startup(CLEAR) on a kept state),
        every event of the slot's boot is extended, ``eventlog.bin`` written.  With ``profile``,
        reflash it into the active slot first."""
        if profile is not None:
            self.reflash(profile)
        slot, media, settings = self._load_boot_slot()
        self.swtpm.stop()  # a boot always starts from reset PCRs
        self.swtpm.start()
        try:
            record = measured_boot(self.swtpm.tcti, media, settings, self.eventlog_path)
        except BaseException:
            self.swtpm.stop()
            raise
        self._last_boot, self._booted_slot = record, slot
        return record

    def _load_boot_slot(self) -> tuple[str, BootMedia, BootSettings]:
        """The bootloader: choose the slot, read its images and boot settings."""
        ctl = bootctl.choose_boot_slot(self.boot_dir)
        if ctl.in_trial:
            try:
                if self._trial_tamper is not None:
                    self._tamper_slot(ctl.booted, self._trial_tamper)
                return ctl.booted, *self._read_slot(ctl.booted)
            except EdgeError as exc:  # the trial slot does not load: fall back to the active one
                bootctl.abandon_trial(self.boot_dir, f"slot {ctl.booted} does not boot: {exc.diagnostics()}")
                ctl = bootctl.choose_boot_slot(self.boot_dir)
        return ctl.booted, *self._read_slot(ctl.booted)

    def _read_slot(self, slot: str) -> tuple[BootMedia, BootSettings]:
        folder = self.slot_dir(slot)
        media = BootMedia.from_directory(folder)
        if (folder / RELEASE_FILE).exists():
            return media, boot_to_settings(read_manifest(folder / RELEASE_FILE).boot)
        return media, self._profile.boot_settings

    def _tamper_slot(self, slot: str, component: str) -> None:
        path = self.slot_dir(slot) / IMAGE_FILES[component]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read boot image {path}: {exc.strerror or exc}") from None
        _write_atomic(path, tamper_image(component, data, TAMPER_VARIANT))

    def power_cycle(self) -> BootRecord:
        """Power off and on: stop swtpm (PCRs reset), start it, re-run the measured boot of the slot
        the bootloader chooses."""
        self.shutdown()
        return self.boot()

    def shutdown(self) -> None:
        """Power off: stop swtpm (its state stays). The event log of the last boot stays on disk."""
        self.swtpm.stop()

    def destroy(self) -> None:
        """Stop every process of the device and delete its folder."""
        self.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- flashing ----------------------------------------------------------------------------------
    def reflash(self, profile: Profile | str) -> None:
        """Flash ``profile`` into the active slot: rewrite every image and its release.json (a
        legitimate re-install, or an attacker's). Takes effect at the next boot or power cycle."""
        chosen = get_profile(profile)
        write_slot(self.images_dir, from_profile(chosen))
        self._save_state(self.folder, chosen, self._trial_tamper)
        self._profile = chosen

    def write_image(self, component: str, data: bytes) -> None:
        """Overwrite one image with arbitrary bytes (an attacker with disk access). The stored
        profile is unchanged: the next boot measures what is on disk."""
        _write_atomic(self.image_path(component), bytes(data))

    # -- provisioning ------------------------------------------------------------------------------
    def update_table(self, root_file: Path) -> str:
        """The ``[update]`` table of this device's agent configuration (TOML text): its A/B boot
        folder, and ``root_file``, the update repository's root metadata the device trusts
        (``fleet-server updates root --out FILE``)."""
        return (f"[update]\nboot_dir = {json.dumps(str(self.boot_dir))}\n"
                f"root_file = {json.dumps(str(Path(root_file).resolve()))}\n")

    # -- TPM queries -------------------------------------------------------------------------------
    def read_pcrs(self, pcrs: Iterable[int] = MEASURED_PCRS,
                  banks: Sequence[str] = DEFAULT_BANKS) -> dict[str, dict[int, bytes]]:
        """Current PCR values of the running TPM (TPM2_PCR_Read)."""
        return read_pcrs(self.tcti, pcrs, banks)

    def ek_certificate(self, kind: str = "rsa") -> bytes:
        """DER of the EK certificate (``rsa`` or ``ecc``) the manufacturer stored in TPM NV.

        For ``ecc`` the P-256 index is tried first, then the P-384 one swtpm_setup 0.7 uses.
        """
        from tpm2_pytss import ESAPI, TSS2_Exception
        from tpm2_pytss.constants import TPM2_CAP, TPM2_HC
        from tpm2_pytss.utils import NVReadEK

        try:
            indices = EK_CERT_INDICES[kind]
        except KeyError:
            raise ConfigError(f"unknown EK kind {kind!r}; known: {', '.join(EK_CERT_INDICES)}") from None
        try:
            with ESAPI(self.tcti) as ectx:
                # List the defined NV indices first: probing a missing one makes the TSS log errors.
                defined: set[int] = set()
                start, more = int(TPM2_HC.NV_INDEX_FIRST), True
                while more:
                    more, data = ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
                    handles = [int(h) for h in data.data.handles]
                    defined.update(handles)
                    if not handles:
                        break
                    start = max(handles) + 1
                for index in indices:
                    if index in defined:
                        return bytes(NVReadEK(ectx)(index))
        except TSS2_Exception as exc:
            raise TpmError(f"cannot read the {kind} EK certificate: {exc}", rc=int(exc.rc)) from exc
        raise TpmError(f"the TPM has no {kind} EK certificate in NV "
                       f"({', '.join(f'0x{i:08x}' for i in indices)})")

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> SimulatedDevice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "running" if self.running else "off"
        return f"SimulatedDevice({str(self.folder)!r}, profile={self._profile.name!r}, {state})"

