"""`make bench` (python -m firmware_sim.bench): run every benchmark, write `.bench/results.json`.

Each module in :data:`MODULES` exposes ``run() -> dict[str, float]`` returning flat metric names to
numbers. Modules run in order, in separate processes (so one module's memory or threads cannot skew
another's numbers); a module that fails is reported and the others still run. Only numbers go to
the results file; ``--only NAME`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Order matters a little: quick micro-benchmarks first, end-to-end runs (which load the box) last.
MODULES: tuple[str, ...] = (
    "quote_bench",
    "eventlog_bench",
    "release_bench",
    "appraisal_bench",
    "tpm_bench",
    "model_bench",
    "unlock_bench",
    "console_bench",
    "update_bench",
    "rollout_bench",
    "fleet_bench",
    "soft_fleet_bench",
)


def _child(name: str, conn: Any) -> None:
    try:
        mod = __import__(f"firmware_sim.bench.{name}", fromlist=["run"])
        conn.send(("ok", {k: float(v) for k, v in mod.run().items()}))
    except BaseException as exc:  # report, never crash the runner
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))
    finally:
        conn.close()


def run_module(name: str, timeout: float) -> tuple[dict[str, float], str | None]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, child), name=f"bench-{name}")
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            proc.terminate()
            return {}, f"timed out after {timeout:.0f} s"
        status, payload = parent.recv()
    except EOFError:
        return {}, f"exited with status {proc.exitcode} without a result"
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if status == "ok":
        return payload, None
    return {}, str(payload)


def available() -> list[str]:
    here = Path(__file__).parent
    return [m for m in MODULES if (here / f"{m}.py").exists()]


def format_table(results: dict[str, float]) -> str:
    width = max((len(k) for k in results), default=10)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 14}"]
    for k, v in results.items():
        text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.3f}".rstrip("0").rstrip(".")
        lines.append(f"{k:<{width}}  {text:>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_sim.bench", description=__doc__)
    parser.add_argument("--only", action="append", default=[], help="run only these modules")
    parser.add_argument("--out", type=Path, default=Path(".bench/results.json"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per module")
    args = parser.parse_args(argv)
    modules = [m for m in available() if not args.only or m in args.only]
    results: dict[str, float] = {}
    failures: dict[str, str] = {}
    for name in modules:
        t0 = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        metrics, error = run_module(name, args.timeout)
        results.update(metrics)
        if error:
            failures[name] = error
            print(f"bench: {name} FAILED: {error.splitlines()[0]}", file=sys.stderr, flush=True)
        else:
            print(f"bench: {name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, args.out)
    print(format_table(results))
    print(f"\nwritten to {args.out}")
    for name, error in failures.items():
        print(f"\n{name} failed:\n{error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
