"""scripts/check_locks.py: the lock files match pyproject.toml, and a dependency added to pyproject
without re-locking is caught (by name and by the dependency-section stamp)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_locks.py"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True,
                          text=True, timeout=60, check=False)


def _copy(tmp_path: Path) -> Path:
    (tmp_path / "requirements").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for lock in ("dev.lock", "agent.lock"):
        shutil.copy(ROOT / "requirements" / lock, tmp_path / "requirements" / lock)
    return tmp_path


def test_the_repository_locks_match_pyproject() -> None:
    result = _check(ROOT)
    assert result.returncode == 0, result.stderr


def test_an_added_dependency_not_in_the_lock_fails(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    assert '    "mypy>=1.10",\n' in text
    pyproject.write_text(text.replace('    "mypy>=1.10",\n', '    "mypy>=1.10",\n    "left-pad>=1",\n'))
    result = _check(root)
    assert result.returncode == 1
    assert "dev.lock: left-pad is required by pyproject.toml ([dev]) but not pinned" in result.stderr
    assert "agent.lock: left-pad" not in result.stderr  # the agent extra does not need it


def test_a_changed_bound_is_caught_by_the_stamp_and_restamping_clears_it(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"numpy>=1.26"', '"numpy>=1.27"'))
    result = _check(root)
    assert result.returncode == 1
    assert "requirements/agent.lock: pyproject.toml's dependencies changed" in result.stderr
    assert "not pinned" not in result.stderr  # the names still match: only the stamp sees it
    subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--stamp"], check=True, timeout=60)
    assert _check(root).returncode == 0
