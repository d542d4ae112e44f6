"""Benchmark: device-side quote latency through the agent's TPM adapter on swtpm.

The bench manufactures its own swtpm (a throw-away :class:`ManufacturerCA` and TPM state in a temporary
directory, removed afterwards), opens a :class:`~agent.tpm.adapter.TpmAdapter` with an ECC P-256 AK, and
times ``quote()`` of a 10-PCR sha256 selection: the TPM2_Quote plus the TPM2_PCR_Read calls that
return the quoted values (checked against the quote's pcrDigest), i.e. what one attestation costs the
device.  A hardware TPM is 25-190 ms per signature, so these numbers only compare software paths.

``run()`` returns milliseconds: ``swtpm_quote_ms_p50`` (the headline), ``swtpm_quote_ms_p95``,
``swtpm_quote_only_ms_p50`` (TPM2_Quote without reading PCRs) and ``swtpm_read_pcrs_ms_p50``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.tpm.adapter import TpmAdapter
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.swtpm import Swtpm

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


def run(n: int = 200, warmup: int = 10) -> dict[str, float]:
    """Quote latency percentiles (ms) over ``n`` quotes on a freshly manufactured swtpm."""
    with tempfile.TemporaryDirectory(prefix="tpm-bench-") as tmp:
        base = Path(tmp)
        ca = ManufacturerCA.load_or_create(base / "ca")
        tpm = Swtpm(base / "tpm")
        tpm.manufacture(ca)
        with tpm, TpmAdapter(tpm.tcti, base / "agent", ak_alg="ecc") as adapter:
            counter = iter(range(1 << 62))

            def quote() -> object:
                return adapter.quote(next(counter).to_bytes(32, "big"), SELECTION)

            def quote_only() -> object:
                return adapter.quote(next(counter).to_bytes(32, "big"), SELECTION, with_pcrs=False)

            def read() -> object:
                return adapter.read_pcrs(SELECTION)

            _times_ms(quote, warmup)
            full = _times_ms(quote, n)
            bare = _times_ms(quote_only, n)
            reads = _times_ms(read, n)
    return {
        "swtpm_quote_ms_p50": statistics.median(full),
        "swtpm_quote_ms_p95": _percentile(full, 95),
        "swtpm_quote_only_ms_p50": statistics.median(bare),
        "swtpm_read_pcrs_ms_p50": statistics.median(reads),
    }


if __name__ == "__main__":
    for name, value in run().items():
        print(f"{name}: {value:.3f}")
