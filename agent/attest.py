"""Answering one attestation challenge: TPM quote + PCR values + (the new part of) the event log.

:func:`answer_challenge` is the whole job, behind one small interface to the TPM (:class:`Quoter`,
which :class:`agent.tpm.adapter.TpmAdapter` implements):

1. refuse a challenge whose deadline has passed (no TPM signature is spent on it);
2. read the boot event log, bounded (:func:`read_eventlog`), and choose what to send
   (:func:`eventlog_part`): if the log starts with exactly the prefix the server holds
   (``log_offset`` bytes whose SHA-256 is ``log_sha256``), only the bytes after it with
   ``eventlog_offset = log_offset``; otherwise the whole log with offset 0.  The log is read before
   the quote: it is the cheap step that can fail, and the boot log is complete once the agent runs;
3. quote the challenge's selection with its nonce; the adapter reads the PCR values in the same
   locked TPM session and checks them against the quote's pcrDigest;
4. check the deadline again: evidence the server would reject as late is not sent.

Errors: :class:`ChallengeExpiredError` for a missed deadline, :class:`~protocol.errors.StorageError`
for an unreadable log, :class:`EventLogTooLargeError` when the part to send exceeds the protocol's
limit, :class:`~protocol.errors.TpmError` from the TPM.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from agent.tpm.interface import Quote
from protocol.errors import EdgeError, StorageError
from protocol.messages import MAX_EVENTLOG, Challenge, Evidence


class ChallengeExpiredError(EdgeError):
    """The challenge's deadline passed before the evidence was ready."""


class EventLogTooLargeError(StorageError):
    """The event log part to send is larger than the protocol allows (``MAX_EVENTLOG``)."""


class Quoter(Protocol):
    """The TPM operation an attestation needs (implemented by ``TpmAdapter``)."""

    def quote(self, nonce: bytes, selection: Mapping[str, Sequence[int]], *, with_pcrs: bool = True) -> Quote:
        """TPM2_Quote of ``selection`` with ``nonce``; with the quoted PCR values."""
        ...


def eventlog_part(log: bytes, log_offset: int, log_sha256: bytes) -> tuple[int, bytes]:
    """``(eventlog_offset, bytes to send)`` for a log the server holds ``log_offset`` bytes of.

    The suffix is sent only if ``log`` starts with exactly the server's prefix (its SHA-256 equals
    ``log_sha256``); a shorter log, a different prefix (a new boot) or no prefix at all means the
    whole log, offset 0.
    """
    if 0 < log_offset <= len(log) and len(log_sha256) == hashlib.sha256().digest_size:
        prefix_digest = hashlib.sha256(memoryview(log)[:log_offset]).digest()
        if hmac.compare_digest(prefix_digest, log_sha256):
            return log_offset, log[log_offset:]
    return 0, log


def read_eventlog(path: Path, *, limit: int) -> bytes:
    """Read the event log at ``path``, at most ``limit`` bytes (securityfs files report size 0, so
    the file is read in chunks rather than by its size).  :class:`EventLogTooLargeError` beyond it."""
    chunks: list[bytes] = []
    total = 0
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(min(64 * 1024, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise EventLogTooLargeError(f"event log {path} is larger than {limit} bytes")
    except OSError as exc:
        raise StorageError(f"cannot read the event log {path}: {exc.strerror or exc}") from None
    return b"".join(chunks)


def answer_challenge(challenge: Challenge, *, tpm: Quoter, eventlog_path: Path,
                     clock: Callable[[], float]) -> Evidence:
    """Build the :class:`~protocol.messages.Evidence` answering ``challenge`` (see the module docstring).

    ``clock`` returns Unix seconds; the challenge's ``deadline`` is in milliseconds.
    """
    if int(clock() * 1000) >= challenge.deadline:
        raise ChallengeExpiredError(f"challenge {challenge.challenge_id} expired before it could be answered")
    # Enough to find the server's prefix and a suffix of the maximum size after it.
    log = read_eventlog(eventlog_path, limit=challenge.log_offset + MAX_EVENTLOG)
    offset, part = eventlog_part(log, challenge.log_offset, challenge.log_sha256)
    if len(part) > MAX_EVENTLOG:
        raise EventLogTooLargeError(f"event log part of {len(part)} bytes exceeds the limit of "
                                    f"{MAX_EVENTLOG}")
    quote = tpm.quote(challenge.nonce, challenge.selection, with_pcrs=True)
    if int(clock() * 1000) > challenge.deadline:
        raise ChallengeExpiredError(f"challenge {challenge.challenge_id} expired while quoting")
    return Evidence(challenge_id=challenge.challenge_id, attest=quote.attest, signature=quote.signature,
                    pcrs=quote.pcrs, eventlog_offset=offset, eventlog=part)
