"""``edge-agent``: run the attestation agent, show its status, print its version.

::

    edge-agent run --config agent.toml       run until SIGTERM/SIGINT (exit 0), or a fatal error (exit 1)
    edge-agent status --config agent.toml    print the running agent's status file (exit 1 if missing)
    edge-agent version

Errors are one line on stderr (``edge-agent: error: ...``) and exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from agent.config import load_config
from agent.log import configure_logging
from agent.statefile import read_optional
from agent.version import agent_version
from protocol.errors import EdgeError, StorageError

PROG = "edge-agent"
MAX_STATUS = 256 * 1024


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Edge device attestation agent.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent (enroll if needed, answer challenges)")
    status = sub.add_parser("status", help="show the status the running agent last wrote")
    for command in (run, status):
        command.add_argument("--config", required=True, type=Path, metavar="FILE",
                             help="agent configuration (TOML)")
    status.add_argument("--json", action="store_true", help="print the status file as JSON")
    sub.add_parser("version", help="print the agent version")
    return parser


def _run(config_path: Path) -> int:
    from agent.service import Agent  # imported here: `status` and `version` need no TPM or MQTT stack

    config = load_config(config_path)
    configure_logging(config.log.level, config.log.format)
    if config.update is None:
        return Agent(config).run_forever()
    from agent.update.reboot import CommandRebooter

    # The update channel is the agent's own TUF client (update.root_file); the reboot, a command.
    return Agent(config, rebooter=CommandRebooter(config.update.reboot_command)).run_forever()


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) or "-"
    return str(value)


def _status(config_path: Path, as_json: bool, out: IO[str]) -> int:
    config = load_config(config_path)
    raw = read_optional(config.status_path, max_size=MAX_STATUS)
    if raw is None:
        raise StorageError(f"no status file {config.status_path}: the agent has not run with this "
                           "configuration")
    try:
        status = json.loads(raw)
    except ValueError:
        raise StorageError(f"status file {config.status_path} is not valid JSON") from None
    if not isinstance(status, dict):
        raise StorageError(f"status file {config.status_path} is not a JSON object")
    running = _alive(status.get("pid")) and status.get("phase") not in ("stopped", "failed")
    if as_json:
        out.write(json.dumps({**status, "running": running}, sort_keys=True) + "\n")
        return 0
    updated = status.get("updated")
    age = f"{time.time() - updated:.0f}s ago" if isinstance(updated, int | float) else "-"
    until = status.get("trusted_until")
    lines = [("device", status.get("device_id")), ("running", running), ("phase", status.get("phase")),
             ("enrolled", status.get("enrolled")), ("connected", status.get("connected")),
             ("verdict", status.get("verdict")), ("trusted", status.get("trusted")),
             ("trusted_until", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
              if isinstance(until, int | float) else None),
             ("reasons", status.get("verdict_reasons")), ("last_request", status.get("last_request_reason")),
             ("error", status.get("error")), ("updated", age)]
    if status.get("enrollment"):
        lines.insert(4, ("enrollment", status.get("enrollment")))
    for key, value in lines:
        out.write(f"{key}: {_value(value)}\n")
    counters = status.get("counters")
    if isinstance(counters, dict) and counters:
        out.write("counters: " + " ".join(f"{k}={v}" for k, v in sorted(counters.items())) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edge-agent``; returns the exit status."""
    args = _parser().parse_args(argv)  # exits 2 on usage errors
    try:
        if args.command == "version":
            print(f"{PROG} {agent_version()}")
            return 0
        if args.command == "status":
            return _status(args.config, args.json, sys.stdout)
        return _run(args.config)
    except EdgeError as exc:
        print(f"{PROG}: error: {exc.diagnostics()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the agent installed its handler
        return 130


if __name__ == "__main__":
    sys.exit(main())
