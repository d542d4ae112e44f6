"""Which reference policy applies to a device, with parsed policies cached by content digest.

The active policy headers are re-read at most every :data:`MAX_AGE_S` seconds on the hot path
(a new or replaced policy takes effect within that time); the scheduler re-reads them every round.

The active policy of a device is the active ``policy`` row of its class and firmware version
(``fleet-server policy from-eventlog`` deactivates the previous one of the same pair), else the
active policy of class :data:`ANY_CLASS` ("any") and its firmware version: a policy made for a
firmware regardless of the device class. The small
table of active policy *headers* is read once per batch (:meth:`PolicyResolver.refresh`); the parsed
:class:`~fleet_server.appraisal.policy.ReferencePolicy` is cached under the SHA-256 of its stored
JSON, so a cached policy can never be stale: a changed policy has another digest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from fleet_server.appraisal.policy import ReferencePolicy
from fleet_server.service.common import log_event
from fleet_server.storage.repo import PolicyHeader, Repository
from protocol.errors import EdgeError

log = logging.getLogger(__name__)

MAX_AGE_S = 1.0
"""How old the active policy headers used to appraise evidence may be."""

ANY_CLASS = "any"
"""Reserved device class of a policy that applies to every class with its firmware version."""


class PolicyResolver:
    """Active policy headers (refreshed per batch) and a cache of parsed policies."""

    def __init__(self, repo: Repository, default_selection: Mapping[str, tuple[int, ...]]) -> None:
        self._repo = repo
        self._default_selection = dict(default_selection)
        self._by_pair: dict[tuple[str, str], PolicyHeader] = {}
        self._parsed: dict[str, ReferencePolicy | None] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Re-read the active policy headers (one small query)."""
        self.update(self._repo.active_policies())

    def refresh_if_older(self, max_age_s: float, read: Callable[[], Sequence[PolicyHeader]]) -> None:
        """Re-read the headers with ``read`` unless they were read less than ``max_age_s`` ago."""
        if time.monotonic() - self._read_at >= max_age_s:
            self.update(read())

    def update(self, headers: Sequence[PolicyHeader]) -> None:
        """Use ``headers`` (every active policy, as just read) from now on."""
        by_pair = {(h.device_class, h.firmware_version): h for h in headers}
        live = {h.reference_sha256 for h in headers}
        with self._lock:
            self._read_at = time.monotonic()
            self._by_pair = by_pair
            for digest in [k for k in self._parsed if k not in live]:
                del self._parsed[digest]

    def header(self, device_class: str, firmware_version: str) -> PolicyHeader | None:
        """The active policy for the pair: the exact class first, else the class-independent one."""
        with self._lock:
            found = self._by_pair.get((device_class, firmware_version))
            return found if found is not None else self._by_pair.get((ANY_CLASS, firmware_version))

    def selection(self, device_class: str, firmware_version: str) -> Mapping[str, tuple[int, ...]]:
        """The PCRs to quote: the active policy's selection, else the configured default."""
        header = self.header(device_class, firmware_version)
        if header is not None and header.selection:
            return header.selection
        return self._default_selection

    def policy(self, header: PolicyHeader | None) -> ReferencePolicy | None:
        """The parsed policy of ``header`` (``None`` if there is none, or it is unusable: logged)."""
        if header is None:
            return None
        with self._lock:
            if header.reference_sha256 in self._parsed:
                return self._parsed[header.reference_sha256]
        record = self._repo.policy(policy_id=header.id)
        parsed: ReferencePolicy | None = None
        if record is not None:
            try:
                parsed = ReferencePolicy.from_json(json.loads(record.reference))
            except (EdgeError, ValueError) as exc:
                detail = exc.diagnostics() if isinstance(exc, EdgeError) else str(exc)
                log_event(log, logging.ERROR, "policy_unusable", policy=header.name, error=detail)
        with self._lock:
            self._parsed[header.reference_sha256] = parsed
        return parsed
