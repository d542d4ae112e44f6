#!/usr/bin/env python3
"""Do the lock files still match pyproject.toml? (stdlib only; no network)

Two checks per lock file, because re-resolving needs the network:
* every top-level requirement of its extra (``project.dependencies`` plus the extra, self-references
  such as ``edge-attest[agent,server]`` expanded) is pinned in the lock;
* the lock's ``# pyproject-dependencies-sha256:`` stamp, written by ``make lock`` (``--stamp``), equals
  the hash of pyproject's dependency sections now: any edit to them (a new bound, a removed package)
  needs a re-lock, even one the name check cannot see.

Usage: check_locks.py [--root DIR] [--stamp]   (exit 1 and one line per problem when they do not match)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

LOCKS = {"requirements/dev.lock": "dev", "requirements/agent.lock": "agent"}
STAMP = "# pyproject-dependencies-sha256: "
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def stamp_of(project: dict) -> str:
    sections = {k: project.get(k) for k in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()


def top_level(project: dict, extra: str) -> set[str]:
    self_name, extras = _norm(project["name"]), project.get("optional-dependencies", {})
    names: set[str] = set()
    seen: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            m = _REQ.match(req)
            if m is None:
                raise ValueError(f"cannot parse requirement {req!r}")
            if _norm(m.group(1)) != self_name:
                names.add(_norm(m.group(1)))
                continue
            for sub in (m.group(2) or "").split(","):
                if sub.strip() and sub.strip() not in seen:
                    seen.add(sub.strip())
                    add(extras.get(sub.strip(), []))

    add(project.get("dependencies", []))
    seen.add(extra)
    add(extras.get(extra, []))
    return names


def problems(root: Path) -> list[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    want, found = stamp_of(project), []
    for rel, extra in LOCKS.items():
        lines = (root / rel).read_text().splitlines()
        pinned = {_norm(m.group(1)) for line in lines if (m := _PIN.match(line))}
        found += [f"{rel}: {name} is required by pyproject.toml ([{extra}]) but not pinned; run `make lock`"
                  for name in sorted(top_level(project, extra) - pinned)]
        stamps = [line[len(STAMP):].strip() for line in lines if line.startswith(STAMP)]
        if stamps != [want]:
            found.append(f"{rel}: pyproject.toml's dependencies changed since the lock was made "
                         "(stamp differs); run `make lock`")
    return found


def write_stamps(root: Path) -> None:
    want = stamp_of(tomllib.loads((root / "pyproject.toml").read_text())["project"])
    for rel in LOCKS:
        lines = [ln for ln in (root / rel).read_text().splitlines() if not ln.startswith(STAMP)]
        at = next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))
        lines.insert(at, STAMP + want)
        (root / rel).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--stamp", action="store_true",
                        help="write the stamp into the lock files (make lock)")
    args = parser.parse_args(argv)
    try:
        if args.stamp:
            write_stamps(args.root)
            return 0
        found = problems(args.root)
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"check_locks: error: {exc}", file=sys.stderr)
        return 1
    for line in found:
        print(f"check_locks: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
