"""``fleet-server run --config server.toml [--workers N]``: run the workers until SIGTERM/SIGINT.

The database is migrated to the newest schema first. With ``[console] enabled = true`` the admin web
console is served from a thread of this process (waitress). With ``N`` > 1 the workers are separate
processes (``spawn``) sharing the load through MQTT v5 shared subscriptions; a worker that dies is
restarted. Logs are structured one-line ``key=value`` records on stderr and in ``server.log_file``
(tracebacks of unexpected errors only in the file).
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from fleet_server.config import find_config, load_config
from fleet_server.service.common import configure_logging
from fleet_server.service.worker import run_workers
from protocol.errors import ConfigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("run", help="run the fleet server workers",
                                   description="Run the fleet server workers until SIGTERM or SIGINT.")
    parser.add_argument("--config", metavar="FILE",
                        help="server configuration (default: $FLEET_SERVER_CONFIG, else ./server.toml)")
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes (default: server.workers)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # From the first moment, SIGTERM/SIGINT are a stop request, never an abrupt death: a signal
    # that arrives while the database is migrated or the console starts stops the server cleanly
    # as soon as its workers run (they install their own handlers and honour this request).
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    path = find_config(args.config)
    config = load_config(path)
    if args.workers is not None and not 1 <= args.workers <= 256:
        raise ConfigError("--workers must be between 1 and 256")
    configure_logging(config.log_level, config.log_file)
    console = None
    if config.console.enabled:  # the admin console on a thread of this process (waitress)
        from fleet_server.console.server import start_console

        console = start_console(config)
    try:
        return run_workers(Path(path), config, workers=args.workers, stop=stop)
    finally:
        if console is not None:
            console.stop()
