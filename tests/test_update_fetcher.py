"""The agent's TUF transport (:class:`agent.update.mqtt_fetcher.MqttFetcher`) and client
(:class:`agent.update.tuf_client.UpdateClient`) against a real python-tuf repository, with an
in-process stand-in for the broker and worker that implements the fetcher's real ``Publisher``
interface (the end-to-end tests over Mosquitto are in ``test_update_mqtt.py``): matching of answers,
timeouts, URL mapping, errors in the project's hierarchy, and configuration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import DownloadError, DownloadHTTPError, SlowRetrievalError

from agent.config import parse_config
from agent.update.mqtt_fetcher import METADATA_BASE_URL, TARGET_BASE_URL, MqttFetcher, repository_path
from agent.update.tuf_client import UpdateClient
from protocol import topics
from protocol.errors import ConfigError, UpdateError, UpdateVerificationError
from protocol.messages import TufChunk, TufFetch, decode_plain, encode_tuf_chunk, new_message_id

pytest.register_assert_rewrite("tuf_fixtures")
from tuf_fixtures import TestRepository  # noqa: E402

TARGET = "firmware/edge-camera/1.3.0.fwb"


class LoopbackServer:
    """Answers each ``tuf-fetch`` at once from ``repo`` (like the worker), optionally preceded by the
    frames ``noise`` returns (wrong ids, wrong offsets) and optionally silent."""

    def __init__(self, repo: TestRepository, device_id: str = "dev-a") -> None:
        self.repo = repo
        self.topic = topics.device_up(device_id, "tuf-fetch")
        self.fetcher: MqttFetcher | None = None
        self.noise: Callable[[TufFetch], list[TufChunk]] = lambda fetch: []
        self.silent = False
        self.seen: list[TufFetch] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Any:
        assert topic == self.topic and qos == 1
        fetch = decode_plain(payload, allowed=(TufFetch,)).message
        assert isinstance(fetch, TufFetch)
        self.seen.append(fetch)
        assert self.fetcher is not None
        for frame in self.noise(fetch):
            self.fetcher.deliver(encode_tuf_chunk(frame))
        if self.silent:
            return None
        data = self.repo.read_file(fetch.path)
        if data is None:
            chunk = TufChunk(fetch.request_id, fetch.path, "not_found", 0, 0, b"")
        else:
            chunk = TufChunk(fetch.request_id, fetch.path, "ok", fetch.offset, len(data),
                             data[fetch.offset : fetch.offset + fetch.length])
        self.fetcher.deliver(encode_tuf_chunk(chunk))
        return None


@pytest.fixture
def repository(tmp_path: Path) -> TestRepository:
    repo = TestRepository(tmp_path / "repo")
    repo.add_target(TARGET, b"firmware image " * 700, {"version": "1.3.0", "class": "edge-camera"})
    return repo


def _fetcher(server: LoopbackServer, **options: Any) -> MqttFetcher:
    options.setdefault("chunk", 1024)
    fetcher = MqttFetcher(server, "dev-a", **options)
    server.fetcher = fetcher
    return fetcher


def test_a_file_arrives_in_chunks_and_unrelated_answers_are_ignored(repository: TestRepository) -> None:
    server = LoopbackServer(repository)
    fetcher = _fetcher(server)

    def noise(fetch: TufFetch) -> list[TufChunk]:  # another request's answer, a wrong offset, too much data
        return [TufChunk(new_message_id(), fetch.path, "ok", fetch.offset, 5, b"x" * 5),
                TufChunk(fetch.request_id, fetch.path, "ok", fetch.offset + 1, 10_000, b"y"),
                TufChunk(fetch.request_id, fetch.path, "ok", fetch.offset, 1 << 20,
                         b"z" * (fetch.length + 1))]

    server.noise = noise
    url = TARGET_BASE_URL + str(repository.target_file(TARGET).relative_to(repository.folder / "targets"))
    data = fetcher.download_bytes(url, 20_000)
    assert data == b"firmware image " * 700
    assert [f.offset for f in server.seen] == [0, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192, 9216, 10240]
    assert fetcher.ignored == 3 * len(server.seen)
    assert fetcher.requests == len(server.seen)


def test_no_answer_is_a_slow_retrieval_after_the_attempts(repository: TestRepository) -> None:
    server = LoopbackServer(repository)
    server.silent = True
    fetcher = _fetcher(server, timeout=0.05, attempts=2)
    with pytest.raises(SlowRetrievalError, match="after 2 requests"):
        fetcher.download_bytes(METADATA_BASE_URL + "timestamp.json", 16384)
    assert len(server.seen) == 2 and server.seen[0].request_id != server.seen[1].request_id


def test_not_found_is_http_404_and_foreign_urls_are_refused(repository: TestRepository) -> None:
    fetcher = _fetcher(LoopbackServer(repository))
    with pytest.raises(DownloadHTTPError) as info:
        fetcher.download_bytes(METADATA_BASE_URL + "9.root.json", 1000)
    assert info.value.status_code == 404
    for url in ("https://fleet.example/metadata/1.root.json", METADATA_BASE_URL + "../keys/root.key",
                "mqtt://fleet/secrets/x.json", METADATA_BASE_URL + "a/../../b"):
        with pytest.raises(DownloadError, match="update repository"):
            fetcher.download_bytes(url, 1000)
    assert repository_path(METADATA_BASE_URL + "timestamp.json") == "metadata/timestamp.json"


def test_client_refreshes_downloads_and_maps_refusals(repository: TestRepository, tmp_path: Path) -> None:
    server = LoopbackServer(repository)
    client = UpdateClient(metadata_dir=tmp_path / "state" / "tuf", root=repository.root_bytes(),
                          fetcher=_fetcher(server, chunk=256 * 1024))
    client.refresh()
    target = client.fetch_target(TARGET, max_length=1 << 20)
    assert target.data == b"firmware image " * 700 and target.custom["version"] == "1.3.0"
    with pytest.raises(UpdateError, match="more than the 100 allowed"):
        client.fetch_target(TARGET, max_length=100)
    with pytest.raises(UpdateError, match=r"lists no target firmware/edge-camera/9\.9\.9\.fwb"):
        client.fetch_target("firmware/edge-camera/9.9.9.fwb", max_length=1 << 20)
    repository.write_target_file(TARGET, b"firmware IMAGE " * 700)  # same length, other bytes
    with pytest.raises(UpdateVerificationError, match="refused by TUF: LengthOrHashMismatchError"):
        client.fetch_target(TARGET, max_length=1 << 20)


def test_a_root_that_is_not_tuf_is_refused(tmp_path: Path, repository: TestRepository) -> None:
    with pytest.raises(UpdateVerificationError, match="loading the trusted update metadata"):
        UpdateClient(metadata_dir=tmp_path / "tuf", root=b'{"signed": {}, "signatures": []}',
                     fetcher=_fetcher(LoopbackServer(repository))).refresh()


def _config(tmp_path: Path, update: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(f"""
device_id = "dev-a"
device_class = "edge-camera"
firmware_version = "1.2.0"
state_dir = "{tmp_path / 'state'}"
[mqtt]
host = "localhost"
ca_cert = "ca.pem"
claim_cert = "claim.pem"
claim_key = "claim.key"
[server]
signing_public_key = "server.pem"
{update}
""")


def test_update_config_and_client_from_config(tmp_path: Path, repository: TestRepository) -> None:
    table = '[update]\nroot_file = "root.json"\nfetch_timeout = 2'
    config = parse_config(_config(tmp_path, table), base=tmp_path)
    assert config.update is not None and config.update.root_file == tmp_path / "root.json"
    assert config.update.fetch_timeout == 2.0 and config.update.fetch_chunk == 256 * 1024
    server = LoopbackServer(repository)
    with pytest.raises(ConfigError, match=r"update\.root_file: .* does not exist"):
        UpdateClient.from_config(config, server)
    (tmp_path / "root.json").write_bytes(repository.root_bytes())
    client = UpdateClient.from_config(config, server)
    server.fetcher = client.fetcher
    client.refresh()
    assert client.metadata_dir == tmp_path / "state" / "tuf"
    assert client.fetch_target(TARGET, max_length=1 << 20).path == TARGET
    assert parse_config(_config(tmp_path, ""), base=tmp_path).update is None
    with pytest.raises(ConfigError, match=r"update\.fetch_chunk: 10 is outside"):
        parse_config(_config(tmp_path, '[update]\nroot_file = "r"\nfetch_chunk = 10'), base=tmp_path)
    with pytest.raises(ConfigError, match=r"update\.colour: unknown key"):
        parse_config(_config(tmp_path, '[update]\nroot_file = "r"\ncolour = 1'), base=tmp_path)


def test_expired_or_badly_signed_metadata_is_refused(tmp_path: Path) -> None:
    import datetime as dt

    stale = TestRepository(tmp_path / "stale", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=8))
    client = UpdateClient(metadata_dir=tmp_path / "a", root=stale.root_bytes(),
                          fetcher=_fetcher(LoopbackServer(stale)))
    with pytest.raises(UpdateVerificationError, match="refused by TUF: ExpiredMetadataError"):
        client.refresh()
    forged = TestRepository(tmp_path / "forged")
    timestamp = forged.folder / "metadata" / "timestamp.json"
    timestamp.write_bytes(timestamp.read_bytes().replace(b'"version": 1', b'"version": 7', 1))
    client = UpdateClient(metadata_dir=tmp_path / "b", root=forged.root_bytes(),
                          fetcher=_fetcher(LoopbackServer(forged)))
    with pytest.raises(UpdateVerificationError, match="refused by TUF: UnsignedMetadataError"):
        client.refresh()
