"""The model store (fleet_server/modelstore): publishing encrypted packages, the key-encryption key,
usage policies, and the `fleet-server model ...` commands (with `init` and `claim issue`).

The central property: the package verifies with the model-signing public key and decrypts to the
model with the data key the server holds sealed, and the database never contains that data key in
the clear (the SQLite files are scanned for it, raw, hex and base64).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from firmware_sim.testmodel import classifier_io_signature, small_classifier
from fleet_server.cli import main
from fleet_server.config import ServerConfig, load_config
from fleet_server.console.audit import AuditLog, cli_actor
from fleet_server.keys import create_model_signing_key, load_model_signing_key
from fleet_server.modelstore.kek import (
    KEK_ENV,
    DataKeyError,
    Kek,
    SealedKey,
    create_kek_file,
    load_kek,
    read_kek_file,
)
from fleet_server.modelstore.onnxio import inspect_onnx
from fleet_server.modelstore.policy import apply_settings, policy_from_mapping, policy_from_toml
from fleet_server.modelstore.store import PackageStore, Published, PublishError, publish_model
from fleet_server.storage.db import create_engine
from fleet_server.storage.model_repo import VersionRecord
from fleet_server.storage.repo import Repository
from protocol.errors import ConfigError, MalformedInputError
from protocol.messages import ModelPolicy, key_id
from protocol.modelpkg import decrypt_package, read_manifest

pytest_plugins = ("mqtt_fixtures", "server_fixtures")
pytestmark = pytest.mark.usefixtures("quiet_root_logging")
NOW = 1_790_000_000_000


@pytest.fixture
def kek() -> Kek:
    return Kek(secrets.token_bytes(32))


@pytest.fixture
def store(tmp_path: Path) -> PackageStore:
    return PackageStore(tmp_path / "models")


def _publish(repo: Repository, kek: Kek, store: PackageStore, tmp_path: Path, version: str = "1.0.0", *,
             model: bytes | None = None, name: str = "classifier",
             policy: ModelPolicy | None = None) -> Published:
    key_path = tmp_path / "keys" / "model-signing.key"
    signing = load_model_signing_key(key_path) if key_path.exists() else create_model_signing_key(key_path)
    return publish_model(repo, model=small_classifier() if model is None else model, name=name,
                         version=version, signing_key=signing, kek=kek, store=store, now=NOW, policy=policy)


def _data_key(kek: Kek, row: VersionRecord) -> bytearray:
    return kek.unseal(SealedKey(row.kek_id, row.data_key_nonce, row.encrypted_data_key), name=row.name,
                      version=row.version, package_id=bytes.fromhex(row.package_id))


def _database_bytes(config: ServerConfig) -> bytes:
    db = Path(config.database_url.split("///", 1)[1])
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())


def test_published_package_verifies_and_the_database_holds_no_plaintext_key(
        repo: Repository, kek: Kek, store: PackageStore, tmp_path: Path, server_config: ServerConfig) -> None:
    assert server_config.database_url.startswith("sqlite")  # the test scans the database files
    model = small_classifier(seed=3)
    published = _publish(repo, kek, store, tmp_path, model=model)
    row = repo.models.version("classifier", "1.0.0")
    assert row is not None and published.path == store.path("classifier", "1.0.0")
    package = published.path.read_bytes()
    assert stat.S_IMODE(published.path.stat().st_mode) == 0o644
    # Devices pin the public key file and verify the manifest with it.
    pub = serialization.load_pem_public_key((tmp_path / "keys" / "model-signing.pub.pem").read_bytes())
    manifest = read_manifest(package, trusted_keys={key_id(pub): pub})  # type: ignore[arg-type,dict-item]
    assert (manifest.name, manifest.version, manifest.plaintext_size) == ("classifier", "1.0.0", len(model))
    assert manifest.io_signature == classifier_io_signature()
    assert manifest.raw.decode() == row.manifest and manifest.package_id.hex() == row.package_id
    assert row.package_size == len(package) and row.package_sha256 == hashlib.sha256(package).digest()
    assert row.plaintext_sha256 == manifest.plaintext_sha256 and row.kek_id == kek.kid
    # The sealed key opens with the KEK and decrypts the package to the model.
    data_key = _data_key(kek, row)
    assert bytes(decrypt_package(package, manifest, bytes(data_key))) == model
    # Nowhere in the database files: not raw, not as hex, not as base64 ...
    blob = _database_bytes(server_config)
    for form in (bytes(data_key), bytes(data_key).hex().encode(), base64.b64encode(bytes(data_key))):
        assert form not in blob
    # ... while what is stored is found by the same scan (the scan works).
    assert row.encrypted_data_key in blob and row.package_sha256 in blob
    # Nor is the plaintext model in the package or the database.
    assert model[:64] not in package and model[:64] not in blob


def test_versions_must_increase(repo: Repository, kek: Kek, store: PackageStore, tmp_path: Path) -> None:
    _publish(repo, kek, store, tmp_path, "1.9.0")
    for stale in ("1.9.0", "1.8.99", "0.10.0"):
        with pytest.raises(PublishError, match=r"not newer than the newest published version 1\.9\.0"):
            _publish(repo, kek, store, tmp_path, stale)
    assert not store.path("classifier", "1.8.99").exists()
    _publish(repo, kek, store, tmp_path, "1.10.0")  # numeric, not textual, order
    assert [v.version for v in repo.models.versions("classifier")] == ["1.10.0", "1.9.0"]
    assert repo.models.newest("classifier").version == "1.10.0"  # type: ignore[union-attr]
    # Each version has its own data key and package id.
    rows = repo.models.versions("classifier")
    assert len({bytes(_data_key(kek, r)) for r in rows}) == 2 and len({r.package_id for r in rows}) == 2


def test_publish_refuses_bad_models_names_and_versions(repo: Repository, kek: Kek, store: PackageStore,
                                                      tmp_path: Path) -> None:
    with pytest.raises(MalformedInputError, match="not an ONNX model"):
        _publish(repo, kek, store, tmp_path, model=b"\x08\x07garbage that is not a model")
    with pytest.raises(PublishError, match="model name"):
        _publish(repo, kek, store, tmp_path, name="Classifier")
    with pytest.raises(PublishError, match="model name"):
        _publish(repo, kek, store, tmp_path, name="../etc")
    for bad in ("1.0", "01.0.0", "1.0.0-rc1"):
        with pytest.raises(PublishError, match=r"MAJOR\.MINOR\.PATCH"):
            _publish(repo, kek, store, tmp_path, bad)
    assert repo.models.models() == [] and not (tmp_path / "models").exists()


def test_onnx_io_signature_and_checker() -> None:
    import onnx
    from onnx import TensorProto, helper

    sig = inspect_onnx(small_classifier())
    assert sig == classifier_io_signature()
    # An unsupported element type (string) is refused with its name.
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # make_model stamps the onnx package's newest, which the devices may not load
    with pytest.raises(MalformedInputError, match="element type"):
        inspect_onnx(model.SerializeToString())
    # The checker runs: a node referring to an undefined input is refused.
    broken = helper.make_graph([helper.make_node("Relu", ["missing"], ["y"])], "g",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    bad = helper.make_model(broken, opset_imports=[helper.make_opsetid("", 17)])
    bad.ir_version = 8
    with pytest.raises(MalformedInputError, match="checker"):
        inspect_onnx(bad.SerializeToString())
    assert onnx.__version__


def test_kek_seals_with_bound_associated_data(tmp_path: Path) -> None:
    kek = Kek(secrets.token_bytes(32))
    assert "key=<redacted>" in repr(kek) and kek.key.hex() not in repr(kek)
    data_key = secrets.token_bytes(32)
    pid = secrets.token_bytes(16)
    sealed = kek.seal(data_key, name="m", version="1.0.0", package_id=pid)
    assert len(sealed.nonce) == 12 and len(sealed.ciphertext) == 48 and data_key not in sealed.ciphertext
    assert bytes(kek.unseal(sealed, name="m", version="1.0.0", package_id=pid)) == data_key
    for other in ({"name": "n", "version": "1.0.0", "package_id": pid},
                  {"name": "m", "version": "1.0.1", "package_id": pid},
                  {"name": "m", "version": "1.0.0", "package_id": secrets.token_bytes(16)}):
        with pytest.raises(DataKeyError, match="does not decrypt"):
            kek.unseal(sealed, **other)  # type: ignore[arg-type]
    with pytest.raises(DataKeyError, match=f"sealed under KEK {kek.kid}"):
        Kek(secrets.token_bytes(32)).unseal(sealed, name="m", version="1.0.0", package_id=pid)
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    tampered = SealedKey(sealed.kek_id, sealed.nonce, flipped)
    with pytest.raises(DataKeyError):
        kek.unseal(tampered, name="m", version="1.0.0", package_id=pid)


def test_kek_files_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "model-kek.key"
    created = create_kek_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_kek_file(path).kid == created.kid
    with pytest.raises(ConfigError, match="refusing to replace"):
        create_kek_file(path)
    assert load_kek(path, environ={}).kid == created.kid  # type: ignore[union-attr]
    assert load_kek(tmp_path / "none", environ={}) is None
    other = secrets.token_bytes(32)
    assert load_kek(path, environ={KEK_ENV: other.hex()}).key == other  # type: ignore[union-attr]
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="must be 0600"):
        read_kek_file(path)
    os.chmod(path, 0o600)
    path.write_text("secret-looking-but-not-hex\n")
    with pytest.raises(ConfigError) as info:
        read_kek_file(path)
    assert "secret-looking" not in info.value.diagnostics() and "64 hex digits" in info.value.diagnostics()
    with pytest.raises(ConfigError, match=KEK_ENV):
        load_kek(None, environ={KEK_ENV: "abcd"})


def test_policies_from_toml_and_settings(tmp_path: Path, repo: Repository, kek: Kek,
                                        store: PackageStore) -> None:
    file = tmp_path / "policy.toml"
    file.write_text('output_mode = "topk"\nk = 2\nlabels = ["cat", "dog"]\nlease_quota = 500\n'
                    "block_on_alarm = true\n")
    policy = policy_from_toml(file)
    assert (policy.output_mode, policy.k, policy.labels, policy.lease_quota, policy.block_on_alarm) == (
        "topk", 2, ("cat", "dog"), 500, True)
    assert policy.client_daily_quota is None and policy.max_batch == ModelPolicy().max_batch
    (tmp_path / "bad.toml").write_text("k = 2\ncolour = 'red'\n")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        policy_from_toml(tmp_path / "bad.toml")
    (tmp_path / "range.toml").write_text("decimals = 99\n")
    with pytest.raises(ConfigError, match="decimals"):
        policy_from_toml(tmp_path / "range.toml")
    changed = apply_settings(policy, ["lease_quota=none", "k=4", "labels=a, b ,c", "block_on_alarm=no",
                                      "output_mode=label"])
    assert (changed.lease_quota, changed.k, changed.labels, changed.block_on_alarm, changed.output_mode) == (
        None, 4, ("a", "b", "c"), False, "label")
    for bad, text in (("k=three", "integer"), ("nokey", "key=value"), ("speed=1", "unknown key"),
                      ("output_mode=all", "output_mode"), ("block_on_alarm=maybe", "true or false")):
        with pytest.raises(ConfigError, match=text):
            apply_settings(policy, [bad])
    with pytest.raises(ConfigError, match="exceed"):
        policy_from_mapping({"labels": ["x" * 128] * 400})
    # A new version inherits the newest version's policy unless it brings its own.
    _publish(repo, kek, store, tmp_path, "1.0.0", policy=policy)
    _publish(repo, kek, store, tmp_path, "1.1.0")
    assert json.loads(repo.models.version("classifier", "1.1.0").policy)["k"] == 2  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------------
def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(KEK_ENV, raising=False)
    folder = tmp_path / "srv"
    status, out, err = _run(capsys, "init", "--data-dir", str(folder), "--mqtt-port", "18883")
    assert status == 0, err
    assert "created model-signing key" in out and "created model KEK" in out
    return folder


def test_init_creates_model_keys_and_keeps_the_kek_on_force(data_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    keys = data_dir / "keys"
    for name, mode in (("model-signing.key", 0o600), ("model-kek.key", 0o600),
                       ("model-signing.pub.pem", 0o644)):
        assert stat.S_IMODE((keys / name).stat().st_mode) == mode, name
    config = load_config(data_dir / "server.toml")
    assert config.models.kek_file == keys / "model-kek.key" and config.models.store_dir == data_dir / "models"
    kek_before = (keys / "model-kek.key").read_bytes()
    signing_before = (keys / "model-signing.key").read_bytes()
    status, out, _ = _run(capsys, "init", "--data-dir", str(data_dir))
    assert status == 0 and "kept model-signing key" in out and "kept model KEK" in out
    status, out, _ = _run(capsys, "init", "--data-dir", str(data_dir), "--force")
    assert status == 0 and "kept model KEK" in out
    assert (keys / "model-kek.key").read_bytes() == kek_before  # would orphan every sealed data key
    assert (keys / "model-signing.key").read_bytes() != signing_before


def test_model_commands(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(data_dir / "server.toml")
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(small_classifier())
    status, out, err = _run(capsys, "model", "publish", str(onnx_file), "--name", "classifier", "--version",
                            "1.0.0", "--config", config)
    assert status == 0, err
    assert "published classifier 1.0.0" in out and "input float32[None, 16]" in out
    package = data_dir / "models" / "classifier" / "1.0.0.pkg"
    assert package.exists()
    status, _, err = _run(capsys, "model", "publish", str(onnx_file), "--name", "classifier", "--version",
                          "0.9.0", "--config", config)
    assert status == 1 and err.startswith("fleet-server: ") and "not newer" in err and err.count("\n") == 1
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    status, _, err = _run(capsys, "model", "publish", str(tmp_path / "junk.onnx"), "--name", "x", "--version",
                          "1.0.0", "--config", config)
    assert status == 1 and "not an ONNX model" in err

    status, out, _ = _run(capsys, "model", "entitle", "classifier", "--device-class", "edge-camera",
                          "--config", config)
    assert status == 0 and "entitled" in out
    status, out, _ = _run(capsys, "model", "entitle", "classifier", "--device", "cam-9", "--config", config)
    assert status == 0 and "no such device yet" in out
    status, _, err = _run(capsys, "model", "entitle", "nothing", "--device", "cam-9", "--config", config)
    assert status == 1 and "no model" in err
    status, out, _ = _run(capsys, "model", "policy", "classifier", "--set", "k=5", "--set", "lease_quota=100",
                          "--json", "--config", config)
    assert status == 0 and json.loads(out)["policy"]["lease_quota"] == 100
    status, _, err = _run(capsys, "model", "policy", "classifier", "--set", "k=0", "--config", config)
    assert status == 1 and "k" in err

    status, out, _ = _run(capsys, "model", "list", "--json", "--config", config)
    assert json.loads(out) == [{"name": "classifier", "newest": "1.0.0", "versions": 1, "entitlements": 2,
                                "active_leases": 0, "created_at": json.loads(out)[0]["created_at"],
                                "deployed": None}]  # published without --deploy: nothing deployed yet
    status, out, _ = _run(capsys, "model", "show", "classifier", "--json", "--config", config)
    doc = json.loads(out)
    assert doc["versions"][0]["policy"]["k"] == 5
    assert doc["versions"][0]["package_size"] == package.stat().st_size
    assert {(e["kind"], e["subject"]) for e in doc["entitlements"]} == {("class", "edge-camera"),
                                                                          ("device", "cam-9")}
    assert "data_key" not in out and "encrypted" not in out
    status, out, _ = _run(capsys, "model", "show", "classifier", "--config", config)
    assert status == 0 and "entitled: class edge-camera, device cam-9" in out
    status, out, _ = _run(capsys, "model", "revoke-entitlement", "classifier", "--device", "cam-9",
                          "--config", config)
    assert status == 0 and "no longer entitled" in out
    status, out, _ = _run(capsys, "model", "revoke-entitlement", "classifier", "--device", "cam-9",
                          "--config", config)
    assert status == 0 and "nothing changed" in out

    # The claim bundle carries the model-signing public key; it verifies the published package.
    status, _, err = _run(capsys, "claim", "issue", "cam-9", "--out", str(tmp_path / "prov"),
                          "--config", config)
    assert status == 0, err
    pub = serialization.load_pem_public_key((tmp_path / "prov" / "model-signing.pub.pem").read_bytes())
    manifest = read_manifest(package.read_bytes(), trusted_keys={key_id(pub): pub})  # type: ignore[arg-type,dict-item]
    assert manifest.version == "1.0.0"


def _offered(config: str, device_id: str = "cam-1", device_class: str = "edge-camera") -> list[str]:
    """The versions the server would offer a trusted device of that class now."""
    engine = create_engine(load_config(Path(config)).database_url)
    try:
        with Repository(engine).write("reading offers") as tx:
            offers = tx.models.offers([(device_id, device_class)])
    finally:
        engine.dispose()
    return [f"{x.name} {x.version}" for x in offers.get(device_id, [])]


def _deploy_entries(config: str) -> list[dict[str, object]]:
    engine = create_engine(load_config(Path(config)).database_url)
    try:
        entries = AuditLog(engine).entries(action="model.deploy", limit=100)
    finally:
        engine.dispose()
    assert all(e.target == "model:classifier" and e.actor == cli_actor() for e in entries)
    return [e.details_dict() for e in reversed(entries)]  # oldest first


def test_model_deploy_command(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Publishing is not deploying (issue 9): devices are offered a version after ``model deploy``."""
    config = str(data_dir / "server.toml")
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(small_classifier())

    def publish(version: str) -> None:
        status, out, err = _run(capsys, "model", "publish", str(onnx_file), "--name", "classifier",
                                "--version", version, "--config", config)
        assert status == 0 and "not deployed" in out, err

    def deployed() -> object:
        status, out, _ = _run(capsys, "model", "list", "--json", "--config", config)
        assert status == 0
        return json.loads(out)[0]["deployed"]

    publish("1.0.0")
    assert _run(capsys, "model", "entitle", "classifier", "--device-class", "edge-camera",
                "--config", config)[0] == 0
    assert deployed() is None and _offered(config) == []  # published only: no device is offered it

    status, out, _ = _run(capsys, "model", "deploy", "classifier", "1.0.0", "--config", config)
    assert status == 0 and out.startswith("deployed classifier 1.0.0: entitled devices are offered it")
    assert deployed() == "1.0.0" and _offered(config) == ["classifier 1.0.0"]
    status, out, _ = _run(capsys, "model", "deploy", "classifier", "1.0.0", "--config", config)
    assert status == 0 and "already deployed; nothing changed" in out

    publish("1.1.0")  # devices keep the deployed version until 1.1.0 is deployed
    assert deployed() == "1.0.0" and _offered(config) == ["classifier 1.0.0"]
    status, out, _ = _run(capsys, "model", "deploy", "classifier", "1.1.0", "--json", "--config", config)
    assert status == 0 and json.loads(out) == {"name": "classifier", "version": "1.1.0", "deployed": True,
                                               "previous": "1.0.0"}
    assert deployed() == "1.1.0" and _offered(config) == ["classifier 1.1.0"]

    # Refusals: one line on stderr, exit code 1, nothing deployed, nothing audited.
    publish("1.2.0")
    publish("1.3.0")
    assert _run(capsys, "model", "deploy", "classifier", "1.3.0", "--config", config)[0] == 0
    for argv, reason in ((("classifier", "2.0.0"), "model classifier has no version 2.0.0"),
                         (("nothing", "1.0.0"), "no model 'nothing'"),
                         (("classifier", "1.2.0"),
                          "classifier 1.2.0 is older than the deployed version 1.3.0")):
        status, out, err = _run(capsys, "model", "deploy", *argv, "--config", config)
        assert (status, out) == (1, "") and err == f"fleet-server: {reason}\n", err
    status, _, err = _run(capsys, "model", "deploy", "classifier", "not/a/version", "--config", config)
    assert status == 1 and err.startswith("fleet-server: ") and err.count("\n") == 1, err
    assert deployed() == "1.3.0" and _offered(config) == ["classifier 1.3.0"]
    assert _deploy_entries(config) == [{"version": "1.0.0", "previous": None},
                                       {"version": "1.1.0", "previous": "1.0.0"},
                                       {"version": "1.3.0", "previous": "1.1.0"}]


