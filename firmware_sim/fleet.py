"""The simulated-device fleet harness: a broker, a fleet server and N swtpm-backed devices with agents.

:class:`FleetHarness` builds and runs a whole installation on one machine, the way an operator
would, and measures it.  ``firmware-sim fleet`` (:mod:`firmware_sim.fleet_cli`), the system tests
and the benchmark (:mod:`firmware_sim.bench.fleet_bench`) all use it; ``docs/harness.md`` has the
guide.

Steps of :meth:`FleetHarness.start`:

1. a workspace (a temporary folder, or ``FleetConfig.workdir``) and a manufacturer CA (the "TPM
   vendor" whose CA the server trusts);
2. ``fleet-server init`` (the server's own CLI, in process): fleet CA, broker and server
   certificates, result-signing key, migrated database; then ``server.toml`` is rewritten with the
   harness's timing (interval, jitter, scheduler tick...); with ``updates``, ``fleet-server updates
   init`` and the root exported for the agents' ``[update]`` (:meth:`FleetHarness.publish_release`,
   :meth:`~FleetHarness.assign_release` then ship releases; with ``release``, that bundle is published
   after step 5 and :attr:`FleetHarness.update_driver` assigns it during the window, see
   :mod:`firmware_sim.fleet_updates`, or rolls it out in phases with a ``rollout`` plan, see
   :mod:`firmware_sim.fleet_rollout`);
3. Mosquitto with the fleet PKI (:class:`~firmware_sim.broker.MosquittoBroker`);
4. N :class:`~firmware_sim.device.SimulatedDevice` made in parallel (``swtpm_setup`` takes about
   0.7 s each, mostly waiting) and booted; the first ``tampered`` with ``tampered_profile``;
5. the reference policy from a golden device's event log (``fleet-server policy from-eventlog``),
   every device's EK certificate pre-registered (devices are admitted without an administrator,
   so a run measures attestation, not approval), and a claim credential and ``agent.toml`` per
   device;
6. ``fleet-server run --config server.toml`` as a **subprocess** (so its CPU time can be read from
   ``/proc``), waiting until its workers are connected to the broker;
7. agent hosts (:mod:`firmware_sim.fleet_agents`): a few spawned processes, each running many
   :class:`agent.service.Agent` instances;
8. waiting until every device is *settled* (appraised at least once: trusted or untrusted).

:meth:`FleetHarness.run` then measures a window (or runs until :meth:`FleetHarness.request_stop`,
for a demo); :meth:`FleetHarness.stop` stops agents, the server (SIGTERM), the broker and the TPMs;
:meth:`FleetHarness.report` computes the report from the server's database
(:mod:`firmware_sim.fleet_report`); :meth:`FleetHarness.cleanup` removes the workspace unless
``keep``.  Tests use the fault injections: :meth:`kill_server` / :meth:`start_server`,
:meth:`restart_broker`, :meth:`power_cycle`.

Everything the harness starts is stopped by :meth:`stop` (also on errors during :meth:`start`, and
by leaving a ``with`` block).  Process layout::

    harness (this process) ── owns ── swtpm x N   (one per device, own session)
        │                             mosquitto     (own session)
        │                             fleet-server run  (own session; its workers below it)
        └── spawned agent hosts x P  (SIGINT ignored; each runs N/P agents in threads)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from firmware_sim.broker import MosquittoBroker
from firmware_sim.device import SimulatedDevice
from firmware_sim.fleet_agents import AgentHost, AgentSnapshot, launch_hosts
from firmware_sim.fleet_queries import ModelUsage, QueryLoad
from firmware_sim.fleet_report import (
    CpuSample,
    DeviceInfo,
    DeviceRow,
    attestation_counts,
    build_report,
    read_cpu,
    read_devices,
    read_load_failures,
    read_window,
)
from firmware_sim.fleet_updates import UpdateDriver
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.power import PowerCycler
from firmware_sim.procutil import free_port
from firmware_sim.profiles import Profile, get_profile
from protocol.errors import ConfigError, EdgeError

SETTLED_STATES = frozenset({"trusted", "untrusted", "quarantined"})
"""Device states that mean "appraised at least once"."""
SERVER_STOP_TIMEOUT = 60.0
DEVICE_POOL = 16
"""Devices made at once: ``swtpm_setup`` mostly waits (on its own certificate tool), so more than
the number of cores pays off."""
REPORT_GRACE_S = 0.5
"""After the window ends, how long to let the server commit the batch it is working on."""
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
QUERY_CLIENT = "fleet-harness"
"""The client app name the harness queries each agent's inference API as."""
MODEL_TELEMETRY_INTERVAL = 10
"""Seconds between the agents' usage telemetry (the console shows query usage from it)."""


class HarnessError(EdgeError):
    """The harness could not build or run the fleet."""


