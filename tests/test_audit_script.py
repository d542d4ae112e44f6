"""scripts/audit.py (`make audit`): a fixable vulnerability fails, one without a fix and an unaudited
(unknown) package are reported without failing, an unreachable service does not fail the run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit_script", ROOT / "scripts" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit_script"] = module
    spec.loader.exec_module(module)
    return module


def _report(*vulns: dict[str, object], skipped: bool = False) -> dict[str, object]:
    deps: list[dict[str, object]] = [{"name": "requests", "version": "2.0.0", "vulns": list(vulns)}]
    if skipped:
        deps.append({"name": "edge-only", "skip_reason": "Dependency not found on PyPI"})
    return {"dependencies": deps}


def test_a_vulnerability_with_a_fix_fails(capsys: pytest.CaptureFixture[str]) -> None:
    audit = _script()
    assert audit.judge("dev.lock", _report({"id": "PYSEC-1", "fix_versions": ["2.31.0"]})) is False
    assert "requests 2.0.0: PYSEC-1 - fixed in 2.31.0" in capsys.readouterr().out


def test_no_fix_and_unknown_packages_are_reported_not_failing(capsys: pytest.CaptureFixture[str]) -> None:
    audit = _script()
    assert audit.judge("dev.lock", _report({"id": "GHSA-x", "fix_versions": []}, skipped=True)) is True
    out = capsys.readouterr().out
    assert "GHSA-x - no fix yet (not failing)" in out and "1 not audited" in out and "edge-only" in out
    assert audit.judge("dev.lock", _report()) is True


def test_an_unreachable_service_is_reported_and_does_not_fail(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    audit = _script()
    monkeypatch.setattr(audit, "PROBE", "http://127.0.0.1:9/unreachable")  # discard port: refused at once
    assert audit.main() == 0
    assert "unreachable" in capsys.readouterr().out
