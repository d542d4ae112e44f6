"""Every state-changing ``fleet-server`` command writes an audit entry (actor ``cli:<login>``).

The list of commands comes from the CLI's own parser: each leaf command must be either in
:data:`AUDITED` (run here against a real initialised data folder, its entry looked up in the audit
log) or in :data:`NOT_ADMIN_ACTIONS` (read-only commands and the long-running services). A new
command that is in neither fails :func:`test_every_command_is_classified`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware_sim.boot import BootMedia, build_boot_log
from firmware_sim.profiles import get_profile
from firmware_sim.testmodel import small_classifier
from fleet_server.cli import build_parser, main
from fleet_server.config import load_config
from fleet_server.console.audit import AuditLog, Checkpointing, cli_actor
from fleet_server.storage.db import create_engine
from fleet_server.storage.repo import Repository

pytest.register_assert_rewrite("server_fixtures", "release_fixtures")
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402
from server_fixtures import insert_pending_device  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_root_logging")
pytest_plugins = ("mqtt_fixtures", "server_fixtures")

Command = tuple[str, ...]

NOT_ADMIN_ACTIONS: dict[Command, str] = {
    ("eventlog", "replay"): "reads a file",
    ("eventlog", "show"): "reads a file",
    ("quote", "verify"): "reads files",
    ("run",): "the workers (their own actions are not administrative)",
    ("console",): "the web console (audits its own actions)",
    ("db", "current"): "read-only",
    ("device", "list"): "read-only",
    ("device", "show"): "read-only",
    ("policy", "list"): "read-only",
    ("policy", "show"): "read-only",
    ("model", "list"): "read-only",
    ("model", "show"): "read-only",
    ("user", "list"): "read-only",
    ("token", "list"): "read-only",
    ("audit", "list"): "read-only",
    ("audit", "verify"): "read-only",
    ("updates", "status"): "read-only",
    ("updates", "root"): "writes the public root metadata to a file",
    ("release", "list"): "read-only",
    ("release", "show"): "read-only",
    ("rollout", "list"): "read-only",
    ("rollout", "show"): "read-only",
}


@dataclass(frozen=True)
class Case:
    """How to run one audited command in :class:`Env`, and the entry it must write."""

    argv: Callable[[Env], list[str]]
    action: str
    target: Callable[[Env], str]


@dataclass
class Env:
    data_dir: Path
    tmp: Path

    @property
    def config(self) -> str:
        return str(self.data_dir / "server.toml")


def _golden_log(env: Env) -> str:
    chosen = get_profile("golden")
    path = env.tmp / "golden.bin"
    media = BootMedia.from_specs(chosen.image_specs())
    path.write_bytes(build_boot_log(media, chosen.boot_settings).to_bytes())
    return str(path)


def _onnx(env: Env) -> str:
    path = env.tmp / "m.onnx"
    path.write_bytes(small_classifier())
    return str(path)


def _models_pending(env: Env, path: str) -> list[Path]:
    """A pending version of the update repository's ``models`` role, its local keys below the
    threshold (the others moved "offline"); returns the offline key files."""
    import time

    from fleet_server.updates.repository import open_update_repository

    repo = open_update_repository(load_config(Path(env.config)), clock=time.time)
    offline = env.tmp / "offline-models"
    if not offline.exists():
        offline.mkdir()
        for key in sorted(repo.keys.role_dir("models").glob("*.pem"))[1:]:
            key.rename(offline / key.name)
    repo.add_target("models", path, b"package", {})
    return sorted(offline.glob("*.pem"))


def _signed_elsewhere(env: Env) -> str:
    from fleet_server.updates.repository import open_update_repository, sign_exported

    key = _models_pending(env, "models/m/2.0.0.pkg")[1]
    repo = open_update_repository(load_config(Path(env.config)), clock=lambda: 0.0)
    out = env.tmp / "models.signed.json"
    out.write_bytes(sign_exported(repo.export("models"), key)[1])
    return str(out)
def _bundle(env: Env) -> str:
    return str(write_bundle_dir(env.tmp / "bundle-1.3.0"))


RELEASE = "firmware/edge-camera/1.3.0.fwb"


def _draft_rollout(env: Env, rollout_id: str, argv: list[str]) -> list[str]:
    """Create a draft rollout for a command that needs one; returns the command's ``argv``."""
    assert main(["rollout", "create", RELEASE, "--id", rollout_id, "--draft", "--config", env.config]) == 0
    return argv


def _c(env: Env) -> list[str]:
    return ["--config", env.config]


def _fixed(text: str) -> Callable[[Env], str]:
    return lambda env: text


