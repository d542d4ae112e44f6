"""appraise(): table-driven with software quotes, then with real swtpm devices.

Software evidence: the simulator's boot logs (firmware_sim.boot.build_boot_log) quoted by a software
P-256 AK (firmware_sim.bench.quote_bench), so every branch can be reached, including quotes a TPM
would never sign.  Device evidence: firmware_sim.device.SimulatedDevice booted into swtpm, quoted by the
agent's TpmAdapter; the reference policy comes from a *different* golden device's log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.tpm.adapter import TpmAdapter
from firmware_sim import eventlog_writer as ew
from firmware_sim.bench.quote_bench import build_quote, sign_ecdsa, software_ak
from firmware_sim.boot import BootMedia, build_boot_log, extend_events
from firmware_sim.device import SimulatedDevice
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.profiles import PROFILES, get_profile
from fleet_server.appraisal.appraise import (
    MAX_HELD_LOG,
    Appraisal,
    BootState,
    BootStateCache,
    ChallengeRecord,
    appraise,
)
from fleet_server.appraisal.policy import SIMULATOR_PCRS, ReferencePolicy, policy_from_eventlog
from fleet_server.verifier.eventlog import parse_eventlog, replay
from fleet_server.verifier.quote import AttestationKey
from protocol.messages import Evidence
from protocol.tpm.constants import EventType
from protocol.tpm.structures import ClockInfo

CLASS, FIRMWARE = "edge-camera", "1.2.0"
SELECTION: dict[str, tuple[int, ...]] = {"sha256": SIMULATOR_PCRS}
EXTRA_PCR = 15  # not in the policy: the continuation tests measure into it


# ---------------------------------------------------------------------------------------------
# software evidence
# ---------------------------------------------------------------------------------------------
def boot_writer(profile: str = "golden") -> ew.EventLogWriter:
    p = get_profile(profile)
    return build_boot_log(BootMedia.from_specs(p.image_specs()), p.boot_settings)


def boot_log(profile: str = "golden") -> bytes:
    return boot_writer(profile).to_bytes()


def golden_policy() -> ReferencePolicy:
    return policy_from_eventlog(
        parse_eventlog(boot_log()), name="edge-camera-1.2.0", device_class=CLASS, firmware_version=FIRMWARE
    )


def pcr_values(log: bytes, selection: Mapping[str, Sequence[int]] = SELECTION) -> dict[str, dict[int, bytes]]:
    """What a TPM that extended ``log`` holds: replay, with never-extended PCRs at zero."""
    values = replay(parse_eventlog(log))
    return {
        bank: {p: values[bank].get(p, bytes(32 if bank == "sha256" else 20)) for p in pcrs}
        for bank, pcrs in selection.items()
    }


def extra_event(
    data: bytes, measured: bytes | None = None, pcr: int = EXTRA_PCR
) -> tuple[bytes, ew.LogEvent]:
    """A TCG_PCR_EVENT2 record (sha1 + sha256, like the simulator's logs) and its LogEvent."""
    event = ew.EventLogWriter().extend(pcr, EventType.EV_IPL, data, measured=measured)
    return event.encode(), event


class Device:
    """A software 'TPM': a P-256 AK and a TPMS_CLOCK_INFO that the tests move."""

    def __init__(self) -> None:
        self.key, public = software_ak()
        self.ak = AttestationKey.from_tpm2b_public(public)
        self.clock = ClockInfo(clock=10_000, reset_count=5, restart_count=0, safe=True)

    def tick(self, ms: int = 1000) -> None:
        self.clock = dataclasses.replace(self.clock, clock=self.clock.clock + ms)

    def reboot(self) -> None:
        self.clock = ClockInfo(
            clock=self.clock.clock - 500, reset_count=self.clock.reset_count + 1, restart_count=0, safe=False
        )

    def evidence(
        self,
        challenge: ChallengeRecord,
        pcrs: Mapping[str, Mapping[int, bytes]],
        log: bytes,
        offset: int = 0,
        *,
        nonce: bytes | None = None,
    ) -> Evidence:
        attest = build_quote(
            nonce=challenge.nonce if nonce is None else nonce, pcr_values=pcrs, clock=self.clock
        )
        return Evidence(
            challenge.challenge_id,
            attest,
            sign_ecdsa(self.key, attest),
            {b: dict(v) for b, v in pcrs.items()},
            offset,
            log[offset:],
        )


def challenge(selection: Mapping[str, Sequence[int]] = SELECTION) -> ChallengeRecord:
    return ChallengeRecord(
        secrets.token_hex(16),
        secrets.token_bytes(32),
        {b: tuple(p) for b, p in selection.items()},
        issued_at=0,
        deadline=60_000,
    )


@pytest.fixture(scope="module")
def policy() -> ReferencePolicy:
    return golden_policy()


def run(
    dev: Device,
    policy: ReferencePolicy | None,
    log: bytes,
    *,
    previous: BootState | None = None,
    offset: int = 0,
    pcrs: Mapping[str, Mapping[int, bytes]] | None = None,
    selection: Mapping[str, Sequence[int]] = SELECTION,
    **kwargs: Any,
) -> Appraisal:
    ch = challenge(selection)
    ev = dev.evidence(ch, pcrs if pcrs is not None else pcr_values(log, selection), log, offset)
    return appraise(ak=dev.ak, challenge=ch, evidence=ev, previous=previous, policy=policy, **kwargs)


# ---------------------------------------------------------------------------------------------
# the quote
# ---------------------------------------------------------------------------------------------
def test_golden_is_trusted(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    result = run(dev, policy, log, device_class=CLASS, firmware_version=FIRMWARE)
    assert (result.verdict, result.reasons, result.failing) == ("trusted", (), ())
    assert result.trusted
    assert result.quote is not None and result.quote.reset_count == 5 and result.quote.clock == 10_000
    assert result.pcrs == pcr_values(log)
    boot = result.boot
    assert boot is not None and boot.prepared
    assert (boot.reset_count, boot.restart_count, boot.clock) == (5, 0, 10_000)
    assert boot.log == log and boot.log_sha256 == hashlib.sha256(log).digest()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def _resigned(dev: Device, ev: Evidence, nonce: bytes) -> Evidence:
    """The same quote with another nonce, properly signed by the AK (a replayed or misdirected quote)."""
    attest = build_quote(nonce=nonce, pcr_values=ev.pcrs, clock=dev.clock)
    return dataclasses.replace(ev, attest=attest, signature=sign_ecdsa(dev.key, attest))


QUOTE_FAILURES: list[tuple[str, Callable[[Evidence, Device], Evidence], str]] = [
    (
        "wrong-nonce",
        lambda ev, dev: _resigned(dev, ev, secrets.token_bytes(32)),
        "quote: quote nonce (extraData) does not match the challenge nonce",
    ),
    (
        "attest-flipped",
        lambda ev, dev: dataclasses.replace(ev, attest=_flip(ev.attest, 40)),
        "quote: quote signature does not verify",
    ),
    (
        "signature-flipped",
        lambda ev, dev: dataclasses.replace(ev, signature=_flip(ev.signature, 10)),
        "quote: quote signature does not verify",
    ),
    (
        "signature-garbage",
        lambda ev, dev: dataclasses.replace(ev, signature=b"\x00\x14"),
        "quote: TPMT_SIGNATURE",
    ),
    (
        "other-ak",
        lambda ev, dev: dataclasses.replace(ev, signature=sign_ecdsa(software_ak()[0], ev.attest)),
        "quote: quote signature does not verify with the attestation key",
    ),
    (
        "pcr-value-lie",
        lambda ev, dev: dataclasses.replace(ev, pcrs={"sha256": {**ev.pcrs["sha256"], 4: bytes(32)}}),
        "quote: PCR digest in the quote does not match the supplied PCR values",
    ),
    (
        "pcrs-missing",
        lambda ev, dev: dataclasses.replace(
            ev, pcrs={"sha256": {p: v for p, v in ev.pcrs["sha256"].items() if p != 14}}
        ),
        "quote: supplied PCR values",
    ),
    (
        "other-challenge",
        lambda ev, dev: dataclasses.replace(ev, challenge_id="f" * 32),
        "evidence answers challenge ffffffffffffffffffffffffffffffff, not",
    ),
]


@pytest.mark.parametrize(
    ("tamper", "message"), [(t, m) for _, t, m in QUOTE_FAILURES], ids=[q[0] for q in QUOTE_FAILURES]
)
def test_quote_failures(
    policy: ReferencePolicy, tamper: Callable[[Evidence, Device], Evidence], message: str
) -> None:
    dev = Device()
    log = boot_log()
    ch = challenge()
    ev = tamper(dev.evidence(ch, pcr_values(log), log), dev)
    result = appraise(ak=dev.ak, challenge=ch, evidence=ev, previous=None, policy=policy)
    assert result.verdict == "untrusted"
    assert len(result.reasons) == 1 and result.reasons[0].startswith(message), result.reasons
    assert (result.quote, result.boot, result.pcrs, result.failing) == (None, None, {}, ())


def test_selection_other_than_challenged(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    ch = challenge()
    ev = dev.evidence(ch, pcr_values(log, {"sha256": (0, 1, 2)}), log)
    result = appraise(ak=dev.ak, challenge=ch, evidence=ev, previous=None, policy=policy)
    assert result.reasons[0].startswith(
        "quote: quoted PCR selection (sha256:0,1,2) differs from the expected"
    )


def test_sha1_bank_only_when_allowed(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    both = {"sha1": SIMULATOR_PCRS, "sha256": SIMULATOR_PCRS}
    assert (
        run(dev, policy, log, selection=both).reasons[0].startswith("quote: quote covers the SHA-1 PCR bank")
    )
    result = run(dev, policy, log, selection=both, allow_sha1=True)
    assert result.trusted, result.reasons
    assert result.boot is not None and result.boot.replayer is not None
    assert set(result.boot.replayer.banks) == {"sha1", "sha256"}


# ---------------------------------------------------------------------------------------------
# reference values: each profile names the right PCR and event
# ---------------------------------------------------------------------------------------------
EXPECTED: dict[str, list[tuple[int, str, str]]] = {
    "golden": [],
    "golden-startup-locality": [],
    "tampered-bootloader": [(4, "EV_EFI_BOOT_SERVICES_APPLICATION", "\\EFI\\BOOT\\BOOTAA64.EFI")],
    "tampered-kernel": [
        (4, "EV_EFI_BOOT_SERVICES_APPLICATION", "\\vmlinuz"),
        (9, "EV_IPL", "(hd0,gpt1)/vmlinuz"),
    ],
    "tampered-initrd": [(9, "EV_IPL", "(hd0,gpt1)/initrd.img")],
    "tampered-cmdline": [
        (
            8,
            "EV_IPL",
            "grub_cmd: linux /vmlinuz root=/dev/mmcblk0p2 ro rootwait "
            "console=ttyS0,115200 quiet init=/bin/sh",
        )
    ],
    "tampered-rootfs": [(13, "EV_IPL", "rootfs: /dev/mmcblk0p2 rootfs.img")],
    "tampered-agent-config": [(14, "EV_IPL", "agent-class: /etc/edge-agent/agent-class.toml")],
    "rolled-back-firmware": [(0, "EV_S_CRTM_VERSION", "EdgeSim Firmware 1.0.0")],
    "updated-firmware": [(0, "EV_S_CRTM_VERSION", "EdgeSim Firmware 1.3.0")],
    "secureboot-disabled": [(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "SecureBoot (disabled)")],
}


def test_every_builtin_profile_is_covered() -> None:
    assert set(EXPECTED) == set(PROFILES)


def check_blame(
    result: Appraisal, log: bytes, policy: ReferencePolicy, expected: list[tuple[int, str, str]]
) -> None:
    """The reasons name exactly the expected PCRs and events, and each blamed event really is the
    device's first event of that PCR whose digest differs from the golden reference."""
    assert result.verdict == ("untrusted" if expected else "trusted"), result.reasons
    assert len(result.reasons) == len(expected) == len(result.failing), result.reasons
    events = parse_eventlog(log).events
    for reason, failing, (pcr, type_name, description) in zip(
        result.reasons, result.failing, expected, strict=True
    ):
        pattern = (
            rf'PCR {pcr}: {type_name} \(event (\d+), "{re.escape(description)}"\) differs from reference'
        )
        m = re.fullmatch(pattern, reason)
        assert m, reason
        index = int(m.group(1))
        assert (failing.pcr, failing.index, failing.type_name, failing.description, failing.kind) == (
            pcr,
            index,
            type_name,
            description,
            "changed",
        )
        device = [ev for ev in events if ev.pcr == pcr and ev.type != EventType.EV_NO_ACTION]
        refs = policy.events_by_pcr[pcr]
        first = next(
            i for i, (d, r) in enumerate(zip(device, refs, strict=True)) if d.digests["sha256"] != r.digest
        )
        assert device[first].index == index


@pytest.mark.parametrize("profile", sorted(EXPECTED))
def test_profiles_against_the_golden_policy(policy: ReferencePolicy, profile: str) -> None:
    log = boot_log(profile)
    check_blame(run(Device(), policy, log), log, policy, EXPECTED[profile])


def test_missing_and_unexpected_events(policy: ReferencePolicy) -> None:
    dev = Device()
    # Secure Boot off: the log has no EV_EFI_VARIABLE_AUTHORITY in PCR 7.  Against a policy of that
    # configuration, the golden device's authority event is *unexpected*...
    off = policy_from_eventlog(
        parse_eventlog(boot_log("secureboot-disabled")),
        name="sb-off",
        device_class=CLASS,
        firmware_version=FIRMWARE,
    )
    golden = boot_log()
    result = run(dev, off, golden)
    assert result.reasons[0] == (
        'PCR 7: EV_EFI_VARIABLE_DRIVER_CONFIG (event 3, "SecureBoot (enabled)") differs from reference'
    )
    # ...and with the same SecureBoot value but no authority event, the reference's is *missing*.
    writer = boot_writer()
    events = [e for e in writer.events if e.event_type != EventType.EV_EFI_VARIABLE_AUTHORITY]
    log = ew.header_record(writer.spec_id) + b"".join(e.encode() for e in events)
    result = run(dev, policy, log)
    assert result.reasons == ('PCR 7: EV_EFI_VARIABLE_AUTHORITY ("db") expected by the reference is missing',)
    assert result.failing[0].kind == "missing" and result.failing[0].index is None
    # An extra event at the end of PCR 14 is unexpected.
    record, _ = extra_event(b"agent-class: /etc/edge-agent/extra.toml\0", pcr=14)
    result = run(dev, policy, golden + record)
    assert result.reasons == (
        f"PCR 14: unexpected EV_IPL (event {len(parse_eventlog(golden).events)}, "
        '"agent-class: /etc/edge-agent/extra.toml") not in the reference',
    )
    assert result.failing[0].kind == "unexpected"


def test_no_policy_and_wrong_policy(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    result = run(dev, None, log, device_class=CLASS, firmware_version="9.9")
    assert result.reasons == ("no reference values for class edge-camera firmware 9.9",)
    assert result.boot is not None and result.boot.log == log  # the log itself was fine: keep it
    result = run(dev, policy, log, device_class="doorbell", firmware_version="1.3.0")
    assert result.reasons == (
        "policy edge-camera-1.2.0 is for class edge-camera, not doorbell",
        "policy edge-camera-1.2.0 is for firmware 1.2.0, not 1.3.0",
    )


def test_policy_pcr_not_quoted(policy: ReferencePolicy) -> None:
    result = run(Device(), policy, boot_log(), selection={"sha256": SIMULATOR_PCRS[:-1]})
    assert result.reasons == ("PCR 14 is in the policy edge-camera-1.2.0 but was not quoted",)


def test_value_only_policy_explains_without_events(policy: ReferencePolicy) -> None:
    values_only = dataclasses.replace(policy, events=())
    result = run(Device(), values_only, boot_log("tampered-rootfs"))
    assert result.reasons == (
        "PCR 13: value differs from reference (the policy has no reference events for it)",
    )


# ---------------------------------------------------------------------------------------------
# event log problems
# ---------------------------------------------------------------------------------------------
def test_log_that_does_not_match_the_quote(policy: ReferencePolicy) -> None:
    dev = Device()
    golden, tampered = boot_log(), boot_log("tampered-kernel")
    ch = challenge()
    ev = dev.evidence(ch, pcr_values(tampered), golden)  # the TPM booted the tampered kernel, the log lies
    result = appraise(ak=dev.ak, challenge=ch, evidence=ev, previous=None, policy=policy)
    assert result.reasons[0] == "event log replay differs from the quoted value of sha256 PCR 4, sha256 PCR 9"
    # The quoted PCRs still differ from the reference; without a trustworthy log nothing is blamed.
    assert result.reasons[1:] == tuple(
        f"PCR {p}: value differs from reference (no usable event log to explain it)" for p in (4, 9)
    )
    assert result.failing == ()
    assert result.boot is not None and result.boot.log == b""  # nothing held: whole log next time


@pytest.mark.parametrize(
    ("log", "message"),
    [
        (b"", "event log: event 0, offset 0: empty event log"),
        (b"\x00" * 10, "event log: event 0, offset 0: truncated event header"),
        (boot_log()[:-3], "event log: event 30, offset"),
        (boot_log()[: boot_log().index(b"Spec ID") + 200], "event log: "),
    ],
)
def test_malformed_logs(policy: ReferencePolicy, log: bytes, message: str) -> None:
    result = run(Device(), policy, log, pcrs=pcr_values(boot_log()))
    assert result.verdict == "untrusted"
    assert result.reasons[0].startswith(message), result.reasons
    assert result.boot is not None and result.boot.log == b""


def test_header_only_log_proves_nothing(policy: ReferencePolicy) -> None:
    writer = boot_writer()
    result = run(Device(), policy, ew.header_record(writer.spec_id), pcrs=pcr_values(boot_log()))
    assert result.reasons[0] == (
        "event log covers none of the quoted PCRs (sha256: 0,1,2,3,4,5,6,7,8,9,13,14)"
    )


NO_PCR = 0xFFFFFFFF  # the index real firmware gives vendor / EV_NO_ACTION-like records (issue 9)


def test_event_outside_pcrs_is_never_measured(policy: ReferencePolicy) -> None:
    # Before issue 9 such an event made the whole log malformed ("PCR index 4294967295 out of range").
    writer = boot_writer()
    header = ew.header_record(writer.spec_id)
    golden = boot_log()
    vendor = dataclasses.replace(writer.events[-1], pcr=NO_PCR).encode()
    result = run(Device(), policy, golden + vendor)
    assert (result.verdict, result.reasons) == ("trusted", ())
    # The reference's last PCR 14 event logged under index 0xFFFFFFFF instead cannot stand for it:
    # the TPM extended nothing for it, and the appraisal does not count it as measured.
    last14 = max(i for i, e in enumerate(writer.events) if e.pcr == 14)
    moved = [dataclasses.replace(e, pcr=NO_PCR) if i == last14 else e for i, e in enumerate(writer.events)]
    log = header + b"".join(e.encode() for e in moved)
    result = run(Device(), policy, log)
    assert result.verdict == "untrusted"
    assert result.reasons == (
        "PCR 14: value differs from reference; the event log has no events for this PCR",
    )
    # Among other events of its PCR, it is not compared with the reference's events either.
    moved = [dataclasses.replace(e, pcr=NO_PCR) if e.event_type == EventType.EV_EFI_VARIABLE_AUTHORITY else e
             for e in writer.events]
    result = run(Device(), policy, header + b"".join(e.encode() for e in moved))
    assert result.reasons == ('PCR 7: EV_EFI_VARIABLE_AUTHORITY ("db") expected by the reference is missing',)
    # A policy built from a log with such an event has no reference event for it.
    assert policy_from_eventlog(parse_eventlog(golden + vendor), name=policy.name, device_class=CLASS,
                                firmware_version=FIRMWARE).events == policy.events


# ---------------------------------------------------------------------------------------------
# TPM clock, reboots and continuations
# ---------------------------------------------------------------------------------------------
SEL_EXTRA = {"sha256": (*SIMULATOR_PCRS, EXTRA_PCR)}


def first_attestation(
    dev: Device, policy: ReferencePolicy, log: bytes, selection: Mapping[str, Sequence[int]] = SEL_EXTRA
) -> BootState:
    result = run(dev, policy, log, selection=selection)
    assert result.trusted and result.boot is not None, result.reasons
    return result.boot


def test_steady_state_continuation(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    for _ in range(3):
        dev.tick()
        result = run(dev, policy, log, previous=boot, offset=len(log), selection=SEL_EXTRA)
        assert result.trusted, result.reasons
        assert result.boot is not None
        assert result.boot.clock == dev.clock.clock and result.boot.log is boot.log
        assert result.boot.replayer is boot.replayer  # nothing new: the held replay state is reused
        boot = result.boot


def test_continuation_with_new_events(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    record, _ = extra_event(b"app: started model server\0")
    grown = log + record
    dev.tick()
    result = run(dev, policy, grown, previous=boot, offset=len(log), selection=SEL_EXTRA)
    assert result.trusted, result.reasons
    new = result.boot
    assert new is not None and new.log == grown and new.log_sha256 == hashlib.sha256(grown).digest()
    assert new.parsed is not None and len(new.parsed.events) == len(parse_eventlog(grown).events)
    assert new.replayed == {"sha256": replay(parse_eventlog(grown), ["sha256"])["sha256"]}
    # The previous state was not touched: the same previous can be continued differently.
    assert (
        boot.replayer is not None and boot.replayed is not None and EXTRA_PCR not in boot.replayed["sha256"]
    )
    record2, _ = extra_event(b"app: something else\0")
    again = run(dev, policy, log + record2, previous=boot, offset=len(log), selection=SEL_EXTRA)
    assert again.trusted, again.reasons
    # A policy that lists the new event accepts it in its own PCR too.
    with_event = policy_from_eventlog(
        parse_eventlog(grown), name="p", device_class=CLASS, firmware_version=FIRMWARE
    )
    dev.tick()
    result = run(dev, with_event, grown, previous=new, offset=len(grown), selection=SEL_EXTRA)
    assert result.trusted, result.reasons


def test_continuation_whose_events_do_not_match(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    logged, _ = extra_event(b"app: harmless\0")
    dev.tick()
    # The TPM extended something else than what the appended event says.
    tpm = pcr_values(log + extra_event(b"app: harmless\0", measured=b"evil")[0], SEL_EXTRA)
    result = run(dev, policy, log + logged, previous=boot, offset=len(log), pcrs=tpm, selection=SEL_EXTRA)
    assert result.reasons == (f"event log replay differs from the quoted value of sha256 PCR {EXTRA_PCR}",)
    # The clock moves on and the previously appraised prefix stays held.
    assert result.boot is not None and result.boot.clock == dev.clock.clock and result.boot.log == log


def test_continuation_that_is_not_a_log(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    result = run(
        dev,
        policy,
        log + b"\x07" * 9,
        previous=boot,
        offset=len(log),
        pcrs=pcr_values(log, SEL_EXTRA),
        selection=SEL_EXTRA,
    )
    # (The offset of a truncated header in a continuation is reported relative to the new bytes by
    # fleet_server.verifier.eventlog; only the event index is asserted here.)
    assert result.reasons[0].startswith("event log continuation: event 31, offset "), result.reasons
    assert "truncated event header" in result.reasons[0]
    assert result.boot is not None and result.boot.log == log


def test_reboot_needs_the_whole_log(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    dev.reboot()  # resetCount + 1, clock lower (disorderly shutdown): fine across a reboot
    result = run(dev, policy, log, previous=boot, offset=len(log), selection=SEL_EXTRA)
    assert result.reasons == (
        "event log continuation at offset 5071 across a reboot refused (resetCount 5 -> 6, "
        "restartCount 0 -> 0): the whole log of the new boot is required",
    )
    assert result.boot is not None and (result.boot.reset_count, result.boot.log) == (6, b"")
    full = run(dev, policy, log, previous=result.boot, selection=SEL_EXTRA)
    assert full.trusted and full.boot is not None and full.boot.log == log, full.reasons
    # A TPM Restart (restartCount up, PCRs reset) is a new log too.
    dev.clock = dataclasses.replace(dev.clock, restart_count=1, clock=dev.clock.clock + 5)
    result = run(dev, policy, log, previous=full.boot, offset=len(log), selection=SEL_EXTRA)
    assert "across a reboot refused (resetCount 6 -> 6, restartCount 0 -> 1)" in result.reasons[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clock": 9_999}, "TPM clock went backwards: clock 9999 ms is lower than the 10000 ms seen before"),
        ({"reset_count": 4}, "TPM clock went backwards: resetCount 4 is lower than the 5 seen before"),
        (
            {"restart_count": 0, "held_restart": 2},
            "TPM clock went backwards: restartCount 0 is lower than the 2",
        ),
    ],
)
def test_clock_backwards(policy: ReferencePolicy, change: dict[str, Any], message: str) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    held_restart = change.pop("held_restart", None)
    if held_restart is not None:
        boot = dataclasses.replace(boot, restart_count=held_restart)
    dev.clock = dataclasses.replace(dev.clock, **change)
    for offset in (0, len(log)):
        result = run(dev, policy, log, previous=boot, offset=offset, selection=SEL_EXTRA)
        assert result.verdict == "untrusted" and result.reasons[0].startswith(message), result.reasons
        assert result.boot is None and result.quote is not None  # keep the high-water mark


def test_same_clock_is_not_backwards(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    assert run(dev, policy, log, previous=boot, offset=len(log), selection=SEL_EXTRA).trusted


@pytest.mark.parametrize(
    ("make_previous", "offset", "message"),
    [
        (
            lambda b: None,
            100,
            "event log continuation at offset 100, but no event log of this device is held",
        ),
        (lambda b: b, 100, "event log continuation at offset 100 does not match the 5071 bytes held"),
        (
            lambda b: dataclasses.replace(
                b, log=b"", log_sha256=hashlib.sha256(b"").digest(), parsed=None, replayer=None, replayed=None
            ),
            5071,
            "event log continuation at offset 5071 does not match the 0 bytes held",
        ),
        (
            lambda b: BootState(b.reset_count, b.restart_count, b.clock, b.log, bytes(32)),
            5071,
            "event log continuation refused: the held event log does not match its SHA-256",
        ),
        (
            lambda b: BootState.create(
                reset_count=b.reset_count, restart_count=b.restart_count, clock=b.clock, log=b"\x01" * 5071
            ),
            5071,
            "event log continuation refused: the held event log cannot be used",
        ),
    ],
)
def test_continuation_refused(
    policy: ReferencePolicy, make_previous: Callable[[BootState], BootState | None], offset: int, message: str
) -> None:
    dev = Device()
    log = boot_log()
    previous = make_previous(first_attestation(dev, policy, log))
    result = run(dev, policy, log, previous=previous, offset=offset, selection=SEL_EXTRA)
    assert result.verdict == "untrusted"
    assert result.reasons[0].startswith(message), result.reasons
    assert result.boot is not None and result.boot.log in (b"", log)


def test_held_log_size_is_bounded(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    record, _ = extra_event(b"x" * (MAX_HELD_LOG - len(log)))
    result = run(dev, policy, log + record, previous=boot, offset=len(log), selection=SEL_EXTRA)
    assert result.reasons[0] == f"event log of this boot would exceed {MAX_HELD_LOG} bytes"


# ---------------------------------------------------------------------------------------------
# derived state and the cache
# ---------------------------------------------------------------------------------------------
def test_cold_previous_is_rebuilt_from_its_log(policy: ReferencePolicy) -> None:
    """Correctness does not depend on the derived data: a bare persisted state gives the same result."""
    dev = Device()
    log = boot_log()
    warm = first_attestation(dev, policy, log)
    cold = BootState(warm.reset_count, warm.restart_count, warm.clock, warm.log, warm.log_sha256)
    assert not cold.prepared and cold == warm  # derived fields do not take part in equality
    record, _ = extra_event(b"app: event\0")
    dev.tick()
    ch = challenge(SEL_EXTRA)
    ev = dev.evidence(ch, pcr_values(log + record, SEL_EXTRA), log + record, len(log))
    results = [
        appraise(ak=dev.ak, challenge=ch, evidence=ev, previous=p, policy=policy) for p in (warm, cold)
    ]
    assert results[0] == results[1] and results[0].trusted
    assert results[0].boot is not None and results[1].boot is not None
    assert results[0].boot.replayed == results[1].boot.replayed
    # A held replay state without a bank the challenge now covers is rebuilt with it.
    both = {"sha1": (*SIMULATOR_PCRS, EXTRA_PCR), **SEL_EXTRA}
    result = run(dev, policy, log, previous=warm, offset=len(log), selection=both, allow_sha1=True)
    assert result.trusted, result.reasons
    assert result.boot is not None and result.boot.replayer is not None
    assert set(result.boot.replayer.banks) == {"sha1", "sha256"}


def test_boot_state_cache(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    boot = first_attestation(dev, policy, log)
    cache = BootStateCache(max_entries=2)
    persisted = BootState(boot.reset_count, boot.restart_count, boot.clock, boot.log, boot.log_sha256)
    assert cache.attach("cam-1", persisted) is persisted and cache.misses == 1  # miss: unchanged
    cache.store("cam-1", boot)
    attached = cache.attach("cam-1", persisted)
    assert attached.prepared and attached.parsed is boot.parsed and cache.hits == 1
    assert attached == persisted  # counters and clock come from the persisted state
    assert not cache.attach("cam-2", persisted).prepared  # keyed per device
    # Storing states without derived data or without a log does nothing.
    cache.store("cam-3", persisted)
    cache.store("cam-3", BootState.create(reset_count=1, restart_count=0, clock=1))
    assert len(cache) == 1
    # LRU: cam-1 was used last, so cam-4 evicts cam-5.
    cache.store("cam-5", boot)
    cache.attach("cam-1", persisted)
    cache.store("cam-4", boot)
    assert len(cache) == 2
    assert cache.attach("cam-1", persisted).prepared
    assert not cache.attach("cam-5", persisted).prepared
    # A state whose bytes disagree with the cached entry's size is not given that entry.
    shorter = BootState(boot.reset_count, boot.restart_count, boot.clock, boot.log[:-1], boot.log_sha256)
    assert not cache.attach("cam-1", shorter).prepared
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        BootStateCache(max_entries=0)


def test_results_are_the_same_with_and_without_the_cache(policy: ReferencePolicy) -> None:
    dev = Device()
    log = boot_log()
    cache = BootStateCache()
    persisted: BootState | None = None
    outcomes: list[list[tuple[str, tuple[str, ...]]]] = [[], []]
    steps = [(log, 0), (log, len(log)), (log + extra_event(b"a\0")[0], len(log))]
    for use_cache in (True, False):
        persisted = None
        dev = Device()
        for data, offset in steps:
            dev.tick()
            previous: BootState | None = persisted
            if use_cache and previous is not None:
                previous = cache.attach("cam", previous)
            result = run(dev, policy, data, previous=previous, offset=offset, selection=SEL_EXTRA)
            outcomes[use_cache].append((result.verdict, result.reasons))
            assert result.boot is not None
            if use_cache:
                cache.store("cam", result.boot)
            b = result.boot
            persisted = BootState(b.reset_count, b.restart_count, b.clock, b.log, b.log_sha256)
    assert outcomes[0] == outcomes[1] == [("trusted", ())] * 3
    assert cache.hits == 2


# ---------------------------------------------------------------------------------------------
# real devices: SimulatedDevice + swtpm + the agent's TpmAdapter
# ---------------------------------------------------------------------------------------------
class Rig:
    """A simulated device and a way to attest it like the agent would."""

    def __init__(self, device: SimulatedDevice, state_dir: Path) -> None:
        self.device = device
        self.state_dir = state_dir

    def adapter(self) -> TpmAdapter:
        return TpmAdapter(self.device.tcti, self.state_dir)  # a new TCTI after every power-on

    def ak(self) -> AttestationKey:
        with self.adapter() as tpm:
            return AttestationKey.from_tpm2b_public(tpm.ak_public)

    def log(self) -> bytes:
        return self.device.eventlog_path.read_bytes()

    def evidence(
        self, ch: ChallengeRecord, *, offset: int = 0, log: bytes | None = None, nonce: bytes | None = None
    ) -> Evidence:
        with self.adapter() as tpm:
            quote = tpm.quote(ch.nonce if nonce is None else nonce, ch.selection)
        data = self.log() if log is None else log
        return Evidence(ch.challenge_id, quote.attest, quote.signature, quote.pcrs, offset, data[offset:])


@pytest.fixture(scope="module")
def rigs(
    tmp_path_factory: pytest.TempPathFactory, manufacturer_ca: ManufacturerCA
) -> Iterator[tuple[Rig, Rig]]:
    base = tmp_path_factory.mktemp("appraise-devices")
    made = [SimulatedDevice.create(base / name, ca=manufacturer_ca) for name in ("reference", "fleet")]
    try:
        yield Rig(made[0], base / "reference-state"), Rig(made[1], base / "fleet-state")
    finally:
        for d in made:
            d.shutdown()


@pytest.fixture(scope="module")
def device_policy(rigs: tuple[Rig, Rig]) -> ReferencePolicy:
    reference, _ = rigs
    reference.device.boot("golden")
    log = reference.log()
    reference.device.shutdown()
    return policy_from_eventlog(
        parse_eventlog(log), name="edge-camera-golden", device_class=CLASS, firmware_version=FIRMWARE
    )


@pytest.mark.swtpm
def test_device_golden_is_trusted(rigs: tuple[Rig, Rig], device_policy: ReferencePolicy) -> None:
    _, rig = rigs
    rig.device.boot("golden")
    ch = challenge(device_policy.selection)
    result = appraise(
        ak=rig.ak(),
        challenge=ch,
        evidence=rig.evidence(ch),
        previous=None,
        policy=device_policy,
        device_class=CLASS,
        firmware_version=FIRMWARE,
    )
    assert result.trusted, result.reasons
    assert result.boot is not None and result.boot.log == rig.log()


@pytest.mark.swtpm
@pytest.mark.parametrize(
    "profile", ["tampered-kernel", "tampered-bootloader", "rolled-back-firmware", "secureboot-disabled"]
)
def test_device_tampered_profiles(
    rigs: tuple[Rig, Rig], device_policy: ReferencePolicy, profile: str
) -> None:
    _, rig = rigs
    rig.device.boot(profile)
    ch = challenge(device_policy.selection)
    result = appraise(
        ak=rig.ak(), challenge=ch, evidence=rig.evidence(ch), previous=None, policy=device_policy
    )
    check_blame(result, rig.log(), device_policy, EXPECTED[profile])
    assert result.boot is not None  # the evidence is authentic: the boot state is kept


@pytest.mark.swtpm
def test_device_wrong_nonce(rigs: tuple[Rig, Rig], device_policy: ReferencePolicy) -> None:
    _, rig = rigs
    rig.device.boot("golden")
    ch = challenge(device_policy.selection)
    ev = rig.evidence(ch, nonce=secrets.token_bytes(32))
    result = appraise(ak=rig.ak(), challenge=ch, evidence=ev, previous=None, policy=device_policy)
    assert result.reasons == ("quote: quote nonce (extraData) does not match the challenge nonce",)
    assert result.boot is None


@pytest.mark.swtpm
def test_device_power_cycle(rigs: tuple[Rig, Rig], device_policy: ReferencePolicy) -> None:
    _, rig = rigs
    rig.device.boot("golden")
    ak = rig.ak()
    ch = challenge(device_policy.selection)
    first = appraise(ak=ak, challenge=ch, evidence=rig.evidence(ch), previous=None, policy=device_policy)
    assert first.trusted and first.boot is not None, first.reasons
    held = first.boot
    rig.device.power_cycle()
    ch = challenge(device_policy.selection)
    cont = appraise(
        ak=ak,
        challenge=ch,
        evidence=rig.evidence(ch, offset=len(held.log)),
        previous=held,
        policy=device_policy,
    )
    assert cont.verdict == "untrusted"
    assert cont.quote is not None and cont.quote.reset_count > held.reset_count
    assert cont.reasons[0].startswith(
        f"event log continuation at offset {len(held.log)} across a reboot refused "
        f"(resetCount {held.reset_count} -> {cont.quote.reset_count}"
    )
    assert cont.boot is not None and cont.boot.log == b""
    ch = challenge(device_policy.selection)
    full = appraise(ak=ak, challenge=ch, evidence=rig.evidence(ch), previous=cont.boot, policy=device_policy)
    assert full.trusted, full.reasons
    assert full.boot is not None and full.boot.reset_count == cont.quote.reset_count


def _measure(rig: Rig, data: bytes, measured: bytes | None = None) -> bytes:
    """Extend EXTRA_PCR in the device's TPM with the hash of ``measured`` (default ``data``) and return
    the event record a log would get for ``data``."""
    record, event = extra_event(data)
    if measured is not None:
        _, event = extra_event(data, measured=measured)
    extend_events(rig.device.tcti, [event])
    return record


@pytest.mark.swtpm
def test_device_continuation_within_a_boot(rigs: tuple[Rig, Rig], device_policy: ReferencePolicy) -> None:
    _, rig = rigs
    rig.device.boot("golden")
    ak = rig.ak()
    selection = {"sha256": (*device_policy.selection["sha256"], EXTRA_PCR)}
    ch = challenge(selection)
    first = appraise(ak=ak, challenge=ch, evidence=rig.evidence(ch), previous=None, policy=device_policy)
    assert first.trusted and first.boot is not None, first.reasons
    log = rig.log()
    # Runtime measurement: the TPM is extended and the event appended to the log.
    grown = log + _measure(rig, b"app: model server v2 started\0")
    ch = challenge(selection)
    cont = appraise(
        ak=ak,
        challenge=ch,
        evidence=rig.evidence(ch, offset=len(log), log=grown),
        previous=first.boot,
        policy=device_policy,
    )
    assert cont.trusted, cont.reasons
    assert cont.boot is not None and cont.boot.log == grown
    assert cont.quote is not None and first.quote is not None and cont.quote.clock >= first.quote.clock
    # Nothing new since: an empty continuation.
    ch = challenge(selection)
    steady = appraise(
        ak=ak,
        challenge=ch,
        evidence=rig.evidence(ch, offset=len(grown), log=grown),
        previous=cont.boot,
        policy=device_policy,
    )
    assert steady.trusted, steady.reasons
    # New events that do not match what the TPM extended.
    lying = grown + _measure(rig, b"app: benign\0", measured=b"something else")
    ch = challenge(selection)
    bad = appraise(
        ak=ak,
        challenge=ch,
        evidence=rig.evidence(ch, offset=len(grown), log=lying),
        previous=steady.boot,
        policy=device_policy,
    )
    assert bad.reasons == (f"event log replay differs from the quoted value of sha256 PCR {EXTRA_PCR}",)


@pytest.mark.swtpm
def test_device_clock_backwards(rigs: tuple[Rig, Rig], device_policy: ReferencePolicy) -> None:
    _, rig = rigs
    rig.device.boot("golden")
    ak = rig.ak()
    ch = challenge(device_policy.selection)
    first = appraise(ak=ak, challenge=ch, evidence=rig.evidence(ch), previous=None, policy=device_policy)
    assert first.trusted and first.boot is not None
    forged = dataclasses.replace(first.boot, clock=first.boot.clock + 3_600_000)  # "seen" an hour ahead
    ch = challenge(device_policy.selection)
    result = appraise(
        ak=ak,
        challenge=ch,
        evidence=rig.evidence(ch, offset=len(first.boot.log)),
        previous=forged,
        policy=device_policy,
    )
    assert result.verdict == "untrusted" and result.boot is None
    assert result.reasons[0].startswith("TPM clock went backwards: clock ")


def test_software_tpm_values_match_the_writer_replay() -> None:
    """The software 'TPM' values equal an independent replay of the writer's events."""
    writer = boot_writer()
    assert pcr_values(writer.to_bytes())["sha256"] == {
        p: writer.replay()["sha256"][p] for p in SIMULATOR_PCRS
    }