class Interrupted(HarnessError):
    """:meth:`FleetHarness.request_stop` was called (Ctrl-C) while the fleet was being built."""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What to run.  Durations in seconds; ``None`` means "the harness chooses" (see the fields)."""

    devices: int = 5
    tampered: int = 0
    """The first ``tampered`` devices boot ``tampered_profile``; the others ``golden``."""
    tampered_profile: str = "tampered-kernel"
    interval: float = 2.0
    """The server's ``attestation.interval`` (each device is re-attested this often)."""
    duration: float | None = 10.0
    """Length of the measured window; ``None`` runs until :meth:`FleetHarness.request_stop`."""
    workdir: Path | None = None
    """Workspace (must be empty or absent); default a new temporary folder."""
    keep: bool = False
    """Keep the workspace after :meth:`FleetHarness.cleanup` (logs, database, device folders)."""
    jitter: float | None = None
    """``attestation.jitter``; default a tenth of the interval."""
    challenge_timeout: float = 10.0
    scheduler_tick: float | None = None
    """Default: a quarter of the interval, between 0.1 and 1 s (the schedule's resolution)."""
    batch_linger: float | None = None
    """``server.batch_linger``; default the server's own."""
    batch_size: int | None = None
    server_workers: int = 1
    database_url: str | None = None
    """The server's ``server.database_url`` (an SQLAlchemy URL of an empty database, e.g. PostgreSQL's
    for several ``server_workers``); default SQLite in the server's data folder. The harness migrates
    it when it writes ``server.toml``."""
    agent_processes: int | None = None
    """Agent host processes; default one per 16 devices, at most two per CPU (each host runs its
    agents' threads under one GIL: with one host per CPU, contention for it costs more CPU than a
    few more processes do; measured in docs/harness.md)."""
    server_log_level: str = "info"
    agent_log_level: str = "warning"
    settle_timeout: float | None = None
    """How long devices may take to be appraised once; default 60 s + 0.5 s per device."""
    console_port: int | None = None
    """Serve the admin web console from ``fleet-server run`` on this loopback port (0 = a free one;
    ``None`` = no console): ``[console] enabled`` in ``server.toml``; :attr:`FleetHarness.console_url`
    is its address (``server_config_extra`` may use ``{console_port}``)."""
    server_config_extra: str = ""
    """TOML appended to ``server.toml`` (after ``str.format(console_port=...)``)."""
    server_args: tuple[str, ...] = ()
    """Extra arguments of ``fleet-server run``."""
    device_prefix: str = "dev"
    model: Path | None = None
    """An ONNX model to protect: published (``fleet-server model publish``), entitled to the devices'
    class, and served by every agent through its local inference API (``[models]``/``[inference]``)."""
    model_name: str | None = None
    """Name to publish the model under; default from the file name."""
    model_version: str = "1.0.0"
    model_policy: Path | None = None
    """Usage policy TOML of the published version (``fleet-server model publish --policy``)."""
    queries: int = 0
    """Prediction requests per device during the measured window (needs ``model``)."""
    query_interval: float | None = None
    """Seconds between a device's requests; default the window spread evenly (1 s without a window)."""
    updates: bool = False
    """Provision the devices for signed updates: ``fleet-server updates init``, the root exported to
    ``<workdir>/update-root.json`` (:attr:`FleetHarness.update_root`), and every agent configured
    with ``[update]`` (its device's boot folder and that root)."""
    release: Path | None = None
    """A release bundle folder (``firmware-sim release build``; implies ``updates``): published while
    the fleet is built, assigned to every golden device ``update_at`` seconds into the window, and
    waited for after it (:mod:`firmware_sim.fleet_updates`)."""
    update_at: float | None = None
    """Seconds into the window at which the release is assigned; default a third of the window."""
    update_deadline: float = 300.0
    """The assignments' deadline (``release assign --deadline-s``); also bounds the wait after the window."""
    bad_update: int = 0
    """The first ``bad_update`` golden devices boot a patched kernel from a trial slot
    (``SimulatedDevice.create(trial_tamper="kernel")``): they install a release but boot something else."""
    rollout: Path | None = None
    """A rollout plan file (``PLAN.toml``, docs/rollouts.md; needs ``release``): the release goes to the
    golden devices through a staged rollout (:mod:`firmware_sim.fleet_rollout`, the ``bad_update``
    devices in its canary) instead of to all of them at once."""

    soft_tpm: bool = False
    """Devices on :class:`~firmware_sim.soft_tpm.SoftTpm` instead of swtpm (run by
    :class:`firmware_sim.soft_fleet.SoftFleetHarness`): up to 100000 devices."""
    start_rate: float | None = None
    """With ``soft_tpm``: agents started per second, over all hosts (default 200): the staggered start."""

    def check(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        limit = 100_000 if self.soft_tpm else 5000
        if not 1 <= self.devices <= limit:
            raise ConfigError(f"devices: must be between 1 and {limit}")
        if self.soft_tpm and (self.release is not None or self.rollout is not None):
            raise ConfigError("soft_tpm: soft-TPM devices have no A/B slots (--release/--rollout need swtpm)")
        if self.start_rate is not None and not 0.1 <= self.start_rate <= 100_000:
            raise ConfigError("start_rate: must be between 0.1 and 100000 agents per second")
        if not 0 <= self.tampered <= self.devices:
            raise ConfigError("tampered: must be between 0 and the number of devices")
        get_profile(self.tampered_profile)
        if not 0.05 <= self.interval <= 86400:
            raise ConfigError("interval: must be between 0.05 and 86400 seconds")
        if self.duration is not None and not 0 < self.duration <= 7 * 86400:
            raise ConfigError("duration: must be > 0 seconds")
        if self.jitter is not None and not 0 <= self.jitter < self.interval:
            raise ConfigError("jitter: must be >= 0 and smaller than the interval")
        if not 0.5 <= self.challenge_timeout <= 3600:
            raise ConfigError("challenge_timeout: must be between 0.5 and 3600 seconds")
        if not 1 <= self.server_workers <= 64:
            raise ConfigError("server_workers: must be between 1 and 64")
        if self.database_url is not None and "://" not in self.database_url:
            raise ConfigError("database_url: expected an SQLAlchemy URL such as postgresql+psycopg://...")
        if self.agent_processes is not None and not 1 <= self.agent_processes <= 256:
            raise ConfigError("agent_processes: must be between 1 and 256")
        if self.batch_linger is not None and not 0 <= self.batch_linger <= 1:
            raise ConfigError("batch_linger: must be between 0 and 1 second")
        if self.batch_size is not None and not 1 <= self.batch_size <= 10_000:
            raise ConfigError("batch_size: must be between 1 and 10000")
        if self.scheduler_tick is not None and not 0.01 <= self.scheduler_tick <= 600:
            raise ConfigError("scheduler_tick: must be between 0.01 and 600 seconds")
        if not self.device_prefix or not self.device_prefix.replace("-", "").isalnum() \
                or not self.device_prefix.islower() or len(self.device_prefix) > 40:
            raise ConfigError("device_prefix: lowercase letters, digits and '-' (at most 40)")
        if self.model is None:
            if self.queries:
                raise ConfigError("queries: needs a model (--model FILE.onnx)")
        else:
            if not Path(self.model).is_file():
                raise ConfigError(f"model: {self.model} is not a file")
            if self.model_policy is not None and not Path(self.model_policy).is_file():
                raise ConfigError(f"model_policy: {self.model_policy} is not a file")
            if not MODEL_NAME_RE.fullmatch(self.effective_model_name):
                raise ConfigError(f"model_name: {self.effective_model_name!r} is not a model name "
                                  "(lowercase letters, digits, '.', '_', '-'; at most 64)")
        if not 0 <= self.queries <= 1_000_000:
            raise ConfigError("queries: must be between 0 and 1000000")
        if self.query_interval is not None and not 0.001 <= self.query_interval <= 86400:
            raise ConfigError("query_interval: must be between 0.001 and 86400 seconds")
        if not 0 <= self.bad_update <= self.devices - self.tampered:
            raise ConfigError("bad_update: must be between 0 and the number of golden devices")
        if self.bad_update and not self.provision_updates:
            raise ConfigError("bad_update: needs a release (--release BUNDLE_DIR)")
        if self.update_at is not None and not 0 <= self.update_at < (self.duration or 7 * 86400):
            raise ConfigError("update_at: must be >= 0 seconds and inside the window (duration)")
        if self.release is not None:
            if self.duration is None and self.update_at is None:
                raise ConfigError("release: needs a window (duration) or update_at")
            from firmware_sim.fleet_updates import ReleaseBundle

            bundle = ReleaseBundle.read(self.release)
            if bundle.device_class != get_profile("golden").device_class:
                raise ConfigError(f"release: {self.release} is for class {bundle.device_class}, the golden "
                                  f"devices are {get_profile('golden').device_class}")
        if not 1 <= self.update_deadline <= 86400:
            raise ConfigError("update_deadline: must be between 1 and 86400 seconds")
        if self.rollout is not None:
            if self.release is None:
                raise ConfigError("rollout: needs a release (--release BUNDLE_DIR)")
            from firmware_sim.fleet_rollout import RolloutPlanFile

            RolloutPlanFile.read(self.rollout)

    @property
    def provision_updates(self) -> bool:
        """Whether the devices are provisioned for updates (``updates`` or a ``release``)."""
        return self.updates or self.release is not None

    @property
    def effective_update_at(self) -> float:
        if self.update_at is not None:
            return self.update_at
        return (self.duration or 0.0) / 3

    @property
    def effective_model_name(self) -> str:
        if self.model_name is not None:
            return self.model_name
        stem = re.sub(r"[^a-z0-9._-]+", "-", Path(self.model or "model").stem.lower()).strip("-._")
        return stem[:64] or "model"

    @property
    def effective_query_interval(self) -> float:
        if self.query_interval is not None:
            return self.query_interval
        if self.duration is None or self.queries == 0:
            return 1.0
        return self.duration / self.queries

    @property
    def effective_jitter(self) -> float:
        return self.interval / 10 if self.jitter is None else self.jitter

    @property
    def effective_tick(self) -> float:
        if self.scheduler_tick is not None:
            return self.scheduler_tick
        return min(1.0, max(0.1, self.interval / 4))

    @property
    def effective_agent_processes(self) -> int:
        if self.agent_processes is not None:
            return min(self.agent_processes, self.devices)
        return max(1, min(2 * (os.cpu_count() or 1), math.ceil(self.devices / 16), self.devices))

    @property
    def effective_settle_timeout(self) -> float:
        return self.settle_timeout if self.settle_timeout is not None else 60.0 + 0.5 * self.devices


@dataclass(slots=True)
class _Device:
    id: str
    profile: Profile
    sim: SimulatedDevice
    agent_dir: Path
    host: AgentHost | None = None
    token: str = ""
    """The harness's client token for the device's inference API (with a model)."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """What :meth:`FleetHarness.run` observed; :meth:`FleetHarness.report` turns it into the report."""

    start_ms: int
    end_ms: int
    cpu: dict[str, float]
    mqtt_messages: int | None
    devices: dict[str, DeviceRow]
    interrupted: bool = False
    agents: dict[str, AgentSnapshot] = field(default_factory=dict)
    model_usage: dict[str, ModelUsage] = field(default_factory=dict)
    """Per device, the inference requests of the window (with a model)."""
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per assigned device, the update driver's report entries (with a release)."""


def _toml_str(value: str) -> str:
    if any(ord(c) < 0x20 for c in value):
        raise ConfigError(f"value not representable in TOML: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _run_cli(main: Callable[[Sequence[str]], int], argv: Sequence[str], what: str) -> str:
    """Run a CLI ``main`` in process with its output captured; :class:`HarnessError` on failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    if status != 0:
        lines = (err.getvalue().strip() or out.getvalue().strip() or "no output").splitlines()
        raise HarnessError(f"{what} failed: {lines[-1]}")
    return out.getvalue()


class FleetHarness:
    """A whole fleet on this machine (see the module docstring).  Use as a context manager, or call
    :meth:`start`, :meth:`run`, :meth:`stop`, :meth:`report` and :meth:`cleanup`.

    ``progress`` receives one line per step (the CLI prints them on stderr).
    """

    def __init__(self, config: FleetConfig, *, progress: Callable[[str], None] | None = None) -> None:
        config.check()
        self.config = config
        self._progress = progress or (lambda line: None)
        self._stop_requested = threading.Event()
        self.workdir: Path | None = None
        self._created_workdir = False
        self._cleaned = False
        self.devices: dict[str, _Device] = {}
        self.hosts: list[AgentHost] = []
        self.power: PowerCycler | None = None
        """Runs the power cycles the agents ask for (their Rebooter), on the harness's side."""
        self.broker: MosquittoBroker | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._server_log: Any = None
        self._engine: Any = None
        self._console_port: int | None = None
        self.model_signature: Any = None
        """The published model's :class:`~protocol.modelpkg.IoSignature` (with a model)."""
        self.model_load_errors: dict[str, str] = {}
        """Trusted devices whose onnxruntime could not load the model, with its reason (as the server
        received it in their ``model-status``); when not empty the run measures nothing."""
        self.started = False
        self.update_root: Path | None = None
        """The update repository's root metadata the agents trust (with ``updates``): set, every agent
        configuration written from then on has ``[update]``."""
        self.update_driver: UpdateDriver | None = None
        """What :meth:`run` drives updates with: with a ``release``, a
        :class:`~firmware_sim.fleet_updates.ReleaseAtTime` made by :meth:`start` (with a ``rollout``
        plan, a :class:`~firmware_sim.fleet_rollout.RolloutDriver`); replaceable."""

    # -- paths -------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> Path:
        if self.workdir is None:
            raise HarnessError("the harness has no workspace (start() was not called)")
        return self.workdir.joinpath(*parts)

    @property
    def data_dir(self) -> Path:
        """The fleet server's data folder (``fleet-server init --data-dir``)."""
        return self._path("server")

    @property
    def server_config(self) -> Path:
        return self._path("server", "server.toml")

    @property
    def logs_dir(self) -> Path:
        return self._path("logs")

    @property
    def console_url(self) -> str | None:
        """URL of the web console of ``fleet-server run``, when ``console_port`` is configured."""
        return None if self._console_port is None else f"http://127.0.0.1:{self._console_port}/"

    @property
    def server_pid(self) -> int | None:
        proc = self._server
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def device_ids(self) -> list[str]:
        return list(self.devices)

    def profile_of(self, device_id: str) -> str:
        return self.devices[device_id].profile.name

    # -- stop requests -----------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask :meth:`start` or :meth:`run` to return as soon as possible (safe from a signal handler)."""
        self._stop_requested.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def _check_interrupted(self) -> None:
        if self._stop_requested.is_set():
            raise Interrupted("interrupted")

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> FleetHarness:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Build the fleet and wait until every device is settled (see the module docstring).

        On any failure everything started so far is stopped (and the workspace removed unless
        ``keep``) before the error propagates.
        """
        if self.started:
            raise HarnessError("the harness was already started")
        self.started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg = self.config
        t0 = time.monotonic()
        self._make_workspace()
        ca = ManufacturerCA.load_or_create(self._path("manufacturer-ca"))
        self._progress(f"workspace {self.workdir}")
        self._init_server(ca)
        self._check_interrupted()
        self._start_broker()
        self._write_server_config()
        if cfg.provision_updates:
            self._init_updates()
        self._make_devices(ca)
        self._check_interrupted()
        self._store_policy()
        if cfg.release is not None:
            self._add_release(cfg.release)
        if cfg.model is not None:
            self._publish_model()
        self._preregister(ca)
        self._provision_agents()
        self._check_interrupted()
        self.start_server()
        self._start_agents()
        self.wait_settled(cfg.effective_settle_timeout)
        if cfg.model is not None:
            self.wait_models(cfg.effective_settle_timeout)
        self._progress(f"fleet ready in {time.monotonic() - t0:.1f} s: {self._state_summary()}")

    def close(self) -> None:
        """:meth:`stop` then :meth:`cleanup`."""
        try:
            self.stop()
        finally:
            self.cleanup()

    def stop(self) -> None:
        """Stop agents, the server (SIGTERM), the broker and every swtpm; idempotent, never raises
        for a process that is already gone."""
        errors: list[str] = []
        if self.power is not None:  # no reboot may start a new agent while they stop
            self.power.close()
            self.power = None
        if self.hosts:
            self._progress("stopping agents")
            with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
                list(pool.map(lambda h: h.close(), self.hosts))
            self.hosts = []
        if self._server is not None:
            self._progress("stopping the fleet server")
            try:
                self.stop_server()
            except EdgeError as exc:
                errors.append(exc.diagnostics())
        if self.broker is not None:
            self.broker.stop()
        for device in self.devices.values():
            with contextlib.suppress(EdgeError, OSError):
                device.sim.shutdown()
        if errors:
            raise HarnessError("; ".join(errors))

    def cleanup(self) -> None:
        """Release the database engine and remove the workspace (unless ``keep``)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self.workdir is None or self._cleaned:
            return
        self._cleaned = True
        if self.config.keep:
            self._progress(f"kept the workspace {self.workdir}")
            return
        if self._created_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            for child in self.workdir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    # -- setup steps -------------------------------------------------------------------------------
    def _make_workspace(self) -> None:
        given = self.config.workdir
        if given is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="edge-fleet-"))
            self._created_workdir = True
        else:
            path = Path(given).expanduser().resolve()
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise ConfigError(f"workdir {path} exists and is not an empty folder")
            self._created_workdir = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            self.workdir = path
        os.chmod(self.workdir, 0o700)
        for sub in ("devices", "agents", "logs"):
            self._path(sub).mkdir()

    def _init_server(self, ca: ManufacturerCA) -> None:
        from fleet_server.cli import main as fleet_server

        self._progress("fleet-server init")
        argv = ["init", "--data-dir", str(self.data_dir), "--trust-bundle", str(ca.bundle)]
        if self.config.database_url is not None:
            argv += ["--database-url", self.config.database_url]
        _run_cli(fleet_server, argv, "fleet-server init")

    def _init_updates(self) -> None:
        """Create the update repository and export the root the devices are provisioned with."""
        from fleet_server.cli import main as fleet_server

        self._progress("fleet-server updates init")
        config = ["--config", str(self.server_config)]
        _run_cli(fleet_server, ["updates", "init", *config], "fleet-server updates init")
        root = self._path("update-root.json")
        _run_cli(fleet_server, ["updates", "root", "--out", str(root), *config], "fleet-server updates root")
        self.update_root = root

    def _start_broker(self) -> None:
        self.broker = MosquittoBroker.for_data_dir(self._path("broker"), self.data_dir)
        self.broker.start()
        self._progress(f"mosquitto on ports {self.broker.port} (devices) and {self.broker.server_port} "
                       "(fleet server)")

    def _write_server_config(self) -> None:
        from fleet_server.config import load_config

        cfg = self.config
        assert self.broker is not None and self.broker.server_port is not None
        if cfg.console_port is not None:
            self._console_port = cfg.console_port or free_port()
        lines = [
            "# Written by the fleet harness (firmware_sim.fleet); reference: docs/server.md.",
            "[server]",
            f"data_dir = {_toml_str(str(self.data_dir))}",
            f"workers = {cfg.server_workers}",
            *([f"database_url = {_toml_str(cfg.database_url)}"] if cfg.database_url is not None else []),
            f"log_level = {_toml_str(cfg.server_log_level)}",
        ]
        if cfg.batch_linger is not None:
            lines.append(f"batch_linger = {cfg.batch_linger!r}")
        if cfg.batch_size is not None:
            lines.append(f"batch_size = {cfg.batch_size}")
        lines += [
            "[mqtt]",
            'host = "127.0.0.1"',
            f"port = {self.broker.server_port}",
            "[attestation]",
            f"interval = {float(cfg.interval)!r}",
            f"jitter = {float(cfg.effective_jitter)!r}",
            f"challenge_timeout = {float(cfg.challenge_timeout)!r}",
            f"request_min_interval = {float(min(1.0, cfg.interval))!r}",
            f"scheduler_tick = {float(cfg.effective_tick)!r}",
            f"claim_batch = {max(200, cfg.devices)}",
            "",
        ]
        if self._console_port is not None:
            # The admin console of `fleet-server run` (fleet_server.console), on plain http for a
            # local demo: cookies without the Secure flag, loopback only.
            lines += ["[console]", "enabled = true", 'host = "127.0.0.1"', f"port = {self._console_port}",
                      "secure_cookies = false", ""]
        text = "\n".join(lines)
        if cfg.server_config_extra:
            text += "\n" + cfg.server_config_extra.format(console_port=self._console_port) + "\n"
        path = self.server_config
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        config = load_config(path)  # refuse now what the server would refuse at start
        if cfg.database_url is not None:  # idempotent: at the newest revision already if init migrated it
            from fleet_server.migrations import upgrade
            from fleet_server.storage.db import create_engine

            engine = create_engine(config.database_url)
            try:
                upgrade(engine)
            finally:
                engine.dispose()

    def _device_plan(self) -> list[tuple[str, Profile]]:
        cfg = self.config
        width = max(3, len(str(cfg.devices - 1)))
        tampered, golden = get_profile(cfg.tampered_profile), get_profile("golden")
        return [(f"{cfg.device_prefix}-{i:0{width}d}", tampered if i < cfg.tampered else golden)
                for i in range(cfg.devices)]

    def _make_devices(self, ca: ManufacturerCA) -> None:
        plan = self._device_plan()
        bad_text = f", {self.config.bad_update} booting a patched kernel after an update" \
            if self.config.bad_update else ""
        self._progress(f"creating {len(plan)} devices ({self.config.tampered} with "
                       f"{self.config.tampered_profile}{bad_text})")
        made: dict[str, SimulatedDevice] = {}
        lock = threading.Lock()
        # The first ``bad_update`` golden devices boot a patched kernel from a trial slot.
        golden = [device_id for device_id, profile in plan if profile.name == "golden"]
        bad = set(golden[:self.config.bad_update])

        def make(entry: tuple[str, Profile]) -> None:
            if self._stop_requested.is_set():
                return
            device_id, profile = entry
            sim = SimulatedDevice.create(self._path("devices", device_id), ca=ca, profile=profile,
                                         trial_tamper="kernel" if device_id in bad else None)
            with lock:
                made[device_id] = sim  # registered before booting: stop() powers it off
            sim.boot()

        try:
            with ThreadPoolExecutor(max_workers=DEVICE_POOL) as pool:
                futures = [pool.submit(make, entry) for entry in plan]
                for done, future in enumerate(futures, start=1):
                    future.result()
                    if done % max(1, len(plan) // 5) == 0 and done < len(plan):
                        self._progress(f"  {done}/{len(plan)} devices made")
        finally:
            for device_id, profile in plan:  # keep the plan's order
                if device_id in made:
                    self.devices[device_id] = _Device(device_id, profile, made[device_id],
                                                      self._path("agents", device_id))

    def _store_policy(self) -> None:
        from fleet_server.cli import main as fleet_server

        golden = next((d for d in self.devices.values() if d.profile.name == "golden"), None)
        if golden is not None:
            log_path = golden.sim.eventlog_path
        else:  # every device is tampered: the vendor's reference boot, computed in software
            from firmware_sim.boot import BootMedia, build_boot_log

            profile = get_profile("golden")
            log_path = self._path("golden-eventlog.bin")
            log_path.write_bytes(build_boot_log(BootMedia.from_specs(profile.image_specs()),
                                                profile.boot_settings).to_bytes())
        profile = get_profile("golden")
        name = f"{profile.device_class}-{profile.firmware.version}"
        self._progress(f"reference policy {name} from {log_path.parent.name}/{log_path.name}")
        _run_cli(fleet_server, ["policy", "from-eventlog", str(log_path), "--name", name, "--device-class",
                                profile.device_class, "--config", str(self.server_config)],
                 "fleet-server policy from-eventlog")

    def _publish_model(self) -> None:
        import json

        from fleet_server.cli import main as fleet_server
        from protocol.modelpkg import IoSignature

        cfg = self.config
        assert cfg.model is not None
        name, profile = cfg.effective_model_name, get_profile("golden")
        policy = [] if cfg.model_policy is None else ["--policy", str(cfg.model_policy)]
        argv = ["model", "publish", str(cfg.model), "--name", name, "--version", cfg.model_version, *policy,
                "--deploy", "--json", "--config", str(self.server_config)]
        published = json.loads(_run_cli(fleet_server, argv, "fleet-server model publish"))
        self.model_signature = IoSignature.from_json(published["io_signature"], "io_signature")
        _run_cli(fleet_server, ["model", "entitle", name, "--device-class", profile.device_class,
                                "--config", str(self.server_config)], "fleet-server model entitle")
        self._progress(f"model {name} {published['version']} published ({published['package_size']} bytes) "
                       f"and entitled to {profile.device_class}")

    def _preregister(self, ca: ManufacturerCA) -> None:
        from fleet_server.config import load_config
        from fleet_server.enrollment.ekcert import load_trust_bundle
        from fleet_server.service import admin
        from fleet_server.storage.db import create_engine
        from fleet_server.storage.repo import Repository

        self._progress("pre-registering EK certificates")
        with ThreadPoolExecutor(max_workers=DEVICE_POOL) as pool:
            certs = list(pool.map(lambda d: d.sim.ek_certificate("rsa"), self.devices.values()))
        config = load_config(self.server_config)
        bundle = load_trust_bundle(ca.bundle.read_bytes())
        repo = Repository(create_engine(config.database_url))
        try:
            for device, cert in zip(self.devices.values(), certs, strict=True):
                admin.preregister_ek(repo, cert, now=_now_ms(), device_class=device.profile.device_class,
                                     note=f"fleet harness {device.id}", trust_bundle=bundle)
        finally:
            repo.dispose()

    def _provision_agents(self) -> None:
        import datetime as dt
        import hashlib

        from fleet_server import pki
        from fleet_server.config import load_config
        from fleet_server.keys import load_model_signing_key, load_signing_key

        self._progress("issuing claim credentials")
        config = load_config(self.server_config)
        ca = pki.load_ca_files(config.fleet_ca_cert, config.fleet_ca_key)
        public = load_signing_key(config.signing_key).public_pem()
        model_public = (load_model_signing_key(config.models.signing_key).public_pem()
                        if self.config.model is not None else None)
        now = time.time()
        for device in self.devices.values():
            claim = device.agent_dir / "claim"
            claim.mkdir(parents=True)
            os.chmod(device.agent_dir, 0o700)
            credential = pki.issue_claim_cert(ca, device.id, now=now, validity=dt.timedelta(days=2))
            pki.write_private_key(claim / "claim.key", credential.key_pem)
            pki.write_certificate(claim / "claim.pem", credential.cert_pem)
            pki.write_certificate(claim / "fleet-ca.pem", ca.cert_pem)
            pki.write_certificate(claim / "server-signing.pub.pem", public)
            if model_public is not None:
                pki.write_certificate(claim / "model-signing.pub.pem", model_public)
                device.token = secrets.token_urlsafe(24)
                digest = hashlib.sha256(device.token.encode()).hexdigest()
                fd = os.open(device.agent_dir / "clients.toml", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(f'[clients.{QUERY_CLIENT}]\ntoken_sha256 = "{digest}"\n')
            self._write_agent_config(device)

    def _write_agent_config(self, device: _Device) -> Path:
        assert self.broker is not None and self.broker.port is not None
        claim = device.agent_dir / "claim"
        text = "\n".join([
            "# Written by the fleet harness (firmware_sim.fleet); reference: docs/agent.md.",
            f"device_id = {_toml_str(device.id)}",
            f"device_class = {_toml_str(device.profile.device_class)}",
            f"firmware_version = {_toml_str(device.profile.firmware.version)}",
            'state_dir = "state"',
            f"eventlog = {_toml_str(str(device.sim.eventlog_path))}",
            "[tpm]",
            f"tcti = {_toml_str(device.sim.tcti)}",
            "[mqtt]",
            'host = "127.0.0.1"',
            f"port = {self.broker.port}",
            f"ca_cert = {_toml_str(str(claim / 'fleet-ca.pem'))}",
            f"claim_cert = {_toml_str(str(claim / 'claim.pem'))}",
            f"claim_key = {_toml_str(str(claim / 'claim.key'))}",
            "reconnect_min = 0.2",
            "reconnect_max = 2.0",
            "[server]",
            f"signing_public_key = {_toml_str(str(claim / 'server-signing.pub.pem'))}",
            # A request sent before the server subscribed is lost; ask again soon.
            "enroll_retry = 10",
            "[log]",
            f"level = {_toml_str(self.config.agent_log_level)}",
            "",
        ])
        if self.update_root is not None:
            text += device.sim.update_table(self.update_root)
        if self.config.model is not None:
            text += "\n".join([
                "[models]",
                f"signing_public_key = {_toml_str(str(claim / 'model-signing.pub.pem'))}",
                f"telemetry_interval = {MODEL_TELEMETRY_INTERVAL}",
                "[inference]",
                "port = 0",
                'clients_file = "clients.toml"',
                "",
            ])
        path = device.agent_dir / "agent.toml"
        path.write_text(text, encoding="utf-8")
        return path

    # -- the server --------------------------------------------------------------------------------
    def _broker_log_text(self) -> bytes:
        assert self.broker is not None
        try:
            return self.broker.log_path.read_bytes()
        except OSError:
            return b""

    def start_server(self, *, timeout: float = 60.0) -> None:
        """Start ``fleet-server run`` and wait until each of its workers connected to the broker."""
        if self.server_pid is not None:
            raise HarnessError("the fleet server is already running")
        mark = len(self._broker_log_text())
        log_path = self.logs_dir / "server.stderr.log"
        self._server_log = open(log_path, "ab")  # noqa: SIM115 - closed in stop_server
        cmd = [sys.executable, "-m", "fleet_server.cli", "run", "--config", str(self.server_config),
               *self.config.server_args]
        try:
            self._server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._server_log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            self._server_log.close()
            raise HarnessError(f"cannot start the fleet server: {exc}") from None
        self._progress(f"fleet-server run (pid {self._server.pid})")
        deadline = time.monotonic() + timeout
        wanted = self.config.server_workers
        while True:
            connected = self._broker_log_text()[mark:].count(b" as fleet-server-")
            if connected >= wanted:
                return
            if self._server.poll() is not None:
                raise HarnessError(f"the fleet server exited with status {self._server.returncode}: "
                                   f"{self._server_tail()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"the fleet server did not connect to the broker within {timeout:.0f}s: "
                                   f"{self._server_tail()}")
            self._check_interrupted()
            time.sleep(0.05)

    def _server_tail(self) -> str:
        try:
            lines = (self.logs_dir / "server.stderr.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return lines[-1][:300] if lines else "no output"

    def stop_server(self, timeout: float = SERVER_STOP_TIMEOUT) -> int | None:
        """SIGTERM the server and wait (SIGKILL to its process group after ``timeout``); its exit status."""
        proc, self._server = self._server, None
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise HarnessError(f"the fleet server did not stop within {timeout:.0f}s; "
                                       "killed") from None
            # Workers of a multi-process server are in its process group: none may outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.returncode
        finally:
            if self._server_log is not None:
                self._server_log.close()
                self._server_log = None

    def kill_server(self) -> None:
        """SIGKILL the server and all its workers (a crash: no batch finished, no counters flushed)."""
        proc, self._server = self._server, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if self._server_log is not None:
            self._server_log.close()
            self._server_log = None
        self._progress("fleet server killed (SIGKILL)")

    # -- releases (with ``updates``) ------------------------------------------------------------------
    def publish_release(self, version: str, profile: str = "golden") -> str:
        """Build ``profile``'s images at firmware ``version`` as a release bundle (what
        ``firmware-sim release build OUT --from PROFILE --version V`` writes, into
        ``<workdir>/releases/``) and publish it (``fleet-server release add``); its TUF target path."""
        import json

        from firmware_sim.release import build_release, from_profile
        from fleet_server.cli import main as fleet_server

        if self.update_root is None:
            raise HarnessError("the fleet has no update repository (FleetConfig.updates)")
        chosen = get_profile(profile)
        bundle = self._path("releases", f"{chosen.name}-{version}")
        bundle.parent.mkdir(exist_ok=True)
        build_release(bundle, from_profile(chosen, version))
        argv = ["release", "add", str(bundle), "--class", chosen.device_class, "--version", version, "--json",
                "--config", str(self.server_config)]
        out = _run_cli(fleet_server, argv, "fleet-server release add")
        target = str(json.loads(out)["target"])
        self._progress(f"release {target} published")
        return target

    def _add_release(self, path: Path) -> None:
        """Publish a release bundle folder (``fleet-server release add``, class and version from its
        ``release.json``) and make the :attr:`update_driver` that assigns it during the window (or
        rolls it out, with a ``rollout`` plan)."""
        import json

        from firmware_sim.fleet_rollout import RolloutDriver, RolloutPlanFile
        from firmware_sim.fleet_updates import ReleaseAtTime, ReleaseBundle
        from fleet_server.cli import main as fleet_server

        bundle = ReleaseBundle.read(path)
        argv = ["release", "add", str(bundle.path), "--class", bundle.device_class, "--version",
                bundle.version, "--json", "--config", str(self.server_config)]
        target = str(json.loads(_run_cli(fleet_server, argv, "fleet-server release add"))["target"])
        self._progress(f"release {target} published")
        cfg = self.config
        if cfg.rollout is not None:
            self.update_driver = RolloutDriver(target, bundle.version, RolloutPlanFile.read(cfg.rollout),
                                               at_s=cfg.effective_update_at, deadline_s=cfg.update_deadline)
        else:
            self.update_driver = ReleaseAtTime(target, bundle.version, at_s=cfg.effective_update_at,
                                               deadline_s=cfg.update_deadline)

    def assign_release(self, target: str, device_ids: Sequence[str], *,
                       deadline_s: float | None = None) -> dict[str, str]:
        """``fleet-server release assign`` (``--deadline-s`` if given): ``{device_id: assignment_id}``."""
        import json

        from fleet_server.cli import main as fleet_server

        argv = ["release", "assign", target, "--json", "--config", str(self.server_config)]
        if deadline_s is not None:
            argv += ["--deadline-s", repr(float(deadline_s))]
        for device_id in device_ids:
            argv += ["--device", device_id]
        out = _run_cli(fleet_server, argv, "fleet-server release assign")
        return {str(a["device_id"]): str(a["assignment_id"]) for a in json.loads(out)["assignments"]}

    def create_rollout(self, target: str, plan: Path, *, canary: int | None = None,
                       canary_devices: Sequence[str] = (), devices: Sequence[str] = ()) -> dict[str, Any]:
        """``fleet-server rollout create TARGET --plan PLAN --json`` (``--canary``, ``--canary-device``
        and ``--device`` if given; they override the plan's keys): the rollout as ``rollout show
        --json`` prints it."""
        import json

        from fleet_server.cli import main as fleet_server

        argv = ["rollout", "create", target, "--plan", str(plan), "--json",
                "--config", str(self.server_config)]
        if canary is not None:
            argv += ["--canary", str(canary)]
        for device_id in canary_devices:
            argv += ["--canary-device", device_id]
        for device_id in devices:
            argv += ["--device", device_id]
        out: dict[str, Any] = json.loads(_run_cli(fleet_server, argv, "fleet-server rollout create"))
        return out

    def rollout_operation(self, operation: str, rollout_id: str) -> str:
        """``fleet-server rollout pause|resume|cancel|abort ID`` (what an operator runs during a
        rollout); its output line."""
        from fleet_server.cli import main as fleet_server

        if operation not in ("pause", "resume", "cancel", "abort"):
            raise HarnessError(f"no rollout operation {operation!r}")
        argv = ["rollout", operation, rollout_id, "--config", str(self.server_config)]
        return _run_cli(fleet_server, argv, f"fleet-server rollout {operation}").strip()

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """A rollout as ``fleet-server rollout show ID --json`` prints it (state, phases, members),
        read from the server database directly (no captured CLI output, see :meth:`assignments`)."""
        from fleet_server.service import rollouts

        return rollouts.view_json(rollouts.view(self._repo(), rollout_id, now=_now_ms()))

    def assignments(self, target: str) -> dict[str, dict[str, Any]]:
        """The assignments of release ``target`` by id, as ``fleet-server release show --json`` prints
        them (``state``, ``reason``, ``device_id``, ``updated_at``...), read from the server database
        directly: polling it runs no CLI, whose captured output would swallow the progress lines
        other threads print meanwhile."""
        from fleet_server.service.releases import assignment_json

        repo = self._repo()
        found = repo.releases.release(target)
        if found is None:
            raise HarnessError(f"no release {target!r}")
        records = repo.releases.assignments(release_id=found.id, limit=max(100, 10 * len(self.devices)))
        return {str(rec.id): assignment_json(rec) for rec in records}

    # -- the broker --------------------------------------------------------------------------------
    def restart_broker(self) -> None:
        """Stop and start Mosquitto on the same port (every client must reconnect)."""
        if self.broker is None:
            raise HarnessError("no broker")
        self.broker.restart()
        self._progress("broker restarted")

    # -- agents ------------------------------------------------------------------------------------
    def _start_agents(self) -> None:
        count = self.config.effective_agent_processes
        self._progress(f"starting {len(self.devices)} agents in {count} processes")
        self.power = PowerCycler(self._agent_reboot)
        self.hosts = launch_hosts(count, self.logs_dir, self.config.agent_log_level,
                                  on_reboot=self.power.request)
        groups: list[list[tuple[str, Path]]] = [[] for _ in self.hosts]
        for i, device in enumerate(self.devices.values()):
            host = self.hosts[i % count]
            device.host = host
            host.device_ids.append(device.id)
            groups[i % count].append((device.id, device.agent_dir / "agent.toml"))
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda pair: pair[0].start_agents(pair[1]), zip(self.hosts, groups, strict=True)))

    def agent_status(self) -> dict[str, AgentSnapshot]:
        """Every agent's snapshot (phase, verdict, counters...)."""
        out: dict[str, AgentSnapshot] = {}
        for host in self.hosts:
            out.update(host.status())
        return out

    def stop_agent(self, device_id: str) -> None:
        device = self._device(device_id)
        if device.host is not None:
            device.host.stop_agents([device_id])

    def start_agent(self, device_id: str) -> None:
        device = self._device(device_id)
        if device.host is None:
            raise HarnessError(f"device {device_id} has no agent host")
        device.host.start_agents([(device_id, self._write_agent_config(device))])

    def power_cycle(self, device_id: str, profile: str | None = None) -> None:
        """Power-cycle a device: its agent stops, the TPM restarts (PCRs reset, new ports), the
        measured boot of the slot the bootloader chooses runs again (reflashing ``profile`` into the
        active slot first if given), and a new agent starts with the same state folder (same AK and
        device certificate), as after a real reboot.  Also what an agent's reboot request runs."""
        device = self._device(device_id)
        self.stop_agent(device_id)
        if profile is not None:
            device.sim.reflash(profile)
            device.profile = get_profile(profile)
        device.sim.power_cycle()
        self.start_agent(device_id)
        self._progress(f"{device_id} power-cycled")

    def _agent_reboot(self, device_id: str, reason: str) -> None:
        """An agent asked its platform to reboot (runs on the :attr:`power` thread)."""
        self._progress(f"{device_id} reboots: {reason}")
        self.power_cycle(device_id)

    def _device(self, device_id: str) -> _Device:
        try:
            return self.devices[device_id]
        except KeyError:
            raise HarnessError(f"no device {device_id!r}") from None

    # -- observing ---------------------------------------------------------------------------------
    def _db(self) -> Any:
        if self._engine is None:
            from fleet_server.config import load_config
            from fleet_server.storage.db import create_engine

            self._engine = create_engine(load_config(self.server_config).database_url)
        return self._engine

    def device_states(self) -> dict[str, DeviceRow]:
        """Every device's state and reasons, from the server database."""
        return read_devices(self._db())

    def golden_device_ids(self) -> list[str]:
        """The devices built with the golden profile (those a release is shipped to), in order."""
        return [d.id for d in self.devices.values() if d.profile.name == "golden"]

    def _repo(self) -> Any:
        from fleet_server.storage.repo import Repository

        return Repository(self._db())

    def firmware_versions(self) -> dict[str, str]:
        """device id -> the firmware version the server records for it."""
        repo = self._repo()
        out: dict[str, str] = {}
        for device_id in self.devices:
            record = repo.device(device_id)
            if record is not None:
                out[device_id] = record.firmware_version
        return out

    def last_appraisals(self, device_ids: Sequence[str]) -> dict[str, int]:
        """device id -> when (ms) its newest attestation result was stored (devices with one)."""
        repo = self._repo()
        out: dict[str, int] = {}
        for device_id in device_ids:
            newest = repo.attestations(device_id, limit=1)
            if newest:
                out[device_id] = int(newest[0].stored_at)
        return out

    def states_between(self, device_id: str, before: str, start_ms: int, end_ms: int | None) -> list[str]:
        """``before`` and then every state the device changed to from ``start_ms`` to ``end_ms`` (or
        now), as the server's state history has them (repeats in a row collapsed)."""
        changes = sorted(self._repo().state_history(device_id, limit=1000), key=lambda c: c.at)
        seen = [before]
        for change in changes:
            if change.at >= start_ms and (end_ms is None or change.at <= end_ms) \
                    and change.to_state != seen[-1]:
                seen.append(change.to_state)
        return seen

    def progress(self, line: str) -> None:
        """One progress line (what the harness reports its steps with)."""
        self._progress(line)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a stop is requested."""
        self._stop_requested.wait(seconds)

    def attestation_counts(self) -> dict[str, int]:
        """Attestations stored per device so far (all time), from the server database."""
        return attestation_counts(self._db())

    def _state_summary(self) -> str:
        counts: dict[str, int] = {}
        for row in self.device_states().values():
            counts[row.state] = counts.get(row.state, 0) + 1
        return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no devices"

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float, *,
                 poll: float = 0.2) -> None:
        """Poll ``predicate`` until true; :class:`HarnessError` after ``timeout`` seconds, if the server
        died, or :class:`Interrupted` on a stop request."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self._check_interrupted()
            if self._server is not None and self._server.poll() is not None:
                raise HarnessError(f"the fleet server exited with status {self._server.returncode}: "
                                   f"{self._server_tail()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
            self._stop_requested.wait(poll)

    def wait_settled(self, timeout: float) -> None:
        """Wait until every device has been appraised at least once (trusted or untrusted)."""
        self._progress(f"waiting for {len(self.devices)} devices to be attested")
        last_check = 0.0

        def settled() -> bool:
            nonlocal last_check
            rows = self.device_states()
            pending = [d for d in self.devices if d not in rows or rows[d].state not in SETTLED_STATES]
            if not pending:
                return True
            if time.monotonic() - last_check > 2.0:  # an agent that failed will never settle
                last_check = time.monotonic()
                failed = [s for s in self.agent_status().values() if s.phase == "failed"]
                if failed:
                    raise HarnessError(f"agent of {failed[0].device_id} failed: {failed[0].error}")
            return False

        try:
            self.wait_for(settled, "every device to be attested", timeout, poll=0.25)
        except Interrupted:
            raise
        except HarnessError as exc:
            rows = self.device_states()
            pending = [f"{d} {rows[d].state if d in rows else 'not enrolled'}" for d in self.devices
                       if d not in rows or rows[d].state not in SETTLED_STATES]
            if not pending:
                raise
            raise HarnessError(f"{exc.diagnostics()}; {len(pending)} devices not attested "
                               f"(e.g. {', '.join(pending[:3])})") from None

    def wait_models(self, timeout: float) -> None:
        """Wait until every trusted device's agent has the model downloaded, keyed and unlocked, or
        reported to the server that its onnxruntime cannot load it (:attr:`model_load_errors`: the
        wait ends then, with the reason, rather than at the timeout)."""
        name, version = self.config.effective_model_name, self.config.model_version
        self._progress(f"waiting for trusted devices to unlock {name}")

        def ready() -> bool:
            rows = self.device_states()
            snapshots = self.agent_status()
            trusted = [d for d in self.devices if d in rows and rows[d].state == "trusted"]
            waiting = [d for d in trusted if not (d in snapshots and snapshots[d].model_unlocked(name))]
            if not waiting:
                return True
            failures = read_load_failures(self._db(), name, version)
            if not all(d in failures for d in waiting):
                return False
            self.model_load_errors = {d: failures[d] for d in waiting}
            return True

        try:
            self.wait_for(ready, f"trusted devices to unlock {name}", timeout, poll=0.25)
        except Interrupted:
            raise
        except HarnessError as exc:
            snapshots = self.agent_status()
            locked = [f"{d} ({(snapshots[d].models.get(name) or {}).get('lock_reason') or 'no package'})"
                      for d in self.devices if d in snapshots and not snapshots[d].model_unlocked(name)]
            raise HarnessError(f"{exc.diagnostics()}; locked: {', '.join(locked[:3])}") from None
        if self.model_load_errors:
            self._progress(self.model_load_message())

    def model_load_message(self) -> str:
        """One line: which devices could not load the model, and onnxruntime's reason ("" if none)."""
        errors = self.model_load_errors
        if not errors:
            return ""
        cfg = self.config
        first = sorted(errors)[0]
        return (f"model {cfg.effective_model_name} {cfg.model_version} could not be loaded on {len(errors)} "
                f"device{'s' if len(errors) != 1 else ''} (e.g. {first}): {errors[first]}")

    def models_unlocked(self, snapshots: dict[str, AgentSnapshot]) -> dict[str, bool]:
        name = self.config.effective_model_name
        return {d: d in snapshots and snapshots[d].model_unlocked(name) for d in self.devices}

    def _query_load(self) -> QueryLoad | None:
        cfg = self.config
        if cfg.model is None or cfg.queries == 0 or self.model_signature is None:
            return None

        def addresses() -> dict[str, str | None]:
            return {d: s.inference_address for d, s in self.agent_status().items()}

        self._progress(f"sending {cfg.queries} queries per device, "
                       f"one every {cfg.effective_query_interval:g} s")
        return QueryLoad(model=cfg.effective_model_name, signature=self.model_signature,
                         tokens={d.id: d.token for d in self.devices.values()}, addresses=addresses,
                         queries=cfg.queries, interval=cfg.effective_query_interval)

    # -- measuring ---------------------------------------------------------------------------------
    def _cpu(self) -> CpuSample:
        broker = self.broker.pid if self.broker is not None else None
        return read_cpu(server=self.server_pid, broker=broker,
                        agents=[h.pid for h in self.hosts if h.pid is not None])

    def _messages(self, snapshots: dict[str, AgentSnapshot]) -> int:
        return sum(s.messages for s in snapshots.values())

    def run(self, duration: float | None = None) -> Measurement:
        """Measure a window of ``duration`` seconds (default the configuration's; ``None`` runs until
        :meth:`request_stop`).  A stop request ends the window early (``interrupted`` is set)."""
        if self.server_pid is None or not self.hosts:
            raise HarnessError("the fleet is not running (call start() first)")
        length = self.config.duration if duration is None else duration
        if self.model_load_errors:  # nothing to measure with a model the devices cannot run
            length = 0.0
            self._progress("not measuring: the model could not be loaded")
        elif length is not None:
            self._progress(f"measuring for {length:g} s")
        else:
            self._progress("running until interrupted")
        msgs0 = self._messages(self.agent_status())
        cpu0 = self._cpu()
        start = _now_ms()
        load = None if self.model_load_errors else self._query_load()
        if load is not None:
            load.start()
        began = time.monotonic()
        end_at = None if length is None else began + length
        driver = self.update_driver
        while not self._stop_requested.is_set():
            if driver is not None:
                driver.tick(self, time.monotonic() - began)
            remaining = None if end_at is None else end_at - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if self._server is not None and self._server.poll() is not None:
                raise HarnessError(f"the fleet server exited with status {self._server.returncode}: "
                                   f"{self._server_tail()}")
            self._stop_requested.wait(1.0 if remaining is None else min(1.0, remaining))
        end = _now_ms()
        cpu = self._cpu().minus(cpu0)
        usage: dict[str, ModelUsage] = {}
        if load is not None:  # the last round may still be in flight: let it finish, send no more
            if not self._stop_requested.is_set():
                load.wait(min(5.0, load.interval))
            load.stop()
            usage = load.usage()
        snapshots = self.agent_status()
        msgs = self._messages(snapshots) - msgs0
        updates: dict[str, dict[str, Any]] = {}
        if driver is not None:
            if not self._stop_requested.is_set():
                driver.finish(self)
            updates = driver.device_reports(self)
        rows = self.device_states()
        return Measurement(start_ms=start, end_ms=end, cpu=cpu, mqtt_messages=msgs, devices=rows,
                           interrupted=self._stop_requested.is_set(), agents=snapshots, model_usage=usage,
                           updates=updates)

    def report(self, measurement: Measurement) -> dict[str, Any]:
        """The report of a measured window, from the server database (see :mod:`firmware_sim.fleet_report`).

        Call it after :meth:`stop` (the database is then final) and before :meth:`cleanup`.
        """
        if self.server_pid is not None:
            time.sleep(REPORT_GRACE_S)  # the batch in progress at the window's end commits
        window = read_window(self._db(), measurement.start_ms, measurement.end_ms)
        cfg = self.config
        extra: dict[str, Any] = {
            "interrupted": measurement.interrupted,
            "settings": {"devices": cfg.devices, "tampered": cfg.tampered,
                         "tampered_profile": cfg.tampered_profile, "interval_s": cfg.interval,
                         "jitter_s": cfg.effective_jitter, "scheduler_tick_s": cfg.effective_tick,
                         "server_workers": cfg.server_workers,
                         "agent_processes": cfg.effective_agent_processes,
                         "batch_linger_s": cfg.batch_linger, "cpus": os.cpu_count(),
                         "release": None if cfg.release is None else str(cfg.release),
                         "bad_update": cfg.bad_update,
                         "rollout": None if cfg.rollout is None else str(cfg.rollout)},
        }
        per_device: dict[str, dict[str, Any]] = {}
        if cfg.model is not None:
            unlocked = self.models_unlocked(measurement.agents)
            load_errors = read_load_failures(self._db(), cfg.effective_model_name, cfg.model_version)
            for device_id in self.devices:
                use = measurement.model_usage.get(device_id, ModelUsage())
                per_device[device_id] = {"model": {"unlocked": unlocked[device_id], "served": use.served,
                                                   "refused": use.refused,
                                                   "refusals": dict(sorted(use.refusals.items())),
                                                   "load_error": load_errors.get(device_id)}}
            extra["model"] = {
                "name": cfg.effective_model_name, "version": cfg.model_version,
                "queries_per_device": cfg.queries, "query_interval_s": cfg.effective_query_interval,
                "unlocked_devices": sum(unlocked.values()),
                "load_failed_devices": sum(1 for d in self.devices if d in load_errors),
                "served_total": sum(u.served for u in measurement.model_usage.values()),
                "refused_total": sum(u.refused for u in measurement.model_usage.values()),
            }
        for device_id, entries in measurement.updates.items():
            per_device.setdefault(device_id, {}).update(entries)
        if self.update_driver is not None:
            extra.update(self.update_driver.summary())
        infos = [DeviceInfo(d.id, d.profile.name) for d in self.devices.values()]
        return build_report(devices=infos, rows=measurement.devices, window=window, cpu=measurement.cpu,
                            mqtt_messages=measurement.mqtt_messages, extra=extra, per_device=per_device)


@contextlib.contextmanager
def running_fleet(config: FleetConfig, *, progress: Callable[[str], None] | None = None
                  ) -> Iterator[FleetHarness]:
    """``with running_fleet(FleetConfig(...)) as fleet:`` - a started harness, closed at the end."""
    harness = FleetHarness(config, progress=progress)
    harness.start()
    try:
        yield harness
    finally:
        harness.close()


def measure(config: FleetConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the fleet, measure ``config.duration`` seconds, stop everything, return the report."""
    harness = FleetHarness(replace(config), progress=progress)
    try:
        harness.start()
        measurement = harness.run()
        harness.stop()
        return harness.report(measurement)
    finally:
        harness.close()


__all__ = ["SETTLED_STATES", "FleetConfig", "FleetHarness", "HarnessError", "Interrupted", "Measurement",
           "measure", "running_fleet"]
