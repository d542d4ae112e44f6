"""What the agent believes from the server: verification of every signed message, and the verdict.

Every server -> device message passes :meth:`MessageVerifier.verify` before anything in it is used:

1. the topic is one of this device's ``down`` topics on the expected channel (enrollment topics
   under the claim identity, device topics under the device id) and its kind admits exactly one
   message type (``challenge`` -> :class:`~protocol.messages.Challenge`, ...): a validly signed
   ``revocation`` arriving on the ``challenge`` topic is refused;
2. :func:`protocol.messages.decode_signed` with the pinned key(s): the signature over the payload
   bytes as received, then strict decoding, then ``aud`` equal to this channel's identity
   (``<device_id>``, or ``claim:<device_id>`` during enrollment);
3. freshness: ``ts`` within ``max_skew`` seconds of the agent's clock, in both directions;
4. de-duplication: a message id seen before is refused.  Ids are remembered for as long as a
   message could still be fresh, at most ``max_remembered`` of them; when that bound forces an id
   out early, every message not newer than it is refused from then on (a low-water mark), so the
   bound costs availability for an old message, never a replay.

:class:`TrustState` keeps the latest verified attestation verdict with its expiry (``trusted_until``)
and revocations.  It only moves forward in server time (a result older than the last message
applied is ignored), and "trusted" always means "trusted and not expired at *now*".

Pure: bytes, values and the time in; no I/O except :func:`load_signing_keys`.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol import topics
from protocol.errors import ConfigError, MessageError, VerificationError
from protocol.messages import (
    AttestationResult,
    Challenge,
    EnrollChallenge,
    EnrollResult,
    Envelope,
    KeyDenied,
    KeyRelease,
    Message,
    ModelOffer,
    Revocation,
    UpdateAssignment,
    VerifyKey,
    decode_signed,
    key_id,
)

MAX_KEY_FILE = 16 * 1024
DEFAULT_MAX_REMEMBERED = 4096

DEVICE_KINDS: Mapping[str, type[Message]] = {
    "challenge": Challenge,
    "result": AttestationResult,
    "revocation": Revocation,
    "model-offer": ModelOffer,
    "key-release": KeyRelease,
    "key-denied": KeyDenied,
    "update": UpdateAssignment,
}
"""Message type admitted on each device ``down`` topic kind (``fleet/v1/devices/<id>/down/<kind>``).

``model-chunk`` is not here: package chunks are binary frames, not signed messages (their integrity
comes from the package's signed manifest and the offer's ``package_sha256``); the agent hands them
to the model vault before verification (see :data:`CHUNK_KIND`)."""

CHUNK_KIND = "model-chunk"
"""Topic kind of package chunk frames (``protocol.messages.decode_chunk``), server -> device."""

ENROLL_KINDS: Mapping[str, type[Message]] = {
    "challenge": EnrollChallenge,
    "result": EnrollResult,
}
"""Message type admitted on each enrollment ``down`` topic kind (``.../enroll/claim:<id>/down/<kind>``)."""


class StaleMessageError(VerificationError):
    """A signed message's timestamp is outside the freshness window of the agent's clock."""


class ReplayedMessageError(VerificationError):
    """A signed message was already seen (or is too old to be told apart from one that was)."""


def load_signing_keys(path: Path) -> dict[str, VerifyKey]:
    """The pinned server key from a PEM file (public key or certificate), as ``{kid: key}``.

    Only ECDSA P-256 keys are accepted (what the server signs with).  Raises :class:`ConfigError`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            pem = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"server.signing_public_key: cannot read {path}: {exc.strerror or exc}") from None
    if len(pem) > MAX_KEY_FILE:
        raise ConfigError(f"server.signing_public_key: {path} is too large for a key")
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: object = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"server.signing_public_key: {path} holds no PEM public key or "
                          "certificate") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"server.signing_public_key: {path} is not an ECDSA P-256 key")
    return {key_id(key): key}


@dataclass(frozen=True, slots=True)
class Channel:
    """The server -> device topics of one identity, and the message type each topic kind admits."""

    device_id: str
    audience: str
    """The ``aud`` every message on this channel must carry (the broker username of the identity)."""
    enrollment: bool
    kinds: Mapping[str, type[Message]]

    @classmethod
    def device(cls, device_id: str) -> Channel:
        """The device-certificate channel: ``fleet/v1/devices/<id>/down/#``, aud ``<id>``."""
        return cls(topics.validate_device_id(device_id), device_id, False, DEVICE_KINDS)

    @classmethod
    def enroll(cls, device_id: str) -> Channel:
        """The claim-certificate channel: ``fleet/v1/enroll/claim:<id>/down/#``, aud ``claim:<id>``."""
        return cls(topics.validate_device_id(device_id), topics.claim_identity(device_id), True, ENROLL_KINDS)

    @property
    def subscription(self) -> str:
        """The topic filter to subscribe to."""
        if self.enrollment:
            return topics.enroll_down_filter(self.device_id)
        return topics.device_down_filter(self.device_id)

    def kind(self, topic: str) -> str:
        """The message kind of ``topic``; :class:`~protocol.topics.TopicError` if not on this channel."""
        if self.enrollment:
            return topics.parse_enroll_topic(topic, self.device_id)
        return topics.parse_device_topic(topic, self.device_id)


