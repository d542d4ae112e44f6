"""A simulated edge device: a folder with boot images, a manufactured swtpm, and a TCG event log.

Folder layout::

    <device>/
      device.json        the device's current profile (what is flashed, platform settings)
      images/            firmware.bin, bootloader.efi, vmlinuz, initrd.img, rootfs.img,
                         agent-class.toml  (see firmware_sim.images)
      tpm/               swtpm state (EKs and EK certificates from the manufacturer CA)
      eventlog.bin       the TCG binary event log of the last boot; the agent reads it from here,
                         as it would read /sys/kernel/security/tpm0/binary_bios_measurements

A boot measures *what is on disk* in ``images/`` (so a file an attacker replaced is measured as
such) with the platform settings of the stored profile.  Use the device as a context manager:
leaving the block stops its swtpm, and the swtpm wrapper kills a forgotten process as a last
resort; :meth:`SimulatedDevice.destroy` also deletes the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from firmware_sim.boot import (
    DEFAULT_BANKS,
    MEASURED_PCRS,
    BootMedia,
    BootRecord,
    measured_boot,
    read_pcrs,
)
from firmware_sim.images import COMPONENTS, IMAGE_FILES, generate_image
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.profiles import Profile, get_profile
from firmware_sim.swtpm import Swtpm
from protocol.errors import ConfigError, TpmError
from protocol.tpm.constants import NV_EK_CERT_ECC, NV_EK_CERT_RSA

STATE_FILE = "device.json"
STATE_FORMAT = 1
IMAGES_DIR = "images"
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
        self._profile = self._load_state()
        self.swtpm = Swtpm(self.tpm_dir)
        self._last_boot: BootRecord | None = None

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, *, ca: ManufacturerCA,
               profile: Profile | str = "golden") -> SimulatedDevice:
        """Create a device in ``folder`` (which must not exist or be empty): write the images of
        ``profile`` and manufacture a TPM whose EK certificates ``ca`` signs."""
        folder = Path(folder)
        chosen = get_profile(profile)
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"{folder} exists and is not empty")
        created_folder = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / IMAGES_DIR).mkdir()
            cls._write_images(folder / IMAGES_DIR, chosen)
            Swtpm(folder / TPM_DIR).manufacture(ca)
            cls._save_state(folder, chosen)
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
    def images_dir(self) -> Path:
        return self.folder / IMAGES_DIR

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

    def _load_state(self) -> Profile:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.folder} is not a simulated device (no {STATE_FILE})") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.state_path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise ConfigError(f"{self.state_path}: unsupported device state format")
        return Profile.from_dict(raw.get("profile", {}))

    @staticmethod
    def _save_state(folder: Path, profile: Profile) -> None:
        state: dict[str, Any] = {"format": STATE_FORMAT, "profile": profile.to_dict()}
        _write_atomic(folder / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())

    @staticmethod
    def _write_images(images_dir: Path, profile: Profile, components: Iterable[str] = COMPONENTS) -> None:
        specs = profile.image_specs()
        for component in components:
            _write_atomic(images_dir / IMAGE_FILES[component], generate_image(specs[component]))

    # -- power -------------------------------------------------------------------------------------
    def boot(self, profile: Profile | str | None = None) -> BootRecord:
        """Power on and run the measured boot: start swtpm with fresh PCRs (stopping it first if it
        runs), extend every event, write ``eventlog.bin``.  With ``profile``, reflash it first."""
        if profile is not None:
            self.reflash(profile)
        media = BootMedia.from_directory(self.images_dir)
        self.swtpm.stop()  # a boot always starts from reset PCRs
        self.swtpm.start()
        try:
            record = measured_boot(self.swtpm.tcti, media, self._profile.boot_settings, self.eventlog_path)
        except BaseException:
            self.swtpm.stop()
            raise
        self._last_boot = record
        return record

    def power_cycle(self) -> BootRecord:
        """Power off and on: stop swtpm (PCRs reset), start it, re-run the measured boot with the
        currently flashed profile."""
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
        """Flash ``profile``: rewrite every image and the platform settings (a legitimate update,
        or an attacker's). Takes effect at the next boot or power cycle."""
        chosen = get_profile(profile)
        self._write_images(self.images_dir, chosen)
        self._save_state(self.folder, chosen)
        self._profile = chosen

    def write_image(self, component: str, data: bytes) -> None:
        """Overwrite one image with arbitrary bytes (an attacker with disk access). The stored
        profile is unchanged: the next boot measures what is on disk."""
        _write_atomic(self.image_path(component), bytes(data))

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