def test_publish_without_a_kek_is_refused(data_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (data_dir / "keys" / "model-kek.key").unlink()
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(small_classifier())
    status, _, err = _run(capsys, "model", "publish", str(onnx_file), "--name", "classifier", "--version",
                          "1.0.0", "--config", str(data_dir / "server.toml"))
    assert status == 1 and "no key-encryption key" in err and KEK_ENV in err


def _onnxruntime_pin() -> str:
    lock = Path(__file__).resolve().parents[1] / "requirements" / "agent.lock"
    pins = [line.split("==", 1)[1].split()[0] for line in lock.read_text().splitlines()
            if line.startswith("onnxruntime==")]
    assert len(pins) == 1, pins
    return pins[0]


def test_runtime_limits_are_those_of_the_pinned_onnxruntime() -> None:
    """The table publish checks against is the agents' onnxruntime: the pin in agent.lock, and the
    installed onnxruntime (the same pin) loads a model at each limit and refuses one past it."""
    import onnxruntime as ort

    from firmware_sim.testmodel import relu_model
    from fleet_server.modelstore.runtime_support import DEVICE_ONNXRUNTIME, limits_for

    assert DEVICE_ONNXRUNTIME == _onnxruntime_pin() == ort.__version__
    limits = limits_for(DEVICE_ONNXRUNTIME)
    ir, opset, ml = limits.ir_version, limits.opsets["ai.onnx"], limits.opsets["ai.onnx.ml"]

    def loads(model: bytes) -> bool:
        try:
            ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime's pybind Fail type is not importable portably
            return False
        return True

    assert loads(relu_model(ir_version=ir, opset=opset, ml_opset=ml))
    assert not loads(relu_model(ir_version=ir + 1, opset=opset))
    assert not loads(relu_model(ir_version=ir, opset=opset + 1))
    assert not loads(relu_model(ir_version=ir, opset=opset, ml_opset=ml + 1))
    # and publish's check accepts exactly what loads
    inspect_onnx(relu_model(ir_version=ir, opset=opset, ml_opset=ml))


def test_publish_refuses_models_the_devices_onnxruntime_cannot_load(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from firmware_sim.testmodel import relu_model

    config = str(data_dir / "server.toml")
    cases = {
        "ir": (relu_model(ir_version=14), "model IR version 14 is newer than the devices' onnxruntime 1.31 "
                                          "supports (13)"),
        "opset": (relu_model(opset=27), "model opset ai.onnx 27 is newer than the devices' onnxruntime 1.31 "
                                        "supports (26)"),
        "ml": (relu_model(ml_opset=6), "model opset ai.onnx.ml 6 is newer than the devices' onnxruntime "
                                       "1.31 supports (5)"),
    }
    for case, (model, reason) in cases.items():
        path = tmp_path / f"{case}.onnx"
        path.write_bytes(model)
        status, out, err = _run(capsys, "model", "publish", str(path), "--name", f"too-new-{case}",
                                "--version", "1.0.0", "--config", config)
        assert status == 1 and err == f"fleet-server: {reason}\n" and out == "", (case, err)
        assert not (data_dir / "models" / f"too-new-{case}").exists()
    for name, model in (("classifier", small_classifier()), ("relu", relu_model())):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(model)
        status, out, err = _run(capsys, "model", "publish", str(path), "--name", name, "--version", "1.0.0",
                                "--config", config)
        assert status == 0 and f"published {name} 1.0.0" in out, err