class MessageVerifier:
    """Verifies server -> device messages (see the module docstring); safe to share between threads."""

    def __init__(self, keys: Mapping[str, VerifyKey], *, max_skew: float,
                 max_remembered: int = DEFAULT_MAX_REMEMBERED) -> None:
        if not keys:
            raise ConfigError("at least one pinned server key is needed")
        if max_skew <= 0 or max_remembered < 1:
            raise ConfigError("max_skew must be positive and max_remembered at least 1")
        self._keys = dict(keys)
        self._skew_ms = int(max_skew * 1000)
        self._max = max_remembered
        self._seen: collections.OrderedDict[str, int] = collections.OrderedDict()  # id -> ts, ts order
        self._floor = -1  # messages with ts <= floor are refused: their ids may have been forgotten
        self._lock = threading.Lock()

    def verify(self, channel: Channel, topic: str, payload: bytes, *, now: float) -> Envelope:
        """Verify and decode one message received on ``topic`` at time ``now`` (Unix seconds).

        Raises :class:`~protocol.errors.MalformedInputError` (wrong topic, malformed, wrong type for
        the topic, wrong ``aud``), :class:`~protocol.errors.SignatureError`,
        :class:`StaleMessageError` or :class:`ReplayedMessageError`.  Only a message that passes
        every check is remembered for de-duplication.
        """
        kind = channel.kind(topic)
        expected = channel.kinds.get(kind)
        if expected is None:
            raise MessageError(f"no server message is expected on topic kind {kind!r}")
        envelope = decode_signed(payload, keys=self._keys, aud=channel.audience, allowed=(expected,))
        now_ms = int(now * 1000)
        if abs(envelope.ts - now_ms) > self._skew_ms:
            direction = "old" if envelope.ts < now_ms else "far in the future"
            raise StaleMessageError(f"{envelope.type} {envelope.id} is too {direction}: ts {envelope.ts} "
                                    f"differs from the agent clock by {abs(envelope.ts - now_ms)} ms "
                                    f"(allowed {self._skew_ms} ms)")
        with self._lock:
            self._forget_expired(now_ms)
            if envelope.id in self._seen:
                raise ReplayedMessageError(f"{envelope.type} {envelope.id} was already received")
            if envelope.ts <= self._floor:
                raise ReplayedMessageError(f"{envelope.type} {envelope.id} is older than the messages the "
                                           "agent can still tell apart from replays")
            self._remember(envelope.id, envelope.ts)
        return envelope

    def _forget_expired(self, now_ms: int) -> None:
        # An id whose ts is outside the window can go: its replay would fail the freshness check.
        cutoff = now_ms - self._skew_ms
        stale = [mid for mid, ts in self._seen.items() if ts < cutoff]
        for mid in stale:
            del self._seen[mid]

    def _remember(self, msg_id: str, ts: int) -> None:
        self._seen[msg_id] = ts
        while len(self._seen) > self._max:
            oldest = min(self._seen, key=self._seen.__getitem__)
            self._floor = max(self._floor, self._seen.pop(oldest))

    @property
    def remembered(self) -> int:
        """How many message ids are currently remembered."""
        with self._lock:
            return len(self._seen)


# -- the verdict -----------------------------------------------------------------------------------
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The agent's view of its own attestation state.

    ``state`` is ``unknown`` (nothing verified since start), ``trusted``/``untrusted`` (the latest
    attestation result) or a revocation state (``untrusted``, ``revoked``, ``quarantined``).
    ``trusted_until`` (Unix seconds) is set only for a ``trusted`` result: its ``expires``.
    """

    state: str = UNKNOWN
    trusted_until: float | None = None
    reasons: tuple[str, ...] = ()
    challenge_id: str | None = None
    revoked: bool = False
    server_ts: int = -1
    """``ts`` (ms) of the server message this verdict comes from."""

    def trusted(self, now: float) -> bool:
        """True only for a ``trusted`` result that has not expired at ``now``."""
        return (self.state == "trusted" and not self.revoked and self.trusted_until is not None
                and now < self.trusted_until)


class TrustState:
    """The latest verified verdict; updated only by verified envelopes, monotonically in server time."""

    def __init__(self) -> None:
        self._verdict = Verdict()
        self._lock = threading.Lock()

    @property
    def verdict(self) -> Verdict:
        with self._lock:
            return self._verdict

    def trusted(self, now: float) -> bool:
        """True if the latest verdict is ``trusted`` and not expired at ``now``."""
        return self.verdict.trusted(now)

    def apply(self, envelope: Envelope) -> bool:
        """Apply a verified ``attestation.result`` or ``revocation``; False if older than the current one.

        At equal server time a revocation wins over a result (fail closed).
        """
        msg = envelope.message
        with self._lock:
            current = self._verdict.server_ts
            if isinstance(msg, AttestationResult):
                if envelope.ts <= current:
                    return False
                until = msg.expires / 1000 if msg.verdict == "trusted" else None
                self._verdict = Verdict(state=msg.verdict, trusted_until=until, reasons=msg.reasons,
                                        challenge_id=msg.challenge_id, server_ts=envelope.ts)
                return True
            if isinstance(msg, Revocation):
                if envelope.ts < current:
                    return False
                self._verdict = Verdict(state=msg.state, trusted_until=None, reasons=msg.reasons,
                                        revoked=True, server_ts=envelope.ts)
                return True
        raise MessageError(f"{envelope.type} does not carry a verdict")
