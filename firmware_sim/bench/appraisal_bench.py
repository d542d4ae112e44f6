"""Benchmark: full appraisal of an ECC quote with a 100-event log, as the fleet server runs it.

The evidence is made in software, no TPM needed: the simulator's golden boot log
(:func:`firmware_sim.boot.build_boot_log`, written by :mod:`firmware_sim.eventlog_writer`) padded with
GRUB-style EV_IPL events to 100 records (Spec ID header included), a P-256 "AK" and a TPMS_ATTEST
built and signed with the helpers of :mod:`firmware_sim.bench.quote_bench`, and a reference policy made
with :func:`~fleet_server.appraisal.policy.policy_from_eventlog` from the same log.

Two rates (appraisals per second):

* ``quote_verify_per_s`` - the steady state: the device answers a periodic challenge within the boot
  the server already holds, so the evidence continues the held log with no new bytes; the server
  attaches the cached parse to the persisted :class:`~fleet_server.appraisal.appraise.BootState`
  (:class:`~fleet_server.appraisal.appraise.BootStateCache` hit) and runs
  :func:`~fleet_server.appraisal.appraise.appraise`: quote signature and checks, clock, replay check,
  reference values;
* ``quote_verify_cold_per_s`` - the first attestation of a boot: the whole 100-event log is parsed
  (with digest checks) and replayed before the same checks.

:func:`measure` adds the bare ECDSA P-256 verify and :func:`verify_quote` alone, and the microseconds
per operation, for the report printed by ``python -m firmware_sim.bench.appraisal_bench``.  Calls are
interleaved and the median is taken, so the ratios hold on a busy machine.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_sim.bench.quote_bench import build_quote, sign_ecdsa, software_ak
from firmware_sim.boot import BootMedia, build_boot_log
from firmware_sim.profiles import get_profile
from fleet_server.appraisal.appraise import BootState, BootStateCache, ChallengeRecord, appraise
from fleet_server.appraisal.policy import policy_from_eventlog
from fleet_server.verifier.eventlog import parse_eventlog, replay
from fleet_server.verifier.quote import AttestationKey, verify_quote
from protocol.messages import Evidence
from protocol.tpm.constants import EventType
from protocol.tpm.structures import ClockInfo

DEVICE_ID = "bench-device"
CHALLENGE_ID = "0123456789abcdef0123456789abcdef"


def hundred_event_log(n_records: int = 100) -> bytes:
    """The golden boot log of the simulator, padded to ``n_records`` records with GRUB EV_IPL events
    (commands into PCR 8, module files into PCR 9), as a 100-event UEFI + GRUB log would have."""
    profile = get_profile("golden")
    writer = build_boot_log(BootMedia.from_specs(profile.image_specs()), profile.boot_settings)
    base = len(writer.events) + 1  # + the Spec ID header record
    if n_records < base:
        raise ValueError(f"n_records must be at least {base}")
    for i in range(n_records - base):
        if i % 3 == 2:
            module = f"(hd0,gpt1)/boot/grub/arm64-efi/module{i}.mod\0".encode()
            writer.extend(9, EventType.EV_IPL, module, measured=b"module contents %d" % i)
        else:
            command = f"set option_{i}=value_{i}"
            writer.extend(8, EventType.EV_IPL, f"grub_cmd: {command}\0".encode(), measured=command.encode())
    return writer.to_bytes()


def _rates(fns: Mapping[str, Callable[[], object]], n: int, warmup: int = 50) -> dict[str, float]:
    """Operations per second of each function, from the median of ``n`` timed calls.

    Calls alternate between the functions one by one, so a busy machine (parallel test runs, other
    benchmarks) slows them alike, and the median ignores the calls an interrupt hit.
    """
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {name: [] for name in fns}
    items = list(fns.items())
    for i in range(warmup + n):
        for name, fn in items:
            start = clock()
            fn()
            elapsed = clock() - start
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: 1e9 / statistics.median(times) for name, times in samples.items()}


def measure(n: int = 2000) -> dict[str, float]:
    """Rates (per second) and costs (µs) of: bare ECDSA verify, verify_quote alone, steady-state and
    cold appraisal.  Every path is checked to give the expected result before it is timed."""
    log = hundred_event_log()
    parsed = parse_eventlog(log)
    assert len(parsed.events) == 100
    policy = policy_from_eventlog(parsed, name="bench-golden", device_class="edge-camera",
                                  firmware_version="1.2.0")
    values = replay(parsed)
    replayed = {bank: {p: values[bank][p] for p in pcrs} for bank, pcrs in policy.selection.items()}
    key, ak_public = software_ak()
    ak = AttestationKey.from_tpm2b_public(ak_public)
    nonce = hashlib.sha256(b"bench nonce").digest()
    clock = ClockInfo(clock=5_000_000, reset_count=7, restart_count=0, safe=True)
    attest = build_quote(nonce=nonce, pcr_values=replayed, clock=clock)
    signature = sign_ecdsa(key, attest)
    challenge = ChallengeRecord(CHALLENGE_ID, nonce, policy.selection, issued_at=0, deadline=1)
    full = Evidence(CHALLENGE_ID, attest, signature, replayed, 0, log)
    cont = Evidence(CHALLENGE_ID, attest, signature, replayed, len(log), b"")

    first = appraise(ak=ak, challenge=challenge, evidence=full, previous=None, policy=policy)
    assert first.trusted and first.boot is not None, first.reasons
    cache = BootStateCache()
    cache.store(DEVICE_ID, first.boot)
    stored = (first.boot.reset_count, first.boot.restart_count, first.boot.clock, first.boot.log,
              first.boot.log_sha256)

    def steady() -> object:
        previous = cache.attach(DEVICE_ID, BootState(*stored))  # what the service loads, plus the cache
        return appraise(ak=ak, challenge=challenge, evidence=cont, previous=previous, policy=policy)

    def cold() -> object:
        return appraise(ak=ak, challenge=challenge, evidence=full, previous=None, policy=policy)

    result = steady()
    assert getattr(result, "trusted", False), getattr(result, "reasons", None)
    assert cache.hits >= 1

    public = key.public_key()
    der = key.sign(attest, ec.ECDSA(hashes.SHA256()))
    ecdsa = ec.ECDSA(hashes.SHA256())

    def bare() -> None:
        public.verify(der, attest, ecdsa)

    def quote_only() -> object:
        return verify_quote(ak=ak, attest=attest, signature=signature, nonce=nonce, pcr_values=replayed,
                            expected_selection=policy.selection)

    rates = _rates({"ecdsa_p256_verify_per_s": bare, "verify_quote_only_per_s": quote_only,
                    "quote_verify_per_s": steady, "quote_verify_cold_per_s": cold}, n)
    out = dict(rates)
    for name, rate in rates.items():
        out[name.replace("_per_s", "_us")] = 1e6 / rate
    return out


def run(n: int = 2000) -> dict[str, float]:
    """``{"quote_verify_per_s": steady state, "quote_verify_cold_per_s": first attestation of a boot}``."""
    result = measure(n)
    return {"quote_verify_per_s": result["quote_verify_per_s"],
            "quote_verify_cold_per_s": result["quote_verify_cold_per_s"]}


if __name__ == "__main__":
    results = measure()
    for label in ("ecdsa_p256_verify", "verify_quote_only", "quote_verify", "quote_verify_cold"):
        print(f"{label}: {results[label + '_per_s']:,.0f}/s ({results[label + '_us']:.1f} µs)")
