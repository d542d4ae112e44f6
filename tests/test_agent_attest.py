"""agent.attest: which part of the event log is sent, bounded reading, deadlines, and real evidence
from a simulated device (swtpm) that the project's verifier accepts."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from agent.attest import (
    ChallengeExpiredError,
    EventLogTooLargeError,
    answer_challenge,
    eventlog_part,
    read_eventlog,
)
from agent.tpm.adapter import Quote, TpmAdapter
from firmware_sim.device import SimulatedDevice
from firmware_sim.manufacturer import ManufacturerCA
from fleet_server.verifier.eventlog import parse_eventlog, replay
from fleet_server.verifier.quote import AttestationKey, check_replay, verify_quote
from protocol.errors import StorageError
from protocol.messages import MAX_EVENTLOG, Challenge

LOG = bytes(range(256)) * 4  # 1024 bytes; the suffix logic never parses the log


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.mark.parametrize(("offset", "digest", "expected"), [
    (0, b"", (0, LOG)),                                   # the server holds nothing
    (0, sha(b""), (0, LOG)),
    (100, sha(LOG[:100]), (100, LOG[100:])),              # the server holds a prefix: the rest only
    (len(LOG), sha(LOG), (len(LOG), b"")),                # the server holds it all: nothing new
    (100, sha(LOG[:99]), (0, LOG)),                       # other prefix bytes (another boot)
    (100, sha(LOG[:100])[:16], (0, LOG)),                 # not a SHA-256
    (len(LOG) + 1, sha(LOG + b"\x00"), (0, LOG)),         # the server holds more than the log has
    (100, b"", (0, LOG)),
])
def test_eventlog_part(offset: int, digest: bytes, expected: tuple[int, bytes]) -> None:
    assert eventlog_part(LOG, offset, digest) == expected


def test_read_eventlog_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "log.bin"
    path.write_bytes(LOG)
    assert read_eventlog(path, limit=len(LOG)) == LOG
    with pytest.raises(EventLogTooLargeError, match=f"larger than {len(LOG) - 1} bytes"):
        read_eventlog(path, limit=len(LOG) - 1)
    with pytest.raises(StorageError, match="cannot read the event log"):
        read_eventlog(tmp_path / "missing.bin", limit=10)
    with pytest.raises(StorageError, match="cannot read the event log"):
        read_eventlog(tmp_path, limit=10)  # a folder


class CountingQuoter:
    """Wraps a real TPM adapter and counts quotes (to see whether a TPM signature was spent)."""

    def __init__(self, tpm: TpmAdapter) -> None:
        self.tpm = tpm
        self.quotes = 0

    def quote(self, nonce: bytes, selection: Mapping[str, Sequence[int]], *, with_pcrs: bool = True) -> Quote:
        self.quotes += 1
        return self.tpm.quote(nonce, selection, with_pcrs=with_pcrs)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory,
           manufacturer_ca: ManufacturerCA) -> Iterator[SimulatedDevice]:
    dev = SimulatedDevice.create(tmp_path_factory.mktemp("attest") / "dev", ca=manufacturer_ca)
    dev.boot()
    try:
        yield dev
    finally:
        dev.shutdown()


@pytest.fixture
def quoter(device: SimulatedDevice, tmp_path: Path) -> Iterator[CountingQuoter]:
    with TpmAdapter(device.tcti, tmp_path / "state") as tpm:
        yield CountingQuoter(tpm)


SELECTION = {"sha256": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14)}


def challenge(*, deadline: int | None = None, held: bytes = b"") -> Challenge:
    return Challenge(challenge_id=secrets.token_hex(16), nonce=secrets.token_bytes(32), selection=SELECTION,
                     deadline=int(time.time() * 1000) + 30_000 if deadline is None else deadline,
                     log_offset=len(held), log_sha256=sha(held) if held else b"")


@pytest.mark.swtpm
def test_evidence_verifies_with_the_projects_verifier_whole_log_then_suffix(device: SimulatedDevice,
                                                                            quoter: CountingQuoter) -> None:
    log = device.eventlog_path.read_bytes()
    ak = AttestationKey.from_tpm2b_public(quoter.tpm.ak_public)

    first = challenge()
    ev = answer_challenge(first, tpm=quoter, eventlog_path=device.eventlog_path, clock=time.time)
    assert (ev.challenge_id, ev.eventlog_offset, ev.eventlog) == (first.challenge_id, 0, log)
    verify_quote(ak=ak, attest=ev.attest, signature=ev.signature, nonce=first.nonce, pcr_values=ev.pcrs,
                 expected_selection=first.selection)
    assert check_replay(replay(parse_eventlog(ev.eventlog)), ev.pcrs)  # the log explains the quoted PCRs

    # The server now holds the whole log: the next evidence carries no log bytes, at offset len(log).
    second = challenge(held=log)
    ev2 = answer_challenge(second, tpm=quoter, eventlog_path=device.eventlog_path, clock=time.time)
    assert (ev2.eventlog_offset, ev2.eventlog) == (len(log), b"")
    verify_quote(ak=ak, attest=ev2.attest, signature=ev2.signature, nonce=second.nonce, pcr_values=ev2.pcrs)

    # A server holding half the log gets exactly the other half.
    half = len(log) // 2
    third = challenge(held=log[:half])
    ev3 = answer_challenge(third, tpm=quoter, eventlog_path=device.eventlog_path, clock=time.time)
    assert (ev3.eventlog_offset, ev3.eventlog) == (half, log[half:])
    assert quoter.quotes == 3


@pytest.mark.swtpm
def test_expired_challenge_spends_no_tpm_signature(device: SimulatedDevice, quoter: CountingQuoter) -> None:
    with pytest.raises(ChallengeExpiredError, match="expired before"):
        answer_challenge(challenge(deadline=1_000), tpm=quoter, eventlog_path=device.eventlog_path,
                         clock=time.time)
    assert quoter.quotes == 0


@pytest.mark.swtpm
def test_deadline_passing_during_the_quote_withholds_the_evidence(device: SimulatedDevice,
                                                                  quoter: CountingQuoter) -> None:
    start = time.time()
    readings = iter([start, start + 60])  # before quoting: in time; after: the deadline has passed

    with pytest.raises(ChallengeExpiredError, match="while quoting"):
        answer_challenge(challenge(deadline=int(start * 1000) + 30_000), tpm=quoter,
                         eventlog_path=device.eventlog_path, clock=lambda: next(readings))
    assert quoter.quotes == 1


@pytest.mark.swtpm
def test_oversized_or_missing_log_fails_before_quoting(tmp_path: Path, quoter: CountingQuoter) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x00" * (MAX_EVENTLOG + 1))
    with pytest.raises(EventLogTooLargeError):
        answer_challenge(challenge(), tpm=quoter, eventlog_path=big, clock=time.time)
    with pytest.raises(StorageError):
        answer_challenge(challenge(), tpm=quoter, eventlog_path=tmp_path / "none.bin", clock=time.time)
    assert quoter.quotes == 0
