"""The certificate revocation list of device certificates, for the broker's device listener.

Revoking a device (``fleet-server device revoke`` or the console) stops the server from
challenging it, refuses its evidence and releases it no model key; the CRL makes the broker refuse
its TLS connection as well. Every certificate issued to a device is recorded (:func:`record_issued`,
table ``devicecertificate``); :func:`write_crl` lists every unexpired certificate of a device in state
``revoked`` (those of earlier enrollments too) and every certificate replaced by a re-enrollment,
signs the list with the fleet CA, and writes it (atomically, 0644) to
``server.fleet_ca_crl``, which ``broker/mosquitto.conf`` names as the device listener's ``crlfile``.
Mosquitto reads it at start and on SIGHUP (``systemctl reload mosquitto``); a connection already
open stays open until it ends, which the revocation message sent to the device does not wait for.

It is rewritten after every revocation and approval (an approval re-admits a revoked device, whose
serial then leaves the list), and must be rewritten within ``pki.CRL_VALIDITY`` (30 days) at the
latest (``server.crl_lifetime``): ``fleet-server device crl`` does it by hand, since OpenSSL refuses every
client certificate once the CRL's ``nextUpdate`` has passed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fleet_server import pki
from fleet_server.config import ServerConfig
from fleet_server.service.common import log_event
from fleet_server.storage.repo import Repository, Tx
from protocol.errors import EdgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CrlWritten:
    path: Path
    revoked: int
    """Certificates listed."""


def record_issued(tx: Tx, device_id: str, cert_pem: bytes, *, now: int) -> None:
    """Record the certificate just issued to ``device_id`` (in the transaction that stores it): the
    device's earlier certificates are marked replaced, so the CRL lists them until they expire."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
    tx.record_device_certificate(device_id, format(cert.serial_number, "x"), not_after=not_after, now=now)


def revoked_serials(repo: Repository, *, now: float) -> list[str]:
    """Serials (hex) of the unexpired certificates to refuse: all of a revoked device's, and every
    certificate replaced by a re-enrollment."""
    return repo.crl_serials(int(now * 1000))


def write_crl(repo: Repository, config: ServerConfig, *, now: float, path: Path | None = None) -> CrlWritten:
    """Sign and write the CRL (to ``path``, default ``config.fleet_ca_crl``); needs the fleet CA key."""
    ca = pki.load_ca_files(config.fleet_ca_cert, config.fleet_ca_key)
    serials = revoked_serials(repo, now=now)
    target = path or config.fleet_ca_crl
    pki.write_certificate(target, pki.build_crl(ca, serials, now=now,
                                                validity=dt.timedelta(seconds=config.crl_lifetime)))
    return CrlWritten(target, len(serials))


def refresh_crl(repo: Repository, config: ServerConfig, *, now: float) -> str:
    """:func:`write_crl` after a revocation or an approval: a one-line outcome for the operator, never
    an exception (the state change itself has been made either way)."""
    try:
        written = write_crl(repo, config, now=now)
    except (EdgeError, OSError) as exc:
        why = exc.diagnostics() if isinstance(exc, EdgeError) else (exc.strerror or str(exc))
        log_event(log, logging.WARNING, "crl_not_written", path=str(config.fleet_ca_crl), error=why)
        return (f"WARNING: the CRL {config.fleet_ca_crl} was not rewritten ({why}); "
                "run `fleet-server device crl` where the fleet CA key is")
    return (f"CRL {written.path} lists {written.revoked} revoked certificate(s); reload the broker "
            "(SIGHUP) to apply it")


def renewal_due(path: Path, *, now: float, lifetime: float) -> bool:
    """True if the CRL at ``path`` is missing, unreadable, or has less than a third of ``lifetime``
    left before its ``nextUpdate`` (renewing early leaves time for a failed attempt to be retried)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return True
    next_update = crl.next_update_utc
    return next_update is None or next_update.timestamp() - now < lifetime / 3


def _signal_broker(pid_file: Path) -> None:
    """SIGHUP to the broker whose pid ``pid_file`` holds: Mosquitto re-reads its CRL."""
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        raise OSError(f"{pid_file}: not a pid") from None
    os.kill(pid, signal.SIGHUP)


class CrlRenewer:
    """The thread of ``fleet-server run`` (one per ``run``, however many workers) that keeps the CRL
    current: it checks every ``lifetime / 10`` seconds (0.5 s to 5 min) and rewrites the CRL when
    :func:`renewal_due`, then reloads the broker (``server.broker_pid_file``) or, for a broker this
    server does not manage, logs that it must be reloaded."""

    def __init__(self, repo: Repository, config: ServerConfig) -> None:
        self.repo = repo
        self.config = config
        self.interval = min(300.0, max(0.5, config.crl_lifetime / 10))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-crl", daemon=True)

    def start(self) -> CrlRenewer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def run_once(self, now: float) -> bool:
        """Renew the CRL if due; True if it was rewritten."""
        config = self.config
        if not renewal_due(config.fleet_ca_crl, now=now, lifetime=config.crl_lifetime):
            return False
        written = write_crl(self.repo, config, now=now)
        if config.broker_pid_file is None:
            log_event(log, logging.INFO, "crl_renewed", path=str(written.path), revoked=written.revoked,
                      action="the broker must reload it (SIGHUP)")
        else:
            _signal_broker(config.broker_pid_file)
            log_event(log, logging.INFO, "crl_renewed", path=str(written.path), revoked=written.revoked,
                      broker_reloaded=str(config.broker_pid_file))
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once(time.time())
            except (EdgeError, OSError) as exc:
                why = exc.diagnostics() if isinstance(exc, EdgeError) else (exc.strerror or str(exc))
                log_event(log, logging.WARNING, "crl_renewal_failed", path=str(self.config.fleet_ca_crl),
                          error=why)
            self._stop.wait(self.interval)


__all__ = ["CrlRenewer", "CrlWritten", "record_issued", "refresh_crl", "renewal_due", "revoked_serials",
           "write_crl"]
