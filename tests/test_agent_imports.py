"""An edge device installs only ``.[agent]``: no agent module may import server-side packages."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import agent

FORBIDDEN = ("fleet_server", "flask", "sqlmodel", "sqlalchemy")


def test_agent_modules_import_no_server_packages() -> None:
    names = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, prefix="agent."))
    # The modules of this change must be among them (a rename would otherwise escape the check).
    for required in ("agent.cli", "agent.service", "agent.enroll", "agent.attest", "agent.trust",
                     "agent.identity", "agent.config", "agent.statefile", "agent.log", "agent.tpm.adapter"):
        assert required in names
    script = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    root = Path(agent.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_the_check_can_fail() -> None:
    # The same subprocess check notices a server import (so an empty result above means something).
    script = ("import fleet_server.pki, sys, json\n"
              f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         check=False)
    assert "fleet_server" in json.loads(out.stdout)
