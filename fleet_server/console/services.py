"""What the console's views share, built once by the application factory: the configuration, the
database (repository, read-model queries, accounts, audit log), the clock, and the server's signing
key and fleet CA (loaded on first use: a console that only shows the fleet does not need them).

Views reach it with :func:`services` (``current_app.extensions["fleet_console"]``); nothing global.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from sqlalchemy import Engine

from fleet_server import pki
from fleet_server.config import ConsoleSettings, ServerConfig
from fleet_server.console.accounts import Accounts
from fleet_server.console.audit import AuditLog, AuditRecord
from fleet_server.console.queries import ConsoleQueries
from fleet_server.console.rbac import Principal
from fleet_server.keys import ResultSigner, load_signing_key
from fleet_server.storage.repo import Repository

EXTENSION = "fleet_console"


def system_now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class ConsoleServices:
    """Everything the views need (see the module docstring)."""

    config: ServerConfig
    engine: Engine
    repo: Repository
    accounts: Accounts
    audit: AuditLog
    queries: ConsoleQueries
    clock: Callable[[], int] = system_now_ms
    _signer: ResultSigner | None = field(default=None, repr=False)
    _fleet_ca: pki.FleetCA | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def settings(self) -> ConsoleSettings:
        return self.config.console

    def now(self) -> int:
        """Now, in ms since the epoch."""
        return self.clock()

    def signer(self) -> ResultSigner:
        """The server's result-signing key (signs revocations and enrollment results)."""
        with self._lock:
            if self._signer is None:
                self._signer = load_signing_key(self.config.signing_key)
            return self._signer

    def fleet_ca(self) -> pki.FleetCA:
        """The fleet CA (signs a pending device's certificate on approval)."""
        with self._lock:
            if self._fleet_ca is None:
                self._fleet_ca = pki.load_ca_files(self.config.fleet_ca_cert, self.config.fleet_ca_key)
            return self._fleet_ca

    def refresh_crl(self) -> str:
        """Rewrite the device CRL after a revocation or an approval (:mod:`fleet_server.service.crl`);
        never raises: the outcome line (a warning when it could not be written) is audited."""
        from fleet_server.service.crl import refresh_crl

        return refresh_crl(self.repo, self.config, now=self.now() / 1000)

    def record(self, principal: Principal, action: str, target: str = "",
               details: Mapping[str, Any] | None = None) -> AuditRecord:
        """Append an audit entry for an action of ``principal``."""
        return self.audit.append(actor=principal.actor, action=action, target=target, details=details,
                                 now=self.now())


def services() -> ConsoleServices:
    """The services of the current application."""
    found: ConsoleServices = current_app.extensions[EXTENSION]
    return found
