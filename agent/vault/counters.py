"""The vault's state file: accepted model versions and quota counters, rollback-protected.

``<state_dir>/vault/state.json`` holds, in one signed body (:class:`VaultState`):

* ``versions``: the highest accepted version per model (the package store's high-water marks);
* ``counters``: each model's quota counters (:class:`~agent.inference.limits.CounterState` fields:
  lease and daily usage, per client);
* ``audit_head``: the head of the audit log's hash chain at the time of the save;
* ``generation``: tied to the TPM NV monotonic counter (TPM2_NT_COUNTER, it only increases).

The body is authenticated by a TPM2_Certify signature by the AK (:class:`agent.vault.keys.StateSigner`),
so it cannot be edited or written off the device. Restoring an *older* signed file (to win back quota
or to make an old model version acceptable again) is caught by the generation:

1. **save**: ``nv = NV``; write the state with ``generation = nv + 1`` atomically (temp file, fsync,
   ``os.replace``); *then* TPM2_NV_Increment, so NV == generation.
2. **load**: the signature must verify; ``generation`` must be NV (normal) or NV + 1 (written, then the
   device stopped before the increment: increment once to catch up). Older: a restored file,
   :class:`~agent.inference.RollbackError`. Further ahead: not this TPM's state, also refused.
3. **first start** (NV counter not defined and no state file): define the counter (it starts at the
   highest value any counter of the TPM ever had, not at zero), write generation = NV.

A state file that is missing while the NV counter exists was deleted (to reset the counters): refused
too. Each save costs one NV write and one AK signature; TPM NV has a finite write endurance, so the
vault saves every N served requests or T seconds and at stop, never per request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.inference import RollbackError
from agent.inference.limits import CLIENT_ID_RE, LEASE_ID_RE, CounterState, advance_generation
from agent.statefile import read_optional, write_atomic
from agent.tpm.interface import AgentTpm
from agent.vault.keys import StateSignature, StateSigner
from protocol.encoding import JsonValue, b64decode, b64encode, canonical_bytes, decode_object
from protocol.errors import EdgeError, MalformedInputError, MessageError, TpmError
from protocol.messages import MODEL_NAME_RE, VERSION_RE, Fields

__all__ = ["STATE_FILE", "SavePolicy", "StateKeeper", "VaultState"]

STATE_FILE = "state.json"
STATE_CONTEXT = b"edge-attest/vault-state/v1\x00"
MAX_STATE_SIZE = 1 << 20
MAX_MODELS = 256

TpmGetter = Callable[[], AgentTpm]


def _counters_to_json(cs: CounterState) -> dict[str, object]:
    return {"generation": cs.generation, "day": cs.day, "day_used": cs.day_used, "lease_id": cs.lease_id,
            "lease_used": cs.lease_used, "clients": {cid: n for cid, n in cs.clients}}


def _counters_from_json(obj: JsonValue, where: str) -> CounterState:
    f = Fields(obj, where)
    generation = f.integer("generation")
    day = f.integer("day", hi=10**7)
    day_used = f.integer("day_used")
    lease_id = f.text("lease_id", max_len=64, pattern=LEASE_ID_RE)
    lease_used = f.integer("lease_used")
    raw = f.raw("clients")
    f.done()
    if not isinstance(raw, dict) or len(raw) > 4096:
        raise MessageError(f"{where}.clients: expected an object of at most 4096 clients")
    clients = []
    for cid, n in raw.items():
        if not CLIENT_ID_RE.fullmatch(cid) or not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise MessageError(f"{where}.clients: invalid entry")
        clients.append((cid, n))
    return CounterState(generation=generation, day=day, day_used=day_used, lease_id=lease_id,
                        lease_used=lease_used, clients=tuple(sorted(clients)))


@dataclass(frozen=True, slots=True)
class VaultState:
    """What the state file holds (see the module docstring)."""

    generation: int
    versions: Mapping[str, str] = field(default_factory=dict)
    counters: Mapping[str, CounterState] = field(default_factory=dict)
    audit_head: bytes = b""

    def body(self) -> bytes:
        """The canonical JSON body (what is hashed and certified)."""
        return canonical_bytes({
            "v": 1, "generation": self.generation,
            "versions": dict(sorted(self.versions.items())),
            "counters": {name: _counters_to_json(cs) for name, cs in sorted(self.counters.items())},
            "audit_head": b64encode(self.audit_head),
        })

    @classmethod
    def from_body(cls, body: bytes) -> VaultState:
        """Strictly parse a body (after its signature was verified)."""
        f = Fields(decode_object(body, max_size=MAX_STATE_SIZE), "vault-state")
        if f.integer("v", hi=1000) != 1:
            raise MessageError("vault-state: unsupported version")
        generation = f.integer("generation")
        versions_raw, counters_raw = f.raw("versions"), f.raw("counters")
        head = f.blob("audit_head", max_len=32)
        f.done()
        if not isinstance(versions_raw, dict) or not isinstance(counters_raw, dict) \
                or max(len(versions_raw), len(counters_raw)) > MAX_MODELS:
            raise MessageError("vault-state: versions and counters must be objects of at most "
                               f"{MAX_MODELS} models")
        versions: dict[str, str] = {}
        for name, version in versions_raw.items():
            valid = isinstance(version, str) and VERSION_RE.fullmatch(version) is not None
            if not (MODEL_NAME_RE.fullmatch(name) and valid):
                raise MessageError("vault-state.versions: invalid entry")
            versions[name] = version
        counters: dict[str, CounterState] = {}
        for name, obj in counters_raw.items():
            if not MODEL_NAME_RE.fullmatch(name):
                raise MessageError("vault-state.counters: invalid model name")
            cs = _counters_from_json(obj, f"vault-state.counters.{name}")
            if cs.generation != generation:
                raise MessageError(f"vault-state.counters.{name}: generation differs from the state's")
            counters[name] = cs
        return cls(generation=generation, versions=versions, counters=counters, audit_head=head)


def state_digest(body: bytes) -> bytes:
    """What the AK certifies: SHA-256 over a context string and the body."""
    return hashlib.sha256(STATE_CONTEXT + body).digest()


def _check_generation(generation: int, nv: int) -> None:
    # The rule of agent.inference.limits.check_generation, for the state as a whole.
    if generation < nv:
        raise RollbackError(f"vault state generation {generation} is older than the TPM NV counter {nv}: "
                            "an old state file was restored")
    if generation > nv + 1:
        raise RollbackError(f"vault state generation {generation} is ahead of the TPM NV counter {nv} by "
                            "more than one save: not this TPM's state")


@dataclass(frozen=True, slots=True)
class SavePolicy:
    """When to save: after ``every_requests`` served requests, or ``every_seconds`` after a change."""

    every_requests: int = 1000
    every_seconds: float = 60.0

    def due(self, *, requests: int, changed: bool, last_save: float, now: float) -> bool:
        """True if a save is due (pure)."""
        if requests >= self.every_requests:
            return True
        return changed and (now - last_save >= self.every_seconds or now < last_save)


class StateKeeper:
    """Loads and saves the state file against the TPM NV counter (see the module docstring).

    Not thread-safe: the vault calls it from its own thread (and at stop).
    """

    def __init__(self, folder: Path, tpm: TpmGetter, signer: StateSigner) -> None:
        self.path = Path(folder) / STATE_FILE
        self._tpm = tpm
        self._signer = signer
        self.generation = -1    # NV value the last save (or load) left
        self._written = -1      # generation of the last file written (may be ahead by one)

    # -- NV counter --------------------------------------------------------------------------------
    def _read_nv(self) -> int | None:
        try:
            return self._tpm().counter_read()
        except TpmError as exc:
            # The adapter reports an undefined index as TpmError without a TPM response code (it asks
            # TPM2_GetCapability first); any TPM or transport failure carries one.
            if exc.rc is None and "not defined" in exc.diagnostics():
                return None
            raise

    # -- file --------------------------------------------------------------------------------------
    def _write(self, state: VaultState, *, create: bool = False) -> None:
        body = state.body()
        sig = self._signer.sign(state_digest(body), create=create)
        doc = {"format": 1, "body": b64encode(body), "attest": b64encode(sig.attest),
               "signature": b64encode(sig.signature)}
        write_atomic(self.path, (json.dumps(doc, sort_keys=True) + "\n").encode())
        self._written = state.generation

    def _read(self) -> VaultState:
        data = read_optional(self.path, max_size=MAX_STATE_SIZE * 2)
        if data is None:
            raise RollbackError(f"{self.path} is missing")
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != 1 or set(doc) != {"format", "body", "attest",
                                                                                   "signature"}:
                raise MalformedInputError("unsupported format")
            body = b64decode(doc["body"], field="body", max_len=MAX_STATE_SIZE)
            sig = StateSignature(attest=b64decode(doc["attest"], field="attest", max_len=4096),
                                 signature=b64decode(doc["signature"], field="signature", max_len=4096))
        except (ValueError, MalformedInputError) as exc:
            raise RollbackError(f"{self.path} is not a vault state file ({exc})") from None
        try:
            self._signer.verify(state_digest(body), sig)
        except TpmError:
            raise
        except EdgeError as exc:  # VerificationError, or the state key's files gone (StorageError)
            raise RollbackError(f"{self.path} does not verify: {exc.diagnostics()} (altered, written off the "
                                "device, or from another device)") from None
        try:
            return VaultState.from_body(body)
        except MalformedInputError as exc:
            raise RollbackError(f"{self.path}: {exc.diagnostics()}") from None

    # -- the protocol ------------------------------------------------------------------------------
    def load(self) -> VaultState:
        """Load (or, on the first start, create) the state; :class:`RollbackError` if it is not the
        latest. A :class:`~protocol.errors.TpmError` means the TPM could not be asked (retry later)."""
        nv = self._read_nv()
        exists = self.path.exists()
        if nv is None:
            if exists:
                raise RollbackError(f"{self.path} exists but the TPM has no NV counter for it (TPM cleared, "
                                    "or the state comes from another device)")
            tpm = self._tpm()
            tpm.counter_define()
            nv = tpm.counter_read()
            state = VaultState(generation=nv)
            self._write(state, create=True)
            self.generation = nv
            return state
        if not exists:
            raise RollbackError(f"{self.path} is missing but the TPM NV counter exists (value {nv}): the "
                                "state file was deleted; quotas and version marks cannot be trusted")
        state = self._read()
        _check_generation(state.generation, nv)
        if state.generation == nv + 1:  # written, then stopped before the increment: catch up
            nv = self._tpm().counter_increment()
            _check_generation(state.generation, nv)
        self.generation = self._written = state.generation
        return state

    def save(self, versions: Mapping[str, str], counters: Mapping[str, CounterState], audit_head: bytes = b"",
             *, on_written: Callable[[VaultState], None] | None = None) -> VaultState:
        """Write the next generation, then increment the NV counter; returns what was written.

        ``on_written`` runs after the file is written and before the increment (the vault tells its
        guards the counters are saved: a crash now leaves a file one ahead, which loading accepts).
        Raises :class:`RollbackError` if the NV counter moved without this keeper (another process
        incremented it, or the state was replaced under the running agent).
        """
        if self.generation < 0:
            raise RollbackError("the vault state was not loaded")
        tpm = self._tpm()
        nv = tpm.counter_read()
        if nv not in (self.generation, self._written):
            raise RollbackError(f"the TPM NV counter is {nv}, the vault last saved generation "
                                f"{self._written}: something else changed it")
        new = nv + 1
        advanced = {name: replace(advance_generation(cs, nv_counter=nv), generation=new)
                    for name, cs in counters.items()}
        state = VaultState(generation=new, versions=dict(versions), counters=advanced, audit_head=audit_head)
        self._write(state)
        if on_written is not None:
            on_written(state)
        value = tpm.counter_increment()
        if value != new:
            raise RollbackError(f"the TPM NV counter is {value} after the increment, expected {new}")
        self.generation = new
        return state
