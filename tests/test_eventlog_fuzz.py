"""Property tests for the event log parser (hypothesis; reproducible: derandomized, no example database).

Properties:
* Any input either parses to an :class:`EventLog` that satisfies the structural invariants, replays and
  describes without error, or raises :class:`EventLogError` with a one-line message naming an event
  index and an offset inside the input.  Nothing else escapes (no IndexError, struct.error, ...).
* Logs generated here from a model of events parse back to exactly that model, and their replay equals
  the straightforward reference replay below, which works from the model, not from parsed bytes.
* Parsing a log in pieces with ``extend_eventlog`` equals parsing it whole.

12,000 examples in all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleet_server.verifier.eventlog import EventLog, describe_event, extend_eventlog, parse_eventlog, replay
from protocol.errors import EventLogError

# Reproducible in CI: a fixed derivation of examples, no example database, no wall-clock deadline.
REPRODUCIBLE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_POST_CODE = 0x1
EV_IPL = 0xD
EV_S_CRTM_VERSION = 0x8
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_HCRTM_EVENT = 0x80000010
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

# Known hash algorithms: TPM id -> (bank, size); and one the project does not know.
KNOWN = {0x0004: ("sha1", 20), 0x000B: ("sha256", 32), 0x000C: ("sha384", 48), 0x000D: ("sha512", 64)}
UNKNOWN_ALG = (0x7E57, 24)


BOOLS = st.booleans()
_T = TypeVar("_T")


# --- the property every input must satisfy -------------------------------------------------------------


def check(data: bytes, **kwargs: bool) -> EventLog | None:
    """Parse ``data``: an EventLog meeting the invariants, or None after a well-formed EventLogError."""
    try:
        log = parse_eventlog(data, **kwargs)
    except EventLogError as exc:
        text = str(exc)
        assert text and "\n" not in text and exc.diagnostics() == text
        assert exc.index is not None and exc.offset is not None
        assert 0 <= exc.offset <= len(data)
        assert text.startswith(f"event {exc.index}, offset {exc.offset}: ")
        event("rejected: " + " ".join(w for w in text.split(": ", 1)[1].split()[:3] if not w.isdigit()))
        return None
    event(f"parsed ({log.format})")
    assert log.size == len(data)
    assert log.format in ("crypto-agile", "sha1")
    # Bounded work: every record is at least 16 bytes (crypto-agile) or 32 (SHA-1).
    assert len(log.events) <= len(data) // 16 + 1
    previous_end = 0
    for position, ev in enumerate(log.events):
        assert ev.index == position
        assert ev.offset >= previous_end
        assert 0 <= ev.pcr <= 0xFFFFFFFF  # indices over 23 are kept but not extended (issue 9)
        previous_end = ev.offset + len(ev.data)
    assert previous_end <= log.size - log.padding
    sizes = dict(zip(log.banks, log.digest_sizes.values(), strict=True))
    for ev in log.events[1:] if log.format == "crypto-agile" else log.events:
        assert ev.digests and all(len(d) == sizes[b] for b, d in ev.digests.items())
    values = replay(log)
    assert all(0 <= p < 24 and len(v) == sizes[b] for b, pcrs in values.items() for p, v in pcrs.items())
    for ev in log.events:
        json.dumps(describe_event(ev))
    return log


# --- 1. random bytes ----------------------------------------------------------------------------------


@settings(REPRODUCIBLE, max_examples=3500)
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    check(data)


def spec_header(pairs: list[tuple[int, int]]) -> bytes:
    body = (b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(pairs))
            + b"".join(struct.pack("<HH", a, s) for a, s in pairs) + b"\0")
    return struct.pack("<II20sI", 0, EV_NO_ACTION, bytes(20), len(body)) + body


SHA1_SHA256 = spec_header([(0x0004, 20), (0x000B, 32)])


@settings(REPRODUCIBLE, max_examples=2000)
@given(st.binary(max_size=1024), st.booleans())
def test_random_bytes_after_a_valid_header(tail: bytes, verify: bool) -> None:
    check(SHA1_SHA256 + tail, verify_digests=verify, allow_padding=not verify)


# --- 2. mutations of the real logs --------------------------------------------------------------------

@functools.cache
def load_logs(folder: str) -> tuple[tuple[bytes, tuple[int, ...]], ...]:
    """(log bytes, offsets of its length/count fields) for every real log in ``folder``."""
    result = []
    for path in sorted(Path(folder).glob("*.bin")):
        data = path.read_bytes()
        result.append((data, length_fields(parse_eventlog(data))))
    assert result, f"no logs in {folder}"
    return tuple(result)


def length_fields(log: EventLog) -> tuple[int, ...]:
    """Offsets of every UINT32 size/count field of ``log`` (computed independently from the layout)."""
    fields: list[int] = []
    for ev in log.events:
        if log.format == "sha1" or ev.index == 0:
            fields.append(ev.offset + 28)  # eventDataSize
            if ev.index == 0 and log.format == "crypto-agile":
                fields.append(ev.offset + 32 + 24)  # numberOfAlgorithms
        else:
            fields.append(ev.offset + 8)  # TPML_DIGEST_VALUES.count
            fields.append(ev.offset + 12 + sum(2 + len(d) for d in ev.digests.values()))  # eventSize
    return tuple(fields)


INTERESTING_U32 = [0, 1, 2, 3, 4, 16, 23, 24, 0x7F, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                   0xFFFFFFF0, 0xFFFFFFFF]
# Positions are drawn from fixed ranges and reduced modulo the size of the chosen log, so that no
# strategy is built per example (that would dominate the run time).
ANY = st.integers(0, 2**24)
FLIPS = st.lists(st.tuples(ANY, st.integers(0, 7)), min_size=1, max_size=8)
FIELD_PICKS = st.lists(ANY, max_size=3)
HOW = st.integers(0, 2)
SPECIAL_U32 = st.sampled_from(INTERESTING_U32)
U32 = st.integers(0, 0xFFFFFFFF)
DELTAS = st.integers(-64, 64)
SPLICE_KINDS = st.sampled_from(["insert", "replace", "join", "repeat", "pad"])
FILLS = st.sampled_from([b"\0", b"\xff"])
SPAN = st.integers(0, 4096)


def pick(data: st.DataObject, items: tuple[_T, ...], label: str) -> _T:
    return items[data.draw(ANY, label=label) % len(items)]


@settings(REPRODUCIBLE, max_examples=1500)
@given(st.data())
def test_bit_flips_in_real_logs(shared_eventlogs: Path, data: st.DataObject) -> None:
    log, _ = pick(data, load_logs(str(shared_eventlogs)), "log")
    mutated = bytearray(log)
    for position, bit in data.draw(FLIPS, label="flips"):
        mutated[position % len(log)] ^= 1 << bit
    check(bytes(mutated), verify_digests=data.draw(BOOLS, label="verify"))


@settings(REPRODUCIBLE, max_examples=1500)
@given(st.data())
def test_length_field_overwrites_and_truncations(shared_eventlogs: Path, data: st.DataObject) -> None:
    log, fields = pick(data, load_logs(str(shared_eventlogs)), "log")
    mutated = bytearray(log)
    for choice in data.draw(FIELD_PICKS, label="fields"):
        field = fields[choice % len(fields)]
        old: int = struct.unpack_from("<I", mutated, field)[0]
        how = data.draw(HOW, label="how")
        if how == 0:
            new = data.draw(SPECIAL_U32, label="value")
        elif how == 1:
            new = data.draw(U32, label="value")
        else:  # near the true value: off-by-a-few errors are the subtle ones
            new = (old + data.draw(DELTAS, label="delta")) % 2**32
        struct.pack_into("<I", mutated, field, new)
    cut = len(mutated)
    if data.draw(BOOLS, label="truncate"):
        cut -= data.draw(ANY, label="cut") % (len(mutated) + 1)
    check(bytes(mutated[:cut]), verify_digests=data.draw(BOOLS, label="verify"))


@settings(REPRODUCIBLE, max_examples=1000)
@given(st.data())
def test_splices_of_real_logs(shared_eventlogs: Path, data: st.DataObject) -> None:
    logs = tuple(log for log, _ in load_logs(str(shared_eventlogs)))
    a = pick(data, logs, "a")
    b = pick(data, logs, "b")
    i = data.draw(ANY, label="i") % (len(a) + 1)
    j = data.draw(ANY, label="j") % (len(b) + 1)
    k = min(len(b), j + data.draw(SPAN, label="span"))
    kind = data.draw(SPLICE_KINDS, label="kind")
    if kind == "insert":
        spliced = a[:i] + b[j:k] + a[i:]
    elif kind == "replace":
        spliced = a[:i] + b[j:k] + a[i + (k - j):]
    elif kind == "join":
        spliced = a[:i] + b[j:]
    elif kind == "repeat":
        spliced = a[:i] + a[i : i + 200] * 3 + a[i + 200 :]
    else:
        spliced = a[:i] + data.draw(FILLS, label="fill") * (k - j + 1)
    check(spliced, allow_padding=data.draw(BOOLS, label="padding"))


# --- 3. structured logs from a model, replayed independently --------------------------------------------


@dataclass(frozen=True)
class Model:
    """What a generated log contains, before encoding."""

    format: str
    pairs: tuple[tuple[int, int], ...]  # header (alg, size), in order
    events: tuple[tuple[int, int, tuple[tuple[int, bytes], ...], bytes], ...]  # pcr, type, digests, data
    startup_locality: int | None


def uefi_variable(name: str, value: bytes) -> bytes:
    return bytes(range(16)) + struct.pack("<QQ", len(name), len(value)) + name.encode("utf-16-le") + value


# Strategies are built once: building them inside the composite would dominate the run time.
SMALL = st.integers(0, 3)
PCRS = st.integers(0, 23)
KINDS = st.integers(0, 9)
SEEDS = st.integers(0, 2**16)
COUNT = st.integers(0, 12)
ALG_LISTS = st.lists(st.sampled_from([*KNOWN, UNKNOWN_ALG[0]]), min_size=1, max_size=5, unique=True)
LOCALITIES = st.one_of(st.none(), st.sampled_from([0, 3, 4]))
SEPARATORS = st.sampled_from([bytes(4), b"\x01\0\0\0", b"\xff" * 4])
ACTIONS = st.text(max_size=40)
NAMES = st.text("ABCDEFGHIJ0123", max_size=8)
BLOBS = {n: st.binary(max_size=n) for n in (8, 32, 64, 100)}
OTHER_TYPES = st.sampled_from([EV_POST_CODE, EV_IPL, EV_EFI_BOOT_SERVICES_APPLICATION,
                               EV_EFI_VARIABLE_AUTHORITY, 0x12345678, 0x80000000, 0])


def pseudo_digest(seed: int, size: int) -> bytes:
    """Digest-sized bytes for events whose digest the parser cannot check (seed 0: all zero)."""
    return bytes(size) if seed == 0 else (hashlib.sha512(seed.to_bytes(4, "little")).digest() * 2)[:size]


@st.composite
def models(draw: st.DrawFn) -> Model:
    legacy = draw(st.integers(0, 4), label="format") == 0  # one log in five is a SHA-1 log
    if legacy:
        pairs: tuple[tuple[int, int], ...] = ((0x0004, 20),)
    else:
        algs = draw(ALG_LISTS, label="algorithms")
        pairs = tuple((a, KNOWN[a][1] if a in KNOWN else UNKNOWN_ALG[1]) for a in algs)
    size_of = dict(pairs)
    order = [a for a, _ in pairs]

    def digests_for(payload: bytes | None) -> tuple[tuple[int, bytes], ...]:
        chosen = list(order)
        if not legacy and draw(SMALL) == 0:  # one event in four: a rotated, maybe partial, bank list
            turn = draw(SMALL) % len(chosen)
            chosen = chosen[turn:] + chosen[:turn]
            chosen = chosen[: 1 + draw(SMALL) % len(chosen)]
        out = []
        for alg in chosen:
            if payload is not None and alg in KNOWN:
                out.append((alg, hashlib.new(KNOWN[alg][0], payload).digest()))
            else:
                out.append((alg, pseudo_digest(draw(SEEDS), size_of[alg])))
        return tuple(out)

    events = []
    locality = draw(LOCALITIES, label="locality")
    if locality is not None:
        events.append((0, EV_NO_ACTION, digests_for(None), b"StartupLocality\0" + bytes([locality])))
    if draw(SMALL) == 0 and draw(BOOLS):
        events.append((0, EV_EFI_HCRTM_EVENT, digests_for(None), b"HCRTM"))
    for _ in range(draw(COUNT, label="n")):
        pcr = draw(PCRS)
        kind = draw(KINDS)
        if kind == 0:
            data = draw(SEPARATORS)
            events.append((pcr, EV_SEPARATOR, digests_for(data), data))
        elif kind == 1:
            data = draw(ACTIONS).encode()
            events.append((pcr, EV_EFI_ACTION, digests_for(data), data))
        elif kind == 2:
            data = uefi_variable(draw(NAMES), draw(BLOBS[64]))
            events.append((pcr, EV_EFI_VARIABLE_DRIVER_CONFIG, digests_for(data), data))
        elif kind == 3:
            value = draw(BLOBS[32])
            data = uefi_variable("Boot0001", value)
            measured = data if draw(BOOLS) else value  # the PFP's choice or EDK II's
            events.append((pcr, EV_EFI_VARIABLE_BOOT, digests_for(measured), data))
        elif kind == 4:
            data = draw(BLOBS[8])
            events.append((pcr, EV_S_CRTM_VERSION, digests_for(data), data))
        elif kind == 5:
            data = b"EFI PART" + draw(BLOBS[100])
            events.append((pcr, EV_EFI_GPT_EVENT, digests_for(data), data))
        elif kind == 6:  # EV_NO_ACTION: never extended (zero digests, as the PFP asks)
            data = b"NvIndexInstance\0" + draw(BLOBS[8])
            events.append((pcr, EV_NO_ACTION, tuple((a, bytes(s)) for a, s in pairs), data))
        else:  # digests the parser cannot check
            events.append((pcr, draw(OTHER_TYPES), digests_for(None), draw(BLOBS[64])))
    if legacy:  # an all-zero SHA-1 record ends a log (it only counts as padding)
        events = [e for e in events if not (e[0] == 0 and e[1] == 0 and not e[3] and e[2][0][1] == bytes(20))]
        if not events:
            events.append((0, EV_POST_CODE, digests_for(None), b"only event"))
    return Model("sha1" if legacy else "crypto-agile", pairs, tuple(events), locality)


def encode(model: Model) -> bytes:
    """Encode ``model`` per PFP 10.2.1 / 10.2.2 (independent of the parser's code)."""
    if model.format == "sha1":
        return b"".join(struct.pack("<II20sI", pcr, etype, digests[0][1], len(data)) + data
                        for pcr, etype, digests, data in model.events)
    out = [spec_header(list(model.pairs))]
    for pcr, etype, digests, data in model.events:
        out.append(struct.pack("<III", pcr, etype, len(digests))
                   + b"".join(struct.pack("<H", alg) + d for alg, d in digests)
                   + struct.pack("<I", len(data)) + data)
    return b"".join(out)


def reference_replay(model: Model) -> dict[str, dict[int, bytes]]:
    """Textbook replay of the model: PCR = H(PCR || digest), initial values from the PC Client PTP."""
    result: dict[str, dict[int, bytes]] = {}
    for alg, size in model.pairs:
        if alg not in KNOWN:
            continue
        bank = KNOWN[alg][0]
        pcrs = {i: (b"\xff" * size if 17 <= i <= 22 else bytes(size)) for i in range(24)}
        reported: set[int] = set()
        if model.startup_locality is not None:
            pcrs[0] = bytes(size - 1) + bytes([model.startup_locality])
            reported.add(0)
        pcr0_extended = False
        for pcr, etype, digests, _ in model.events:
            if etype == EV_NO_ACTION:
                continue
            if etype == EV_EFI_HCRTM_EVENT and pcr == 0 and not pcr0_extended:
                pcrs[0] = bytes(size - 1) + b"\x04"
                reported.add(0)
            if pcr == 0:
                pcr0_extended = True
            for digest_alg, digest in digests:
                if digest_alg == alg:
                    pcrs[pcr] = hashlib.new(bank, pcrs[pcr] + digest).digest()
                    reported.add(pcr)
        result[bank] = {p: pcrs[p] for p in sorted(reported)}
    return result


def expected_to_parse(model: Model) -> bool:
    """Whether the model obeys the ordering rules for H-CRTM (the generator may break them)."""
    seen_pcr0 = False
    for pcr, etype, _, _ in model.events:
        if etype == EV_EFI_HCRTM_EVENT and pcr == 0 and seen_pcr0:
            return False
        if pcr == 0 and etype != EV_NO_ACTION:
            seen_pcr0 = True
    return True


@settings(REPRODUCIBLE, max_examples=2000)
@given(models())
def test_generated_logs_parse_to_their_model_and_replay_like_the_reference(model: Model) -> None:
    data = encode(model)
    log = check(data)
    if not expected_to_parse(model):
        assert log is None
        return
    assert log is not None, model
    assert log.format == model.format
    assert log.startup_locality == model.startup_locality
    parsed = log.events[1:] if model.format == "crypto-agile" else log.events
    assert len(parsed) == len(model.events)
    names = {a: KNOWN[a][0] if a in KNOWN else f"alg_0x{a:04x}" for a, _ in model.pairs}
    for ev, (pcr, etype, digests, payload) in zip(parsed, model.events, strict=True):
        assert (ev.pcr, ev.type, ev.data) == (pcr, etype, payload)
        assert dict(ev.digests) == {names[a]: d for a, d in digests}
    assert replay(log) == reference_replay(model)


@settings(REPRODUCIBLE, max_examples=1000)
@given(models(), st.data())
def test_generated_logs_split_anywhere_on_event_boundaries(model: Model, data: st.DataObject) -> None:
    raw = encode(model)
    log = check(raw)
    if log is None:
        return
    bounds = [ev.offset for ev in log.events[1:]] + [len(raw)]
    cuts = sorted(set(data.draw(st.lists(st.sampled_from(bounds), min_size=1, max_size=4), label="cuts")))
    piecewise = parse_eventlog(raw[: cuts[0]])
    for start, stop in zip(cuts, [*cuts[1:], len(raw)], strict=True):
        piecewise = extend_eventlog(piecewise, raw[start:stop])
    assert piecewise == log


@settings(REPRODUCIBLE, max_examples=1500)
@given(models(), st.data())
def test_corrupted_generated_logs(model: Model, data: st.DataObject) -> None:
    raw = bytearray(encode(model))
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        position = data.draw(ANY, label="position") % len(raw)
        raw[position] = data.draw(st.integers(0, 255), label="byte")
    cut = len(raw)
    if data.draw(BOOLS, label="truncate"):
        cut -= data.draw(ANY, label="cut") % (len(raw) + 1)
    check(bytes(raw[:cut]), verify_digests=data.draw(BOOLS, label="verify"))
