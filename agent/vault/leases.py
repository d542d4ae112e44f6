"""The lease clock: until when each unlocked model may serve (pure: time is a parameter).

A key release carries a lease (id, expiry, sample quota). Each *verified, trusted* attestation
result renews every lease until its ``lease_until`` (a later time only: renewals never shorten what
the server granted). When a lease passes unrenewed, the vault locks the model: the inference session
is dropped, and a new key release (after a new trusted verdict) is needed to serve again.

The offline grace: the server chooses how long a lease lasts without contact (its ``lease_until``).
The device may *shorten* that with ``[models] offline_grace``: the model then locks at the latest
``offline_grace`` seconds after the last release or renewal the agent received, whatever the
server's expiry says. It can never extend a lease.

Times are the agent's clock (Unix seconds); the server's are milliseconds on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent.inference.guard import Lease
from agent.vault import KeyReleaseRefused

__all__ = ["LeaseClock", "LeaseTerms"]


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """One model's lease: the server's latest expiry and when the agent last heard from it."""

    lease_id: str
    server_until: float  # seconds
    quota: int | None
    renewed_at: float     # agent time of the release or the last renewal

    def expires_at(self, offline_grace: float | None) -> float:
        """When the model must lock: the server's expiry, or earlier under the offline grace."""
        if offline_grace is None:
            return self.server_until
        return min(self.server_until, self.renewed_at + offline_grace)

    def lease(self, offline_grace: float | None) -> Lease:
        """The :class:`~agent.inference.guard.Lease` the guard enforces."""
        return Lease(lease_id=self.lease_id, expires_at=self.expires_at(offline_grace), quota=self.quota)


class LeaseClock:
    """The leases of all unlocked models. Not thread-safe (the vault serialises access)."""

    def __init__(self, offline_grace: float | None = None) -> None:
        if offline_grace is not None and offline_grace <= 0:
            raise ValueError("offline_grace must be positive")
        self.offline_grace = offline_grace
        self._terms: dict[str, LeaseTerms] = {}

    def grant(self, model: str, *, lease_id: str, expires_ms: int, quota: int | None, now: float) -> Lease:
        """The lease of a new key release; :class:`KeyReleaseRefused` if it has already expired.

        Not recorded yet: call :meth:`commit` once the model is actually unlocked under it."""
        terms = LeaseTerms(lease_id=lease_id, server_until=expires_ms / 1000, quota=quota, renewed_at=now)
        if terms.expires_at(self.offline_grace) <= now:
            raise KeyReleaseRefused(f"the lease {lease_id} of the key release for {model} has already "
                                    f"expired (at {expires_ms} ms)")
        return terms.lease(self.offline_grace)

    def commit(self, model: str, lease: Lease, *, now: float, server_until: float | None = None) -> None:
        """Record the lease ``model`` now serves under."""
        until = lease.expires_at if server_until is None else server_until
        self._terms[model] = LeaseTerms(lease_id=lease.lease_id, server_until=until, quota=lease.quota,
                                        renewed_at=now)

    def renew(self, model: str, *, lease_until_ms: int, now: float) -> Lease | None:
        """Renew ``model``'s lease after a trusted verdict; the new lease, or ``None`` if there is no
        lease or it has already expired (an expired lease is never revived: the model must be keyed
        again)."""
        terms = self._terms.get(model)
        if terms is None or terms.expires_at(self.offline_grace) <= now:
            return None
        renewed = replace(terms, server_until=max(terms.server_until, lease_until_ms / 1000), renewed_at=now)
        self._terms[model] = renewed
        return renewed.lease(self.offline_grace)

    def expired(self, now: float) -> list[str]:
        """Models whose lease has passed at ``now``."""
        return sorted(m for m, t in self._terms.items() if t.expires_at(self.offline_grace) <= now)

    def drop(self, model: str) -> None:
        """Forget ``model``'s lease (it was locked)."""
        self._terms.pop(model, None)

    def get(self, model: str) -> LeaseTerms | None:
        return self._terms.get(model)

    def next_deadline(self) -> float | None:
        """The earliest expiry among the leases, or ``None``."""
        times = [t.expires_at(self.offline_grace) for t in self._terms.values()]
        return min(times) if times else None
