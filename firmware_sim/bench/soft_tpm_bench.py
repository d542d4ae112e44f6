"""Micro benchmark: what one attestation costs a simulated device on the soft TPM.

Manufactures a :class:`~firmware_sim.soft_tpm.SoftTpm` (ECC P-256 EK and AK; a throw-away
:class:`ManufacturerCA` in a temporary directory) and times ``quote()`` of a 10-PCR sha256 selection
with the PCR values, i.e. the soft counterpart of :mod:`firmware_sim.bench.tpm_bench` (swtpm): one
TPMS_ATTEST marshalled and one ECDSA-P256 signature.  Wall-clock times of a CPU-bound loop, so they
are also the CPU cost on an idle machine.

``run()`` returns milliseconds: ``soft_quote_ms_p50`` (the headline), ``soft_quote_ms_p95`` and
``soft_manufacture_ms_p50`` (EK, EK certificate and AK of one new device).
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.soft_tpm import EkIssuer, SoftTpm

SELECTION = {"sha256": list(range(10))}


def _times_ms(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run(n: int = 2000, warmup: int = 50, devices: int = 20) -> dict[str, float]:
    """Quote latency percentiles (ms) over ``n`` quotes, and the cost of manufacturing ``devices``."""
    with tempfile.TemporaryDirectory(prefix="soft-tpm-bench-") as tmp:
        issuer = EkIssuer.from_ca(ManufacturerCA.load_or_create(Path(tmp) / "ca"))
    now = dt.datetime.now(dt.UTC)
    made = _times_ms(lambda: SoftTpm.manufacture(issuer, now=now), devices)
    tpm = SoftTpm.manufacture(issuer, now=now)
    counter = iter(range(1 << 62))

    def quote() -> object:
        return tpm.quote(next(counter).to_bytes(32, "big"), SELECTION)

    _times_ms(quote, warmup)
    times = _times_ms(quote, n)
    return {
        "soft_quote_ms_p50": round(statistics.median(times), 4),
        "soft_quote_ms_p95": round(_percentile(times, 95), 4),
        "soft_manufacture_ms_p50": round(statistics.median(made), 3),
    }
