"""`firmware-sim` command line: simulated edge devices (measured boot into swtpm) and their profiles.

Sub-commands are registered through :data:`COMMANDS`: command name -> ``"module:function"``, where
the function takes the argparse sub-parsers object and adds its parser, setting ``handler`` (a
function ``args -> exit code``) with ``set_defaults``.  Only the module of the command being run is
imported, so a command with heavy dependencies costs nothing to the others.  To add a command
(``fleet``, ``demo``, ``bench``...), write ``register(subparsers)`` in its own module and add one
line to :data:`COMMANDS`.

Errors derived from :class:`~protocol.errors.EdgeError` (and OS errors such as a missing folder)
are printed as one line on stderr and exit with status 1; usage errors exit with 2; nothing reaches
the user as a traceback.

Commands here::

    firmware-sim profiles                                   list the boot profiles
    firmware-sim device create DIR [--profile P] [--ca CA]  create a device (images + manufactured TPM)
    firmware-sim device boot DIR [--profile P]              boot, print the TCTI, run until Ctrl-C
    firmware-sim device reflash DIR --profile P             flash another profile (next boot)
    firmware-sim device show DIR                            profile, paths and image digests
    firmware-sim device reference --profile P [--json]      expected PCR values of a profile
    firmware-sim device destroy DIR                         stop and delete a device folder
    firmware-sim model build OUT.onnx [--seed N]            a small ONNX classifier (tests, demo)
    firmware-sim fleet --devices N --duration S ...         a whole simulated fleet, measured (fleet_cli)
    firmware-sim demo                                       broker, server + console, five devices (demo)
    firmware-sim release build OUT --from P|DIR --version V a firmware bundle folder + reference values
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from protocol.errors import EdgeError

PROG = "firmware-sim"

#: Sub-command name -> "module:function" that registers it on the sub-parsers object.
COMMANDS: dict[str, str] = {
    "device": "firmware_sim.cli:register_device",
    "profiles": "firmware_sim.cli:register_profiles",
    "fleet": "firmware_sim.fleet_cli:register",
    "model": "firmware_sim.model_cli:register",
    "demo": "firmware_sim.demo:register",
    "release": "firmware_sim.release_cli:register",
}

#: Environment variable naming the manufacturer CA folder used by ``device create``.
CA_ENV = "EDGE_SIM_CA"

_Subparsers = Any  # argparse's _SubParsersAction is private; registrars receive it untyped


def _load_registrar(spec: str) -> Callable[[_Subparsers], None]:
    module_name, _, function = spec.partition(":")
    module = importlib.import_module(module_name)
    registrar: Callable[[_Subparsers], None] = getattr(module, function or "register")
    return registrar


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. With ``only``, other commands get lightweight placeholders."""
    parser = argparse.ArgumentParser(prog=PROG, description="Simulated edge devices with measured boot.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        if only is not None and name != only:
            # A placeholder lists the command in --help without importing its module.
            sub.add_parser(name, help=f"{name} commands (see `{PROG} {name} --help`)")
            continue
        _load_registrar(spec)(sub)
    return parser


# --- profiles -------------------------------------------------------------------------------------


def register_profiles(sub: _Subparsers) -> None:
    p = sub.add_parser("profiles", help="list the boot profiles")
    p.add_argument("--json", action="store_true", help="print the profiles as JSON")
    p.set_defaults(handler=_cmd_profiles)


def _cmd_profiles(args: argparse.Namespace) -> int:
    from firmware_sim.profiles import PROFILES

    if args.json:
        print(json.dumps({"profiles": [p.to_dict() for p in PROFILES.values()]}, indent=2))
        return 0
    width = max(len(name) for name in PROFILES)
    for name, profile in PROFILES.items():
        print(f"{name:<{width}}  {profile.description}")
    return 0


# --- device ---------------------------------------------------------------------------------------


def register_device(sub: _Subparsers) -> None:
    device = sub.add_parser("device", help="create, boot and inspect simulated devices")
    dsub = device.add_subparsers(dest="device_command", metavar="ACTION", required=True)

    p = dsub.add_parser("create", help="create a device folder: boot images and a manufactured swtpm")
    p.add_argument("dir", type=Path, help="device folder (must not exist or be empty)")
    p.add_argument("--profile", default="golden", help="profile to flash (default: golden)")
    p.add_argument("--ca", type=Path, default=None,
                   help=f"manufacturer CA folder, created if missing (default: ${CA_ENV}, "
                        "else DIR/../manufacturer-ca)")
    p.set_defaults(handler=_cmd_create)

    p = dsub.add_parser("boot", help="boot the device, print its TCTI, keep its TPM running until Ctrl-C")
    p.add_argument("dir", type=Path)
    p.add_argument("--profile", default=None, help="flash this profile before booting")
    p.set_defaults(handler=_cmd_boot)

    p = dsub.add_parser("reflash", help="flash another profile (takes effect at the next boot)")
    p.add_argument("dir", type=Path)
    p.add_argument("--profile", required=True)
    p.set_defaults(handler=_cmd_reflash)

    p = dsub.add_parser("show", help="show a device's profile, paths and image digests")
    p.add_argument("dir", type=Path)
    p.set_defaults(handler=_cmd_show)

    p = dsub.add_parser("reference", help="print the PCR values a profile's boot yields (no TPM)")
    p.add_argument("--profile", required=True)
    p.add_argument("--bank", action="append", choices=("sha1", "sha256"),
                   help="bank to print (repeatable; default: both)")
    p.add_argument("--json", action="store_true",
                   help='print {"profile": P, "pcrs": {"sha256": {"0": "<hex>"}}}')
    p.set_defaults(handler=_cmd_reference)

    p = dsub.add_parser("destroy", help="stop a device and delete its folder")
    p.add_argument("dir", type=Path)
    p.set_defaults(handler=_cmd_destroy)


def _default_ca_dir(device_dir: Path) -> Path:
    env = os.environ.get(CA_ENV)
    if env:
        return Path(env)
    return device_dir.resolve().parent / "manufacturer-ca"


def _cmd_create(args: argparse.Namespace) -> int:
    from firmware_sim.device import SimulatedDevice
    from firmware_sim.manufacturer import ManufacturerCA
    from firmware_sim.profiles import get_profile

    profile = get_profile(args.profile)  # fail on a bad name before creating anything
    ca = ManufacturerCA.load_or_create(args.ca if args.ca is not None else _default_ca_dir(args.dir))
    device = SimulatedDevice.create(args.dir, ca=ca, profile=profile)
    print(f"created device {device.folder} (profile {profile.name}, manufacturer CA {ca.directory})")
    return 0


class _Terminated(Exception):
    """SIGINT or SIGTERM received: leave the wait loop and stop the TPM."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _cmd_boot(args: argparse.Namespace) -> int:
    from firmware_sim.device import SimulatedDevice

    # Handle SIGINT ourselves too: a shell starts background jobs with SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler; `kill -INT` must still stop the device cleanly.
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with SimulatedDevice(args.dir) as device:
            record = device.boot(args.profile)
            # The TCTI alone on stdout (for scripts); everything else on stderr.
            print(device.tcti, flush=True)
            print(f"{PROG}: booted {device.folder} with profile {device.profile.name}: "
                  f"{len(record.events)} events in {device.eventlog_path}; Ctrl-C stops the TPM",
                  file=sys.stderr, flush=True)
            try:
                while device.running:
                    time.sleep(0.5)
            except (KeyboardInterrupt, _Terminated):
                return 0
            print(f"{PROG}: swtpm of {device.folder} exited unexpectedly", file=sys.stderr)
            return 1
    except _Terminated:  # a signal during the boot itself: the device context has stopped swtpm
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_reflash(args: argparse.Namespace) -> int:
    from firmware_sim.device import SimulatedDevice

    device = SimulatedDevice(args.dir)
    device.reflash(args.profile)
    print(f"flashed profile {device.profile.name} to {device.folder} (effective at the next boot)")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from agent.update import bootctl
    from firmware_sim.device import SimulatedDevice
    from firmware_sim.images import COMPONENTS

    device = SimulatedDevice(args.dir)
    profile = device.profile
    print(f"device:     {device.folder}")
    print(f"profile:    {profile.name} ({profile.description})")
    print(f"secureboot: {'on' if profile.secure_boot else 'off'}")
    print(f"cmdline:    {profile.kernel_cmdline}")
    print(f"eventlog:   {device.eventlog_path}")
    print(f"tpm state:  {device.tpm_dir}")
    ctl = bootctl.read(device.boot_dir)
    trial = "none" if ctl.trial is None else f"slot {ctl.trial.slot} ({ctl.trial.version}, " \
        f"{ctl.trial.tries_left} tries left)"
    print(f"boot slots: active {ctl.active}, booted {ctl.booted}, trial {trial}")
    for component in COMPONENTS:
        path = device.image_path(component)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            digest = "(missing)"
        print(f"{component:<12} {path.name:<17} sha256 {digest}")
    return 0


def format_pcrs(pcrs: dict[str, dict[int, bytes]]) -> str:
    """PCR values in the layout of ``tpm2_pcrread`` (lowercase hex)."""
    lines = []
    for bank, values in pcrs.items():
        lines.append(f"  {bank}:")
        for index, value in sorted(values.items()):
            lines.append(f"    {index:<2}: 0x{value.hex()}")
    return "\n".join(lines)


def _cmd_reference(args: argparse.Namespace) -> int:
    from firmware_sim.profiles import get_profile, pcrs_to_json, reference_pcrs

    profile = get_profile(args.profile)
    banks = tuple(dict.fromkeys(args.bank)) if args.bank else ("sha1", "sha256")
    pcrs = reference_pcrs(profile, banks)
    if args.json:
        print(json.dumps({"profile": profile.name, **pcrs_to_json(pcrs)}, indent=2))
    else:
        print(format_pcrs(pcrs))
    return 0


def _cmd_destroy(args: argparse.Namespace) -> int:
    from firmware_sim.device import SimulatedDevice

    device = SimulatedDevice(args.dir)  # refuses folders that are not devices
    device.destroy()
    print(f"destroyed {device.folder}")
    return 0


# --- entry point ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    only = first if first in COMMANDS else ""
    try:
        parser = build_parser(only)
    except ImportError as exc:  # a command's extras are not installed
        print(f"{PROG}: {exc.name or exc} is not installed; install edge-attest[sim]", file=sys.stderr)
        return 2
    args = parser.parse_args(args_list)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        return int(handler(args))
    except EdgeError as exc:
        print(f"{PROG}: {exc.diagnostics()}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{PROG}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
