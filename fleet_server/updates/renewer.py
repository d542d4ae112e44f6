"""The thread of ``fleet-server run`` that keeps snapshot and timestamp (online keys) current.

Same pattern as the CRL renewer (:class:`fleet_server.service.crl.CrlRenewer`): one per ``run``,
checking every ``timestamp_expiry / 10`` seconds (0.5 s to 5 min) and re-signing a role when less
than half of its validity is left, so a device never sees an expired timestamp while the server runs.
Nothing happens until ``fleet-server updates init`` has made the repository.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fleet_server.config import ServerConfig
from fleet_server.service.common import log_event
from fleet_server.updates.repository import open_update_repository, update_repository_exists
from protocol.errors import EdgeError

log = logging.getLogger("fleet_server.updates")


class UpdateRenewer:
    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.interval = min(300.0, max(0.5, config.updates.timestamp_expiry / 10))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-tuf-renew", daemon=True)

    def start(self) -> UpdateRenewer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def run_once(self) -> list[str]:
        """Renew what is due; the roles re-signed (none before the repository exists)."""
        if not update_repository_exists(self.config):
            return []
        renewed = open_update_repository(self.config, clock=self.clock).renew()
        if renewed:
            log_event(log, logging.INFO, "tuf_renewed", roles=",".join(renewed))
        return renewed

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except (EdgeError, OSError) as exc:
                why = exc.diagnostics() if isinstance(exc, EdgeError) else (exc.strerror or str(exc))
                log_event(log, logging.WARNING, "tuf_renewal_failed", error=why)
            self._stop.wait(self.interval)
