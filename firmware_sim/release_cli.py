"""``firmware-sim release build OUT_DIR --from PROFILE_OR_FOLDER --version V`` (see firmware_sim.release).

Writes a firmware bundle folder (``images/``, ``release.json``, ``reference-values.json``); with
``--json`` prints a summary object (device class, version, components, reference values).  Add it
to the fleet server with ``fleet-server release add OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    release = sub.add_parser("release", help="firmware releases: bundle folders and their reference values")
    rsub = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    p = rsub.add_parser("build", help="write a firmware bundle folder and the reference values of its boot")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="folder to write (absent or empty)")
    p.add_argument("--from", dest="source", required=True, metavar="PROFILE_OR_IMAGES",
                   help="a boot profile (golden, updated-firmware...) or a folder of images")
    p.add_argument("--version", required=True, metavar="V",
                   help="the release version (a profile's firmware image is rebuilt at V)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    from firmware_sim.release import build_release, resolve_source

    summary = build_release(args.out, resolve_source(args.source, args.version))
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(f"release {summary['device_class']} {summary['version']} written to {args.out} "
              f"(reference values {summary['reference_values']['name']})")
    return 0


__all__ = ["register"]