# In the order they run (later ones depend on earlier ones: approve before revoke, publish before entitle).
AUDITED: dict[Command, Case] = {
    ("init",): Case(lambda env: ["init", "--data-dir", str(env.data_dir), "--mqtt-port", "18883",
                                 "--server-mqtt-port", "18884"],
                    "server.init", lambda env: f"data-dir:{env.data_dir.resolve()}"),
    ("db", "upgrade"): Case(lambda env: ["db", "upgrade", *_c(env)], "db.upgrade", _fixed("database")),
    ("policy", "from-eventlog"): Case(
        lambda env: ["policy", "from-eventlog", _golden_log(env), "--name", "golden-1.2.0", *_c(env)],
        "policy.create", _fixed("policy:golden-1.2.0")),
    ("claim", "issue"): Case(lambda env: ["claim", "issue", "cam-1", "--out", str(env.tmp / "claim"),
                                          *_c(env)], "claim.issue", _fixed("device:cam-1")),
    ("device", "preregister"): Case(
        lambda env: ["device", "preregister", str(env.data_dir / "pki" / "fleet-server.pem"), *_c(env)],
        "device.preregister", lambda env: "ek:"),  # the fingerprint: checked as a prefix
    ("device", "approve"): Case(lambda env: ["device", "approve", "cam-9", *_c(env)], "device.approve",
                                _fixed("device:cam-9")),
    ("release", "add"): Case(
        lambda env: ["release", "add", _bundle(env), "--class", "edge-camera", "--version", "1.3.0",
                     *_c(env)],
        "release.add", _fixed(f"release:{RELEASE}")),
    ("release", "assign"): Case(lambda env: ["release", "assign", RELEASE, "--device", "cam-9", *_c(env)],
                                "release.assign", _fixed(f"release:{RELEASE}")),
    ("device", "tag"): Case(lambda env: ["device", "tag", "cam-9", "lab", "north", *_c(env)], "device.tag",
                            _fixed("device:cam-9")),
    ("device", "untag"): Case(lambda env: ["device", "untag", "cam-9", "north", *_c(env)], "device.untag",
                              _fixed("device:cam-9")),
    ("rollout", "create"): Case(
        lambda env: ["rollout", "create", RELEASE, "--id", "r1", "--tag", "lab", "--canary", "1", "--phases",
                     "100", "--approval", *_c(env)], "rollout.create", _fixed("rollout:r1")),
    ("rollout", "pause"): Case(lambda env: ["rollout", "pause", "r1", *_c(env)], "rollout.pause",
                               _fixed("rollout:r1")),
    ("rollout", "resume"): Case(lambda env: ["rollout", "resume", "r1", *_c(env)], "rollout.resume",
                                _fixed("rollout:r1")),
    ("rollout", "approve"): Case(lambda env: ["rollout", "approve", "r1", *_c(env)], "rollout.approve",
                                 _fixed("rollout:r1")),
    ("rollout", "cancel"): Case(lambda env: ["rollout", "cancel", "r1", *_c(env)], "rollout.cancel",
                                _fixed("rollout:r1")),
    ("rollout", "abort"): Case(
        lambda env: _draft_rollout(env, "r2", ["rollout", "abort", "r2", *_c(env)]), "rollout.abort",
        _fixed("rollout:r2")),
    ("release", "withdraw"): Case(lambda env: ["release", "withdraw", RELEASE, *_c(env)], "release.withdraw",
                                  _fixed(f"release:{RELEASE}")),
    ("device", "quarantine"): Case(lambda env: ["device", "quarantine", "cam-9", *_c(env)],
                                   "device.quarantine", _fixed("device:cam-9")),
    ("device", "unquarantine"): Case(lambda env: ["device", "unquarantine", "cam-9", *_c(env)],
                                     "device.unquarantine", _fixed("device:cam-9")),
    ("device", "revoke"): Case(lambda env: ["device", "revoke", "cam-9", "--reason", "lost", *_c(env)],
                               "device.revoke", _fixed("device:cam-9")),
    ("device", "crl"): Case(lambda env: ["device", "crl", "--out", str(env.tmp / "copy.crl.pem"), *_c(env)],
                            "device.crl", lambda env: f"crl:{env.tmp / 'copy.crl.pem'}"),
    ("model", "publish"): Case(
        lambda env: ["model", "publish", _onnx(env), "--name", "classifier", "--version", "1.0.0", *_c(env)],
        "model.publish", _fixed("model:classifier")),
    ("model", "deploy"): Case(
        lambda env: ["model", "deploy", "classifier", "1.0.0", *_c(env)],
        "model.deploy", _fixed("model:classifier")),
    ("model", "entitle"): Case(
        lambda env: ["model", "entitle", "classifier", "--device-class", "edge-camera", *_c(env)],
        "model.entitle", _fixed("model:classifier")),
    ("model", "policy"): Case(lambda env: ["model", "policy", "classifier", "--set", "k=5", *_c(env)],
                              "model.policy", _fixed("model:classifier")),
    ("model", "revoke-entitlement"): Case(
        lambda env: ["model", "revoke-entitlement", "classifier", "--device-class", "edge-camera", *_c(env)],
        "model.withdraw", _fixed("model:classifier")),
    ("user", "add"): Case(lambda env: ["user", "add", "alice", "--role", "security", *_c(env)], "user.add",
                          _fixed("user:alice")),
    ("user", "set-role"): Case(lambda env: ["user", "set-role", "alice", "data_scientist", *_c(env)],
                               "user.set_role", _fixed("user:alice")),
    ("user", "disable"): Case(lambda env: ["user", "disable", "alice", *_c(env)], "user.disable",
                              _fixed("user:alice")),
    ("user", "enable"): Case(lambda env: ["user", "enable", "alice", *_c(env)], "user.enable",
                             _fixed("user:alice")),
    ("user", "reset-password"): Case(lambda env: ["user", "reset-password", "alice", *_c(env)],
                                     "user.reset_password", _fixed("user:alice")),
    ("user", "unlock"): Case(lambda env: ["user", "unlock", "alice", *_c(env)], "user.unlock",
                             _fixed("user:alice")),
    ("token", "create"): Case(lambda env: ["token", "create", "--name", "ci", "--role", "admin", *_c(env)],
                              "token.create", _fixed("token:ci")),
    ("token", "revoke"): Case(lambda env: ["token", "revoke", "ci", *_c(env)], "token.revoke",
                              _fixed("token:ci")),
    ("audit", "checkpoint"): Case(lambda env: ["audit", "checkpoint", *_c(env)], "audit.checkpoint",
                                  _fixed("audit")),
    ("updates", "init"): Case(lambda env: ["updates", "init", *_c(env)], "updates.init",
                              lambda env: f"updates:{env.data_dir.resolve() / 'updates'}"),
    ("updates", "rotate"): Case(lambda env: ["updates", "rotate", "timestamp", *_c(env)], "updates.rotate",
                                _fixed("tuf-role:timestamp")),
    ("updates", "sign"): Case(
        lambda env: ["updates", "sign", "models", "--key", str(_models_pending(env, "models/m/1.0.0.pkg")[0]),
                     *_c(env)], "updates.sign", _fixed("tuf-role:models")),
    ("updates", "add-signature"): Case(
        lambda env: ["updates", "add-signature", "models", _signed_elsewhere(env), *_c(env)],
        "updates.add_signature", _fixed("tuf-role:models")),
}


