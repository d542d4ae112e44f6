"""Signed checkpoints of the audit chain: what anchors it against a rewrite of the whole database.

The hash chain (:mod:`fleet_server.console.audit`) finds any change to some rows, but someone who
can write the database can rewrite *every* row and recompute every hash consistently. A checkpoint
is an Ed25519 signature, by a key kept in a file of its own (``audit.checkpoint_key``, 0600, never
in the database), over the canonical bytes (:func:`checkpoint_bytes`) of::

    (format, seq, head_hash, at, kid)

``head_hash`` is the hash of entry ``seq``, which covers every entry before it. A rewritten chain
therefore no longer matches the head hash a checkpoint signed, and a forged checkpoint needs the key.
Checkpoints are signed automatically whenever ``audit.checkpoint_interval`` entries follow the newest
one, and on demand (``fleet-server audit checkpoint``).

:func:`verify_checkpoints` (pure) checks each checkpoint (key id, signature, the chain's hash at its
``seq``) and, when they all pass, that the newest is at most ``interval`` entries behind the head, so
that deleting the checkpoints does not silently remove the anchor of a long chain.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet_server.keys import CheckpointSigningKey, ed25519_key_id
from protocol.encoding import canonical_bytes

FORMAT = 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One signed checkpoint as stored (``signature`` hex; ``id`` is its row number, 0 before it is
    stored)."""

    seq: int
    head_hash: str
    at: int
    kid: str
    signature: str
    id: int = 0

    def describe(self) -> str:
        """``checkpoint 3 (seq 300, 2026-01-02T03:04:05Z, key id 0123...)`` for messages."""
        return f"checkpoint {self.id} (seq {self.seq}, {iso(self.at)}, key id {self.kid})"


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def checkpoint_bytes(*, seq: int, head_hash: str, at: int, kid: str) -> bytes:
    """The canonical bytes a checkpoint signature covers."""
    return canonical_bytes({"format": FORMAT, "type": "fleet-audit-checkpoint", "seq": seq,
                            "head_hash": head_hash, "at": at, "kid": kid})


def sign_checkpoint(key: CheckpointSigningKey, *, seq: int, head_hash: str, at: int) -> Checkpoint:
    """A checkpoint of the chain whose entry ``seq`` has hash ``head_hash``, signed by ``key``."""
    signature = key.sign(checkpoint_bytes(seq=seq, head_hash=head_hash, at=at, kid=key.kid))
    return Checkpoint(seq=seq, head_hash=head_hash, at=at, kid=key.kid, signature=signature.hex())


def signature_problem(cp: Checkpoint, public_key: ed25519.Ed25519PublicKey | None) -> str | None:
    """Why ``cp`` is not signed by ``public_key`` (one line), or None if it is."""
    if public_key is None:
        return f"{cp.describe()}: there is no checkpoint public key to verify it with"
    kid = ed25519_key_id(public_key)
    if not hmac.compare_digest(cp.kid, kid):
        return f"{cp.describe()}: signed by key id {cp.kid}, not by this server's checkpoint key {kid}"
    try:
        signature = bytes.fromhex(cp.signature)
        public_key.verify(signature, checkpoint_bytes(seq=cp.seq, head_hash=cp.head_hash, at=cp.at,
                                                      kid=cp.kid))
    except (ValueError, InvalidSignature):
        return f"{cp.describe()}: the signature does not verify (the checkpoint was forged or altered)"
    return None


@dataclass(frozen=True, slots=True)
class CheckpointReport:
    """Outcome of :func:`verify_checkpoints`: the checkpoints checked, the newest good one, and one
    line per problem."""

    checked: int
    last_good: Checkpoint | None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: the last good checkpoint, or why there is none."""
        if self.last_good is None:
            return "no signed checkpoint of the audit log yet"
        cp = self.last_good
        return f"last good checkpoint: {cp.describe()}, {self.checked} checkpoint(s) checked"


def verify_checkpoints(checkpoints: Iterable[Checkpoint], hashes: Mapping[int, str], *, last_seq: int,
                       public_key: ed25519.Ed25519PublicKey | None, interval: int) -> CheckpointReport:
    """Check every checkpoint against ``public_key`` and the chain (pure).

    ``hashes`` maps a ``seq`` to the hash the chain holds for it (at least every checkpoint's seq that
    exists); ``last_seq`` is the newest entry. A checkpoint fails if another key signed it, its
    signature does not verify, its entry is gone or its head hash differs from the chain's.
    """
    problems: list[str] = []
    last_good: Checkpoint | None = None
    checked = 0
    for cp in sorted(checkpoints, key=lambda c: (c.seq, c.id)):
        checked += 1
        problem = signature_problem(cp, public_key)
        if problem is None:
            actual = hashes.get(cp.seq)
            if actual is None or cp.seq > last_seq:
                problem = f"{cp.describe()}: entry {cp.seq} is not in the chain (entries were deleted)"
            elif not hmac.compare_digest(actual, cp.head_hash):
                problem = (f"{cp.describe()}: the chain was rewritten: entry {cp.seq} has hash "
                           f"{actual[:16]}..., the checkpoint signed {cp.head_hash[:16]}...")
        if problem is None:
            last_good = cp
        else:
            problems.append(problem)
    covered = last_good.seq if last_good is not None else 0
    if not problems and last_seq - covered > interval:
        problems.append(f"entries {covered + 1}-{last_seq} are covered by no good checkpoint, though one is "
                        f"signed at least every {interval} entries (checkpoints deleted or failing)")
    return CheckpointReport(checked, last_good, tuple(problems))
