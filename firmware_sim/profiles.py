"""Boot profiles of a simulated device, and their reference PCR values computed in software.

A :class:`Profile` is a frozen description of what a device boots: one :class:`ImageSpec` per
component plus the platform settings (Secure Boot, kernel command line).  Every device booted with
the same profile has the same PCR values; :func:`reference_pcrs` computes them without a TPM,
from the same boot sequence the device runs (:func:`firmware_sim.boot.build_boot_log`).

Built-in profiles (:data:`PROFILES`) and the PCRs in which they differ from ``golden``:

=========================  ==========  ===============================================================
profile                    PCRs        what
=========================  ==========  ===============================================================
golden                     -           vendor firmware 1.2.0, Secure Boot on, genuine images
tampered-bootloader        4           bootloader.efi patched (vendor signature no longer verifies)
tampered-kernel            4, 9        vmlinuz patched (measured by the firmware and by GRUB)
tampered-initrd            9           initrd.img patched
tampered-cmdline           8           kernel command line gains ``init=/bin/sh``
tampered-rootfs            13          rootfs.img patched
tampered-agent-config      14          agent-class.toml loosened (debug shell enabled)
rolled-back-firmware       0           older firmware 1.0.0, still properly vendor-signed
updated-firmware           0           newer firmware 1.3.0 (a legitimate update)
secureboot-disabled        7           SecureBoot variable 0, no EV_EFI_VARIABLE_AUTHORITY event
golden-startup-locality    -           golden plus an EV_NO_ACTION StartupLocality event (locality 0)
                                       in the log (tpm2-tools 5.4 replays its PCR 0 wrongly, see
                                       firmware_sim.boot.BootSettings)
=========================  ==========  ===============================================================
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from firmware_sim.boot import DEFAULT_BANKS, DEFAULT_CMDLINE, BootMedia, BootSettings, build_boot_log
from firmware_sim.images import (
    AGENT_CONFIG,
    BOOTLOADER,
    COMPONENTS,
    FIRMWARE,
    INITRD,
    KERNEL,
    ROOTFS,
    ImageSpec,
)
from protocol.errors import ConfigError, EdgeError

GOLDEN_FIRMWARE_VERSION = "1.2.0"
ROLLED_BACK_FIRMWARE_VERSION = "1.0.0"
UPDATED_FIRMWARE_VERSION = "1.3.0"
BOOTLOADER_VERSION = "2.06-edge3"
KERNEL_VERSION = "6.1.55-edge1"
ROOTFS_VERSION = "app-2024.06.1"
DEVICE_CLASS = "edge-camera"
AGENT_CONFIG_REVISION = "1"
TAMPER_VARIANT = "tampered"


@dataclass(frozen=True, slots=True)
class Profile:
    """What a device boots: an image spec per component plus platform settings."""

    name: str
    description: str
    firmware: ImageSpec
    bootloader: ImageSpec
    kernel: ImageSpec
    initrd: ImageSpec
    rootfs: ImageSpec
    agent_config: ImageSpec
    secure_boot: bool = True
    kernel_cmdline: str = DEFAULT_CMDLINE
    #: Log an EV_NO_ACTION StartupLocality event (locality 0) first; PCR values do not change.
    log_startup_locality: bool = False

    def __post_init__(self) -> None:
        for component, spec in self.image_specs().items():
            if spec.component != component:
                raise ConfigError(f"profile {self.name!r}: {component} slot holds a {spec.component} image")

    def image_specs(self) -> dict[str, ImageSpec]:
        """Component name -> image spec, in boot order."""
        return {c: getattr(self, c.replace("-", "_")) for c in COMPONENTS}

    @property
    def boot_settings(self) -> BootSettings:
        return BootSettings(secure_boot=self.secure_boot, kernel_cmdline=self.kernel_cmdline,
                            startup_locality=0 if self.log_startup_locality else None)

    @property
    def device_class(self) -> str:
        """The device class whose agent configuration this profile carries."""
        return self.agent_config.version.rsplit("/", 1)[0]

    def replace(self, **changes: Any) -> Profile:
        """A copy with some fields changed (e.g. ``name=...``, ``kernel=ImageSpec(...)``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in a device's ``device.json``)."""
        return {
            "name": self.name,
            "description": self.description,
            "images": {c: {"version": s.version, "variant": s.variant}
                       for c, s in self.image_specs().items()},
            "secure_boot": self.secure_boot,
            "kernel_cmdline": self.kernel_cmdline,
            "log_startup_locality": self.log_startup_locality,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Inverse of :meth:`to_dict`; raises :class:`ConfigError` on a malformed description."""
        try:
            images = data["images"]
            specs = {c.replace("-", "_"): ImageSpec(c, str(images[c]["version"]), str(images[c]["variant"]))
                     for c in COMPONENTS}
            secure_boot = data["secure_boot"]
            startup_locality = data.get("log_startup_locality", False)
            if not isinstance(secure_boot, bool) or not isinstance(startup_locality, bool):
                raise ConfigError("secure_boot and log_startup_locality must be true or false")
            return cls(name=str(data["name"]), description=str(data["description"]),
                       secure_boot=secure_boot, kernel_cmdline=str(data["kernel_cmdline"]),
                       log_startup_locality=startup_locality, **specs)
        except ConfigError:
            raise
        except EdgeError as exc:
            raise ConfigError(f"malformed profile: {exc.diagnostics()}") from exc
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"malformed profile: missing or invalid {exc}") from exc


def golden_profile(device_class: str = DEVICE_CLASS,
                   firmware_version: str = GOLDEN_FIRMWARE_VERSION) -> Profile:
    """The vendor's golden configuration of a device class."""
    return Profile(
        name="golden",
        description=f"vendor firmware {firmware_version}, Secure Boot on, genuine images",
        firmware=ImageSpec(FIRMWARE, firmware_version),
        bootloader=ImageSpec(BOOTLOADER, BOOTLOADER_VERSION),
        kernel=ImageSpec(KERNEL, KERNEL_VERSION),
        initrd=ImageSpec(INITRD, KERNEL_VERSION),
        rootfs=ImageSpec(ROOTFS, ROOTFS_VERSION),
        agent_config=ImageSpec(AGENT_CONFIG, f"{device_class}/{AGENT_CONFIG_REVISION}"),
    )


def _tampered(base: Profile, component: str, description: str) -> Profile:
    field = component.replace("-", "_")
    spec: ImageSpec = getattr(base, field)
    return base.replace(name=f"tampered-{component}", description=description,
                        **{field: ImageSpec(spec.component, spec.version, TAMPER_VARIANT)})


def _builtin_profiles() -> dict[str, Profile]:
    golden = golden_profile()
    profiles = [
        golden,
        _tampered(golden, BOOTLOADER, "bootloader.efi patched by an attacker (signature broken)"),
        _tampered(golden, KERNEL, "vmlinuz patched by an attacker (signature broken)"),
        _tampered(golden, INITRD, "initrd.img patched by an attacker"),
        golden.replace(name="tampered-cmdline", description="kernel command line with init=/bin/sh",
                       kernel_cmdline=f"{DEFAULT_CMDLINE} init=/bin/sh"),
        _tampered(golden, ROOTFS, "rootfs.img (application) patched by an attacker"),
        _tampered(golden, AGENT_CONFIG, "agent-class.toml loosened by an attacker (debug shell on)"),
        golden.replace(name="rolled-back-firmware",
                       description=f"older vendor-signed firmware {ROLLED_BACK_FIRMWARE_VERSION}",
                       firmware=ImageSpec(FIRMWARE, ROLLED_BACK_FIRMWARE_VERSION)),
        golden.replace(name="updated-firmware",
                       description=f"newer vendor-signed firmware {UPDATED_FIRMWARE_VERSION}",
                       firmware=ImageSpec(FIRMWARE, UPDATED_FIRMWARE_VERSION)),
        golden.replace(name="golden-startup-locality",
                       description="golden, log starts with an EV_NO_ACTION StartupLocality event "
                                   "(locality 0): same PCRs as golden",
                       log_startup_locality=True),
        golden.replace(name="secureboot-disabled",
                       description="Secure Boot disabled (SecureBoot=0, no authority events)",
                       secure_boot=False),
    ]
    return {p.name: p for p in profiles}


#: The built-in profiles by name (read-only).
PROFILES: Mapping[str, Profile] = MappingProxyType(_builtin_profiles())


def get_profile(profile: Profile | str) -> Profile:
    """A profile by name (or the profile itself); raises :class:`ConfigError` for unknown names."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}") from None


@functools.lru_cache(maxsize=64)
def _reference(profile: Profile, banks: tuple[str, ...]) -> dict[str, dict[int, bytes]]:
    media = BootMedia.from_specs(profile.image_specs())
    return build_boot_log(media, profile.boot_settings, banks).replay()


def reference_pcrs(profile: Profile | str,
                   banks: tuple[str, ...] = DEFAULT_BANKS) -> dict[str, dict[int, bytes]]:
    """The PCR values (bank -> PCR index -> value) a boot of ``profile`` yields, computed in
    software.  Only the PCRs the boot extends are listed (see firmware_sim.boot.MEASURED_PCRS)."""
    return copy.deepcopy(_reference(get_profile(profile), tuple(banks)))


def pcrs_to_json(pcrs: Mapping[str, Mapping[int, bytes]]) -> dict[str, dict[str, dict[str, str]]]:
    """The project's JSON form of PCR values: ``{"pcrs": {"sha256": {"0": "<hex>"}}}``."""
    return {"pcrs": {bank: {str(i): v.hex() for i, v in sorted(values.items())}
                     for bank, values in pcrs.items()}}
