"""Inference load of the fleet harness: N queries per device through each agent's local inference API.

``firmware-sim fleet --model FILE.onnx --queries N`` publishes the model, entitles the devices'
class, and then, during the measured window, sends every device ``N`` prediction requests spread
evenly over the window (one round of requests to all devices every ``interval`` seconds), each as
an application on the device would: HTTP on loopback to the agent's inference API with the
device's own client token (:mod:`agent.inference.http`).  A request is *served* when the agent
answers 200 and *refused* otherwise; refusals are counted per error code (``locked`` on a device
without a released key, ``rate_limited``, ``quota_exceeded``, ... or ``unreachable`` when the API
did not answer at all).

Inputs are random tensors built from the model's declared io signature (dynamic dimensions are 1),
so any model the server accepts can be driven; requests never leave this machine.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.modelpkg import IoSignature

#: Seconds an inference request may take before it counts as refused (``unreachable``).
REQUEST_TIMEOUT = 10.0
#: Requests in flight at once (across devices).
MAX_IN_FLIGHT = 32


@dataclass(slots=True)
class ModelUsage:
    """One device's requests so far: served (200) and refused (anything else), refusals by code."""

    served: int = 0
    refused: int = 0
    refusals: dict[str, int] = field(default_factory=dict)

    def refuse(self, code: str) -> None:
        self.refused += 1
        self.refusals[code] = self.refusals.get(code, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"served": self.served, "refused": self.refused,
                "refusals": dict(sorted(self.refusals.items()))}


def request_body(signature: IoSignature, rng: np.random.Generator) -> bytes:
    """A JSON prediction request with random inputs matching ``signature`` (dynamic dimensions = 1)."""
    inputs: dict[str, Any] = {}
    for spec in signature.inputs:
        shape = tuple(1 if d is None else d for d in spec.shape)
        if spec.dtype.startswith("float"):
            value: Any = np.round(rng.standard_normal(shape), 4).tolist()
        elif spec.dtype == "bool":
            value = rng.integers(0, 2, shape).astype(bool).tolist()
        else:  # integer types: small non-negative values fit every one of them
            value = rng.integers(0, 10, shape).tolist()
        inputs[spec.name] = value
    return json.dumps({"inputs": inputs}).encode()


def _send(address: str, model: str, token: str, body: bytes) -> tuple[int, str]:
    """One prediction request: (HTTP status, error code or "")."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", f"/v1/models/{model}:predict", body,
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    if response.status == 200:
        return 200, ""
    try:
        code = str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{response.status}"
    return response.status, code


class QueryLoad:
    """Sends ``queries`` rounds of one request per device, a round every ``interval`` seconds, from a
    background thread (:meth:`start`, :meth:`stop`, :meth:`usage`).

    ``addresses`` returns the current inference address (``host:port``) of every device's agent
    (it changes when a device is power-cycled); it is called at the start and again, at most once
    a second, after a request found no listener.
    """

    def __init__(self, *, model: str, signature: IoSignature, tokens: Mapping[str, str],
                 addresses: Callable[[], Mapping[str, str | None]], queries: int, interval: float,
                 seed: int = 0) -> None:
        self.model = model
        self.signature = signature
        self.tokens = dict(tokens)
        self._addresses_of = addresses
        self.queries = queries
        self.interval = interval
        self._rng = np.random.default_rng(seed)
        self._usage = {device_id: ModelUsage() for device_id in self.tokens}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._addresses: dict[str, str | None] = {}
        self._refreshed = 0.0
        self.rounds_done = 0

    def start(self) -> None:
        self._refresh(force=True)
        self._thread = threading.Thread(target=self._run, name="fleet-queries", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = REQUEST_TIMEOUT + 5) -> None:
        """Stop sending (requests in flight finish) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every round was sent and answered; True if it was."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def usage(self) -> dict[str, ModelUsage]:
        with self._lock:
            return {d: ModelUsage(u.served, u.refused, dict(u.refusals)) for d, u in self._usage.items()}

    # -- internals ---------------------------------------------------------------------------------
    def _refresh(self, *, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._refreshed < 1.0:
                return
            self._refreshed = time.monotonic()
        fresh = dict(self._addresses_of())
        with self._lock:
            self._addresses = fresh

    def _one(self, device_id: str, body: bytes) -> None:
        with self._lock:
            address = self._addresses.get(device_id)
        outcome: tuple[int, str] | None = None
        for attempt in range(2):
            if address is None:
                break
            try:
                outcome = _send(address, self.model, self.tokens[device_id], body)
                break
            except (OSError, http.client.HTTPException, ValueError):
                if attempt == 0:  # the agent may have restarted on another port
                    self._refresh()
                    with self._lock:
                        address = self._addresses.get(device_id)
        with self._lock:
            usage = self._usage[device_id]
            if outcome is None:
                usage.refuse("unreachable")
            elif outcome[0] == 200:
                usage.served += 1
            else:
                usage.refuse(outcome[1])

    def _run(self) -> None:
        t0 = time.monotonic()
        devices = list(self.tokens)
        with ThreadPoolExecutor(max_workers=min(MAX_IN_FLIGHT, max(1, len(devices))),
                                thread_name_prefix="fleet-query") as pool:
            for round_ in range(self.queries):
                delay = t0 + round_ * self.interval - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                if self._stop.is_set():
                    return
                futures = [pool.submit(self._one, d, request_body(self.signature, self._rng))
                           for d in devices]
                wait(futures)
                self.rounds_done = round_ + 1


__all__ = ["ModelUsage", "QueryLoad", "request_body"]
