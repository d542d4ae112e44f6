"""``fleet-server console --config server.toml [--host H] [--port P]``: serve the admin web console
alone (waitress), until Ctrl-C / SIGTERM. ``fleet-server run`` serves it too when
``[console] enabled = true``. The database must be at the newest schema (``fleet-server db upgrade``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
from types import FrameType
from typing import Any

from fleet_server.config import find_config, load_config
from fleet_server.service.cliutil import add_config_argument, repository
from fleet_server.service.common import configure_logging, log_event
from protocol.errors import ConfigError

log = logging.getLogger("fleet_server.console")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("console", help="serve the admin web console",
                                   description="Serve the admin web console (waitress) until SIGTERM/SIGINT.")
    parser.add_argument("--host", help="address to bind (default: console.host)")
    parser.add_argument("--port", type=int, help="port (default: console.port)")
    add_config_argument(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from fleet_server.console import create_app
    from fleet_server.console.server import ConsoleServer

    config = load_config(find_config(args.config))
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ConfigError("--port must be between 0 and 65535")
    settings = dataclasses.replace(config.console, host=args.host or config.console.host,
                                   port=config.console.port if args.port is None else args.port)
    config = dataclasses.replace(config, console=settings)
    with repository(config):  # refuses a database that is not at the newest schema
        pass
    server = ConsoleServer(create_app(config), host=settings.host, port=settings.port,
                           threads=settings.threads, behind_proxy=settings.proxy_hops > 0)
    configure_logging(config.log_level, config.log_file)

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    log_event(log, logging.INFO, "console_started", url=server.url, secure_cookies=settings.secure_cookies)
    print(f"fleet console on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    log_event(log, logging.INFO, "console_stopped")
    return 0