def _leaves(parser: argparse.ArgumentParser, prefix: Command = ()) -> Iterator[Command]:
    """Every runnable command path of ``parser`` (e.g. ``("device", "approve")``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaves(child, (*prefix, name))


def test_every_command_is_classified() -> None:
    commands = set(_leaves(build_parser()))
    assert ("device", "approve") in commands and ("init",) in commands  # the walk finds nested and top ones
    assert not set(AUDITED) & set(NOT_ADMIN_ACTIONS)
    unclassified = commands - set(AUDITED) - set(NOT_ADMIN_ACTIONS)
    assert not unclassified, (f"commands neither audited nor listed as read-only: {sorted(unclassified)}; "
                              "make them write an audit entry (record_cli) and add them to AUDITED")
    assert not (set(AUDITED) | set(NOT_ADMIN_ACTIONS)) - commands  # no stale entries


@pytest.fixture
def env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Env:
    folder = tmp_path / "srv"
    assert main(["init", "--data-dir", str(folder), "--mqtt-port", "18883",
                 "--server-mqtt-port", "18884"]) == 0
    capsys.readouterr()
    return Env(folder, tmp_path)


def test_every_state_changing_command_writes_its_audit_entry(
        env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(Path(env.config))
    engine = create_engine(config.database_url)
    repo = Repository(engine)
    audit = AuditLog(engine, Checkpointing.from_settings(config.audit))
    insert_pending_device(repo, "cam-9")
    from fleet_server.commands import release_cmd

    store = MemoryTargetStore()
    monkeypatch.setattr(release_cmd, "target_store_factory", lambda config: store)
    actor = cli_actor()
    assert actor.startswith("cli:")
    try:
        for command, case in AUDITED.items():
            head = audit.head()
            before = head.seq if head is not None else 0
            argv = case.argv(env)
            status = main(argv)
            out, err = capsys.readouterr()
            assert status == 0, (argv, out, err)
            written = [x for x in audit.entries(limit=100) if x.seq > before]
            target = case.target(env)
            found = [x for x in written if x.action == case.action and x.actor == actor
                     and (x.target == target or (target.endswith(":") and x.target.startswith(target)))]
            assert found, f"{' '.join(command)} wrote no audit entry {case.action} {target}: {written}"
        report = audit.verify()
        assert report.ok and report.checkpoints is not None and report.checkpoints.last_good is not None
    finally:
        engine.dispose()
