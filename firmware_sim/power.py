"""Reboots of simulated devices: the :class:`agent.update.bootctl.Rebooter` the agent calls, and the
harness side that power-cycles the device.

On hardware ``reboot(reason)`` never returns: the machine goes down under the agent.  In the
simulator the agent that asks for the reboot is one of the things the power cycle stops, so the cycle
must not run in the agent's call stack (stopping an agent joins its threads, one of which would be the
caller).  :meth:`RequestedReboot.reboot` therefore only hands the request to a sink and returns; a
:class:`PowerCycler` on the harness side runs the cycles on its own thread, one at a time, in the
order requested.  A cycle (the ``cycle`` callback; for the fleet harness
:meth:`firmware_sim.fleet.FleetHarness.power_cycle`) stops the device's agent, power-cycles its
swtpm (the process restarts on its kept state with TPM2_Startup(CLEAR): PCRs reset), runs the measured
boot of the slot the bootloader chooses (a new event log) and starts the agent again.

For agents in an agent host process (:mod:`firmware_sim.fleet_agents`) the sink sends the request
over the host's event pipe to the harness, whose :class:`~firmware_sim.fleet_agents.AgentHost` hands
it to the harness's cycler.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import EdgeError

#: ``(device_id, reason)``: where a reboot request goes.
RebootSink = Callable[[str, str], None]
MAX_REASON = 512


class RequestedReboot:
    """A device's :class:`~agent.update.bootctl.Rebooter`: hands ``(device_id, reason)`` to ``sink``
    and returns at once (safe to call from the agent's own threads)."""

    def __init__(self, device_id: str, sink: RebootSink) -> None:
        self.device_id = device_id
        self._sink = sink

    def reboot(self, reason: str) -> None:
        self._sink(self.device_id, str(reason)[:MAX_REASON])


@dataclass(frozen=True, slots=True)
class CycleRecord:
    """One power cycle the cycler ran: for whom, why, and the error if it failed."""

    device_id: str
    reason: str
    error: str | None = None


class PowerCycler:
    """Runs requested power cycles on one background thread (see the module docstring).

    ``cycle(device_id, reason)`` does the work; an :class:`~protocol.errors.EdgeError` it raises is
    logged and recorded, never propagated.  A request for a device whose cycle is still pending is
    merged into it (a device reboots once, however often it asked).
    """

    def __init__(self, cycle: RebootSink, *, logger: logging.Logger | None = None) -> None:
        self._cycle = cycle
        self._log = logger or logging.getLogger("firmware_sim.power")
        self._cond = threading.Condition()
        self._pending: deque[tuple[str, str]] = deque()
        self._busy = False
        self._closed = False
        self.history: list[CycleRecord] = []
        self._thread = threading.Thread(target=self._run, name="power-cycler", daemon=True)
        self._thread.start()

    def rebooter(self, device_id: str) -> RequestedReboot:
        """The Rebooter to give the agent of ``device_id``."""
        return RequestedReboot(device_id, self.request)

    def request(self, device_id: str, reason: str) -> None:
        """Queue a power cycle of ``device_id`` (returns at once; ignored after :meth:`close`)."""
        with self._cond:
            if self._closed or any(d == device_id for d, _ in self._pending):
                return
            self._pending.append((device_id, reason))
            self._cond.notify_all()

    def cycles(self, device_id: str) -> list[CycleRecord]:
        with self._cond:
            return [r for r in self.history if r.device_id == device_id]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no cycle is pending or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def wait_for(self, device_id: str, count: int, timeout: float) -> bool:
        """Wait until ``device_id`` has been cycled ``count`` times in all; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: sum(r.device_id == device_id for r in self.history) >= count, timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Drop pending requests, let a running cycle finish, end the thread."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                device_id, reason = self._pending.popleft()
                self._busy = True
            error: str | None = None
            try:
                self._cycle(device_id, reason)
            except (EdgeError, OSError) as exc:
                error = exc.diagnostics() if isinstance(exc, EdgeError) else f"{exc.strerror or exc}"
                self._log.warning("power cycle of %s failed: %s", device_id, error)
            finally:
                with self._cond:
                    self.history.append(CycleRecord(device_id, reason, error))
                    self._busy = False
                    self._cond.notify_all()


__all__ = ["CycleRecord", "PowerCycler", "RebootSink", "RequestedReboot"]
