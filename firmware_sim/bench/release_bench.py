"""Benchmark: building a firmware release's reference values (``firmware-sim release build``).

A vendor's build computes the reference values of a release from its images alone: read the bundle
folder's six images and ``release.json``, run the boot chain in software
(:func:`firmware_sim.boot.build_boot_log`), parse the log and turn it into the per-PCR, per-event
reference policy (:func:`firmware_sim.release.reference_values`).  No TPM is involved.

``run()`` returns ``{"release_reference_values_ms": N}``: the median over several rounds of that
work for the golden profile's images at a new firmware version.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from firmware_sim.release import build_release, from_folder, from_profile, reference_values

ROUNDS = 30
VERSION = "1.3.0"


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="release-bench-") as tmp:
        folder = Path(tmp) / "bundle"
        build_release(folder, from_profile("golden", VERSION))
        reference_values(from_folder(folder, VERSION))  # warm-up: imports, caches of the test keys
        times = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            reference_values(from_folder(folder, VERSION))
            times.append((time.perf_counter() - start) * 1000)
    return {"release_reference_values_ms": statistics.median(times)}


if __name__ == "__main__":
    print(run())
