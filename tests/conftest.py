"""Shared fixtures: a manufacturer CA, real swtpm instances on free ports, tpm2-tools environment.

Every process a fixture starts is stopped in its teardown, and every file lives under pytest's
temporary directories.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.swtpm import Swtpm

SHARED_EVENTLOGS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "eventlogs"
TESTDATA = Path(__file__).resolve().parent / "data"


def _shared_eventlogs() -> Path:
    env = os.environ.get("EDGE_SHARED_EVENTLOGS")
    if env:
        return Path(env)
    if SHARED_EVENTLOGS.is_dir():
        return SHARED_EVENTLOGS
    return TESTDATA / "eventlogs"  # a copy committed with the tests, for clean CI checkouts


@pytest.fixture(scope="session")
def shared_eventlogs() -> Path:
    """Folder of real TCG event logs with their tpm2-tools replay (`*.bin.pcrs.json`)."""
    return _shared_eventlogs()


@pytest.fixture(scope="session")
def manufacturer_ca(tmp_path_factory: pytest.TempPathFactory) -> ManufacturerCA:
    """The simulated 'TPM manufacturer' CA that signs swtpm EK certificates."""
    return ManufacturerCA.load_or_create(tmp_path_factory.mktemp("manufacturer"))


@pytest.fixture(scope="session")
def _swtpm_template(tmp_path_factory: pytest.TempPathFactory, manufacturer_ca: ManufacturerCA) -> Path:
    """One manufactured TPM state, copied by `swtpm` so each test gets a fresh TPM quickly."""
    state = tmp_path_factory.mktemp("swtpm-template") / "tpm"
    Swtpm(state).manufacture(manufacturer_ca)
    return state


@pytest.fixture
def swtpm(tmp_path: Path, _swtpm_template: Path) -> Iterator[Swtpm]:
    """A running swtpm with factory-fresh state (same EK as other tests' `swtpm`)."""
    state = tmp_path / "tpm"
    shutil.copytree(_swtpm_template, state)
    tpm = Swtpm(state)
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.destroy()


@pytest.fixture
def make_swtpm(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> Iterator[object]:
    """Factory for independently manufactured swtpms (each with its own EK): ``make_swtpm(name)``."""
    made: list[Swtpm] = []

    def factory(name: str, ca: ManufacturerCA | None = None) -> Swtpm:
        tpm = Swtpm(tmp_path / name / "tpm")
        tpm.manufacture(ca or manufacturer_ca)
        tpm.start()
        made.append(tpm)
        return tpm

    try:
        yield factory
    finally:
        for tpm in made:
            tpm.destroy()


def tools_env(tpm: Swtpm) -> dict[str, str]:
    """Environment for running tpm2-tools against ``tpm``."""
    return {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti}


@pytest.fixture(autouse=True)
def _no_leaked_agent_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every agent a test starts is stopped by the end of the test: a thread of an agent (or its
    vault, or its inference API) still running afterwards would act in, and log into, later tests.
    Also drops a log handler ``agent.log.configure_logging`` installed on the root logger during
    the test (it holds that test's captured stderr, closed once the test ends)."""
    import logging
    import threading
    import time

    before = {t.ident for t in threading.enumerate()}
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "edge-agent"]:
        root.removeHandler(handler)

    def leaked() -> list[str]:
        return [t.name for t in threading.enumerate()
                if t.ident not in before and t.is_alive() and t.name.startswith("agent-")]

    deadline = time.monotonic() + 10
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.05)
    names = leaked()
    if names:
        pytest.fail(f"{request.node.nodeid} left agent threads running: {', '.join(sorted(names))}")
