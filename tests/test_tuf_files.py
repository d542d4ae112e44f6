"""The worker's ``tuf-fetch`` handling (:mod:`fleet_server.service.tuf_files`) through the real
:class:`~fleet_server.service.processor.Processor` and database, table-driven: who gets an answer,
which status, how much data, and on which topic (the MQTT path end to end: ``test_update_mqtt.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fleet_server.service.common import Counters, ManualClock
from fleet_server.service.context import ServiceContext
from fleet_server.service.processor import Processor
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import NewDevice, Repository
from protocol import topics
from protocol.messages import MAX_CHUNK, TufChunk, TufFetch, decode_tuf_chunk, encode_plain, new_message_id
from protocol.mqtt import InboundMessage

pytest.register_assert_rewrite("server_fixtures", "tuf_fixtures")
from tuf_fixtures import TestRepository  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures")

TARGET = "firmware/edge-camera/1.3.0.fwb"
IMAGE = bytes(range(256)) * 2048  # 512 KiB: more than one chunk


@pytest.fixture
def repository(tmp_path: Path) -> TestRepository:
    repo = TestRepository(tmp_path / "tuf-repo")
    repo.add_target(TARGET, IMAGE)
    return repo


def _device(repo: Repository, device_id: str, state: DeviceState, now: int) -> None:
    with repo.write() as tx:
        tx.insert_device(NewDevice(
            id=device_id, state=state, device_class="edge-camera", firmware_version="1.2.0", ek_cert=b"c",
            ek_fingerprint=hashlib.sha256(device_id.encode()).hexdigest(), ek_public=b"e", ak_public=b"a",
            ak_name=b"n", csr=None, enroll_request_id=None, cert_serial=None, now=now,
            next_attestation_at=None), cause="test")


def _ask(processor: Processor, clock: ManualClock, device_id: str, path: str, offset: int = 0,
         length: int = MAX_CHUNK) -> tuple[str, TufChunk] | None:
    fetch = TufFetch(request_id=new_message_id(), path=path, offset=offset, length=length)
    out = processor.handle_batch([InboundMessage(topics.device_up(device_id, "tuf-fetch"),
                                                 encode_plain(fetch, ts=clock.now_ms()), 1)])
    if not out:
        return None
    [reply] = out
    chunk = decode_tuf_chunk(reply.payload)
    assert chunk.request_id == fetch.request_id and chunk.path == path
    return reply.topic, chunk


STATES = [
    (DeviceState.ENROLLED, "ok"), (DeviceState.TRUSTED, "ok"), (DeviceState.UNTRUSTED, "ok"),
    (DeviceState.UNREACHABLE, "ok"), (DeviceState.PENDING, "error"), (DeviceState.REVOKED, "error"),
    (DeviceState.QUARANTINED, "error"),
]


@pytest.mark.parametrize(("state", "status"), STATES)
def test_which_device_states_are_served(state: DeviceState, status: str, ctx: ServiceContext,
                                        repo: Repository, repository: TestRepository,
                                        clock: ManualClock) -> None:
    processor = Processor(ctx, repo, Counters(), update_files=repository)
    _device(repo, "dev-a", state, clock.now_ms())
    answer = _ask(processor, clock, "dev-a", "metadata/timestamp.json")
    assert answer is not None
    topic, chunk = answer
    assert topic == topics.device_down("dev-a", "tuf-chunk") and chunk.status == status
    if status == "ok":
        assert chunk.data == repository.read_file("metadata/timestamp.json")
    else:
        assert processor.counters.get("rejected.device_held") == 1


def test_chunks_not_found_out_of_range_and_unknown_devices(
        ctx: ServiceContext, repo: Repository, repository: TestRepository, clock: ManualClock) -> None:
    processor = Processor(ctx, repo, Counters(), update_files=repository)
    _device(repo, "dev-a", DeviceState.TRUSTED, clock.now_ms())
    served = str(repository.target_file(TARGET).relative_to(repository.folder))
    cases = ((0, MAX_CHUNK, IMAGE[:MAX_CHUNK]), (MAX_CHUNK, 10, IMAGE[MAX_CHUNK:][:10]),
             (len(IMAGE) - 3, MAX_CHUNK, IMAGE[-3:]))
    for offset, length, expected in cases:
        answer = _ask(processor, clock, "dev-a", served, offset, length)
        assert answer is not None
        assert (answer[1].status, answer[1].offset, answer[1].total, answer[1].data) == (
            "ok", offset, len(IMAGE), expected)
    past_end = _ask(processor, clock, "dev-a", served, len(IMAGE))
    assert past_end is not None and past_end[1].status == "error"
    assert processor.counters.get("rejected.fetch_out_of_range") == 1
    missing = _ask(processor, clock, "dev-a", "metadata/7.root.json")
    assert missing is not None and (missing[1].status, missing[1].data) == ("not_found", b"")
    assert _ask(processor, clock, "nobody", "metadata/timestamp.json") is None  # no device row: no answer
    assert processor.counters.get("rejected.device_unknown") == 1
    # A worker without an update repository finds nothing.
    bare = Processor(ctx, repo, Counters())
    answer = _ask(bare, clock, "dev-a", "metadata/timestamp.json")
    assert answer is not None and answer[1].status == "not_found"


def test_a_target_changed_on_disk_is_served_as_it_is_not_from_the_cache(
        ctx: ServiceContext, repo: Repository, repository: TestRepository, clock: ManualClock) -> None:
    processor = Processor(ctx, repo, Counters(), update_files=repository)
    _device(repo, "dev-a", DeviceState.TRUSTED, clock.now_ms())
    served = str(repository.target_file(TARGET).relative_to(repository.folder))
    repository.write_target_file(TARGET, b"evil" + IMAGE[4:])
    first = _ask(processor, clock, "dev-a", served, 0, 4)
    assert first is not None and first[1].data == b"evil"  # served (TUF refuses it), but not cached
    repository.write_target_file(TARGET, IMAGE)
    second = _ask(processor, clock, "dev-a", served, 0, 4)
    assert second is not None and second[1].data == IMAGE[:4]
    (repository.folder / served).write_bytes(b"gone")  # the good bytes were cached: still served
    third = _ask(processor, clock, "dev-a", served, 0, 4)
    assert third is not None and third[1].data == IMAGE[:4]
