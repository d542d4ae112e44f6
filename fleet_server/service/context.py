"""What the services need besides the database: settings, keys, trust anchors, time and randomness.

:class:`ServiceContext` is built once per worker process from the configuration
(:meth:`ServiceContext.from_config`) or directly by tests, which pass a manual clock and seeded
randomness. Nothing here is global: every service receives its context.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from fleet_server import pki
from fleet_server.config import AlertSettings, AttestationSettings, ModelSettings, ServerConfig
from fleet_server.enrollment.ekcert import load_trust_bundle
from fleet_server.keys import ResultSigner, load_signing_key
from fleet_server.modelstore.kek import Kek, load_kek
from fleet_server.service.common import Clock, SystemClock
from protocol.errors import ConfigError


def load_trust_bundle_file(path: Path) -> tuple[x509.Certificate, ...]:
    """The trusted TPM manufacturer CAs from a PEM file; an empty tuple if the file does not exist
    (then every enrollment is refused with a reason saying so)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise ConfigError(f"cannot read the trust bundle {path}: {exc.strerror or exc}") from None
    if not data.strip():
        return ()
    try:
        return load_trust_bundle(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.diagnostics()}") from None


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """Everything a worker's services share (immutable; safe across threads)."""

    settings: AttestationSettings
    signer: ResultSigner
    fleet_ca: pki.FleetCA | None = field(repr=False)
    """Signs device certificates at enrollment; ``None`` disables admission (devices stay pending)."""
    trust_bundle: Sequence[x509.Certificate] = field(default=(), repr=False)
    clock: Clock = field(default_factory=SystemClock)
    rng: random.Random = field(default_factory=random.Random, repr=False)
    """Jitter of the schedule (not a secret)."""
    token: Callable[[int], bytes] = field(default=secrets.token_bytes, repr=False)
    """Source of nonces and credential secrets (``secrets.token_bytes``)."""
    models: ModelSettings = field(default_factory=ModelSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    kek: Kek | None = field(default=None, repr=False)
    """Opens the sealed data keys of published models; ``None`` disables key release."""

    @classmethod
    def from_config(cls, config: ServerConfig, *, clock: Clock | None = None) -> ServiceContext:
        """Load keys and trust anchors named by ``config`` (key files must be 0600)."""
        signer = load_signing_key(config.signing_key)
        ca = pki.load_ca_files(config.fleet_ca_cert, config.fleet_ca_key)
        bundle = load_trust_bundle_file(config.trust_bundle)
        return cls(settings=config.attestation, signer=signer, fleet_ca=ca, trust_bundle=bundle,
                   clock=clock or SystemClock(), models=config.models, alerts=config.alerts,
                   kek=load_kek(config.models.kek_file))

    def next_attestation_at(self, now: int) -> int:
        """``now`` + interval +- jitter (ms)."""
        jitter = self.settings.jitter_ms
        return now + self.settings.interval_ms + (self.rng.randint(-jitter, jitter) if jitter else 0)
