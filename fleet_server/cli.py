"""`fleet-server` command line.

Sub-commands live in :mod:`fleet_server.commands`, one module per area, each exposing
``register(subparsers)``.  Modules are imported lazily per command, so that e.g. ``eventlog`` works
without the web or database stack being importable.  Errors derived from :class:`EdgeError` are
printed as one line on stderr; nothing reaches the user as a traceback.

Exit codes: 0 success, 1 the operation ran and the answer is "no" (invalid evidence, malformed
input, failed check), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from protocol.errors import EdgeError

# Sub-command name -> module in fleet_server.commands that registers it.
COMMANDS: dict[str, str] = {
    "eventlog": "eventlog_cmd",
    "quote": "quote_cmd",
    "init": "init_cmd",
    "run": "run_cmd",
    "db": "db_cmd",
    "device": "device_cmd",
    "policy": "policy_cmd",
    "claim": "claim_cmd",
    "model": "model_cmd",
    "console": "console_cmd",
    "user": "user_cmd",
    "token": "token_cmd",
    "audit": "audit_cmd",
    "updates": "updates_cmd",
    "release": "release_cmd",
    "rollout": "rollout_cmd",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-server", description="Fleet attestation server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            # Register a placeholder so `--help` lists every command without importing it.
            sub.add_parser(name, help=f"{name} commands (see `fleet-server {name} --help`)")
            continue
        mod = importlib.import_module(f"fleet_server.commands.{module}")
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    # Import only the module of the command being run; `--help` alone lists placeholders.
    only = first if first in COMMANDS else ""
    try:
        parser = build_parser(only)
    except ImportError as exc:  # a role's extras are not installed
        missing = exc.name or exc
        print(f"fleet-server: {missing} is not installed; install edge-attest[server]", file=sys.stderr)
        return 2
    args = parser.parse_args(args_list)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        return int(handler(args))
    except EdgeError as exc:
        print(f"fleet-server: {exc.diagnostics()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
