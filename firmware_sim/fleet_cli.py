"""``firmware-sim fleet``: run a simulated fleet for a while and write a JSON report.

::

    firmware-sim fleet --devices N [--tampered K] [--tampered-profile P] [--interval S]
                       --duration S [--report FILE] [--workdir DIR] [--keep] ...
                       [--model FILE.onnx [--queries N] [--model-policy FILE.toml]]
                       [--release BUNDLE_DIR [--bad K] [--update-at S] [--rollout PLAN.toml]]

Starts its own Mosquitto, a fleet server (``fleet-server run`` subprocess) and N swtpm-backed
simulated devices with their agents (:class:`firmware_sim.fleet.FleetHarness`), waits until every
device has been attested once, measures ``--duration`` seconds, stops everything and writes the
report (``docs/harness.md``; to stdout without ``--report``).  Progress lines go to stderr; an
error is one line on stderr with exit status 1; Ctrl-C (or SIGTERM) stops everything cleanly
(exit status 130; a report of the shortened window is still written if the window had begun).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from protocol.errors import EdgeError

PROG = "firmware-sim fleet"


def register(sub: Any) -> None:
    """Add the ``fleet`` command to ``firmware-sim``'s sub-parsers."""
    p = sub.add_parser("fleet", help="run a simulated fleet (broker, server, N devices) and report on it",
                       description="Start Mosquitto, a fleet server and N swtpm-backed simulated devices, "
                                   "measure attestation for a while, stop everything, write a JSON report.")
    p.add_argument("--devices", type=int, required=True, metavar="N", help="number of devices")
    p.add_argument("--tampered", type=int, default=0, metavar="K",
                   help="the first K devices boot a tampered profile (default 0)")
    p.add_argument("--tampered-profile", default="tampered-kernel", metavar="P",
                   help="profile of the tampered devices (default tampered-kernel; "
                        "see `firmware-sim profiles`)")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="re-attestation interval of the server, seconds (default 2)")
    p.add_argument("--duration", type=float, required=True, metavar="S",
                   help="length of the measured window, seconds (after every device is attested once)")
    p.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here (default stdout)")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="workspace folder, empty or absent (default a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the workspace (logs, database, devices)")
    p.add_argument("--jitter", type=float, metavar="S", help="schedule jitter (default interval/10)")
    p.add_argument("--challenge-timeout", type=float, default=10.0, metavar="S",
                   help="challenge deadline, seconds (default 10)")
    p.add_argument("--batch-linger", type=float, metavar="S",
                   help="server.batch_linger (default the server's)")
    p.add_argument("--server-workers", type=int, default=1, metavar="N",
                   help="worker processes of the fleet server (default 1)")
    p.add_argument("--database-url", metavar="URL",
                   help="the server's database, empty, e.g. postgresql+psycopg://user@host/db "
                        "(default a SQLite file in the workspace)")
    p.add_argument("--agent-processes", type=int, metavar="N",
                   help="processes hosting the agents (default one per 16 devices, at most two per CPU)")
    p.add_argument("--settle-timeout", type=float, metavar="S",
                   help="how long devices may take to be attested once (default 60 + 0.5 per device)")
    p.add_argument("--server-log-level", default="info", choices=("debug", "info", "warning", "error"))
    s = p.add_argument_group("soft-TPM fleet (docs/harness.md, \"The soft-TPM fleet\")")
    s.add_argument("--soft-tpm", action="store_true",
                   help="devices on the in-memory soft TPM instead of swtpm (up to 100000 devices; "
                        "agent processes default to one per CPU)")
    s.add_argument("--start-rate", type=float, metavar="N",
                   help="with --soft-tpm: agents started per second, over all processes (default 200)")
    m = p.add_argument_group("protected model (docs/harness.md, \"Model protection\")")
    m.add_argument("--model", type=Path, metavar="FILE.onnx",
                   help="publish this ONNX model, entitle the devices to it, serve it on every agent "
                        "(`firmware-sim model build` makes a small one)")
    m.add_argument("--queries", type=int, default=0, metavar="N",
                   help="prediction requests per device during the window, spread evenly (default 0)")
    m.add_argument("--model-name", metavar="NAME",
                   help="name to publish the model under (default: the file name)")
    m.add_argument("--model-policy", type=Path, metavar="FILE.toml",
                   help="usage policy of the model (rate, quotas, output mode; "
                        "see `fleet-server model publish --policy`)")
    m.add_argument("--query-interval", type=float, metavar="S",
                   help="seconds between a device's requests (default: the window divided by N)")
    u = p.add_argument_group("firmware update (docs/harness.md, \"Updates during a run\")")
    u.add_argument("--release", type=Path, metavar="BUNDLE_DIR",
                   help="publish this release bundle (`firmware-sim release build`) and assign it to every "
                        "golden device partway through the window")
    u.add_argument("--update-at", type=float, metavar="S",
                   help="seconds into the window at which the release is assigned (default a third of it)")
    u.add_argument("--update-deadline", type=float, default=300.0, metavar="S",
                   help="the assignments' deadline; also bounds the wait after the window (default 300)")
    u.add_argument("--bad", "--bad-update", dest="bad_update", type=int, default=0, metavar="K",
                   help="the first K golden devices boot a patched kernel after installing (they roll back; "
                        "with --rollout they are in the canary)")
    u.add_argument("--rollout", type=Path, metavar="PLAN.toml",
                   help="roll the release out in phases with this plan (docs/rollouts.md: canary, phases, "
                        "abort_failure_percent, min_executed, device_timeout_s, ...) instead of to every "
                        "golden device at once")
    p.set_defaults(handler=_cmd_fleet)


def _progress(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _summary(report: dict[str, Any]) -> str:
    states: dict[str, int] = {}
    for device in report["devices"]:
        states[device["state"]] = states.get(device["state"], 0) + 1
    state_text = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    model = report.get("model")
    model_text = ("" if model is None else
                  f"; model {model['name']}: unlocked on {model['unlocked_devices']} devices, "
                  f"{model['served_total']} requests served, {model['refused_total']} refused")
    update = report.get("update")
    rollout = report.get("rollout")
    if rollout is not None:
        model_text += (f"; rollout {rollout['id']} {rollout['state']}: succeeded per phase "
                       + " ".join(f"{p['succeeded']}/{p['devices']}" for p in rollout["phases"]))
    if update is not None:
        model_text += (f"; update to {update['version']}: "
                       + (", ".join(f"{n} {s}" for s, n in update["states"].items()) or "not assigned"))
    return (f"{report['attestations_total']} attestations in {report['duration_s']:.1f} s: "
            f"{report['attestations_per_s']:.1f}/s, latency p50 {report['latency_ms']['p50']:.1f} ms "
            f"p99 {report['latency_ms']['p99']:.1f} ms, server CPU "
            f"{report['server_cpu_ms_per_attestation']:.3f} ms/attestation; "
            f"devices: {state_text}{model_text}")


def _cmd_fleet(args: argparse.Namespace) -> int:
    from firmware_sim.fleet import FleetConfig, FleetHarness, HarnessError, Interrupted
    from firmware_sim.fleet_report import write_report

    config = FleetConfig(devices=args.devices, tampered=args.tampered, tampered_profile=args.tampered_profile,
                         interval=args.interval, duration=args.duration, workdir=args.workdir, keep=args.keep,
                         jitter=args.jitter, challenge_timeout=args.challenge_timeout,
                         batch_linger=args.batch_linger, server_workers=args.server_workers,
                         database_url=args.database_url,
                         agent_processes=args.agent_processes, settle_timeout=args.settle_timeout,
                         server_log_level=args.server_log_level, model=args.model, queries=args.queries,
                         model_name=args.model_name, model_policy=args.model_policy,
                         query_interval=args.query_interval, release=args.release,
                         update_at=args.update_at, update_deadline=args.update_deadline,
                         bad_update=args.bad_update, rollout=args.rollout, soft_tpm=args.soft_tpm,
                         start_rate=args.start_rate)
    if args.soft_tpm:
        from firmware_sim.soft_fleet import SoftFleetHarness

        harness: FleetHarness = SoftFleetHarness(config, progress=_progress)
    else:
        harness = FleetHarness(config, progress=_progress)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only a flag: the harness checks it between steps and in every wait.
        if not harness.stop_requested:
            _progress(f"{signal.Signals(signum).name}: stopping")
        harness.request_stop()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            harness.start()
            measurement = harness.run()
            harness.stop()
            report = harness.report(measurement)
        except Interrupted:
            _progress("interrupted; everything stopped")
            return 130
        except EdgeError:
            raise
        except Exception as exc:  # one line, never a traceback
            raise HarnessError(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            harness.close()
        text = json.dumps(report, indent=2)
        if args.report is not None:
            write_report(args.report, report)
            _progress(f"{_summary(report)}; report in {args.report}")
        else:
            print(text)
            _progress(_summary(report))
        if "soft_tpm" in report:
            from firmware_sim.soft_fleet import held_summary

            _progress(held_summary(report))
        if harness.model_load_errors:  # the report is written; the run failed, and says why
            raise HarnessError(harness.model_load_message())
        return 130 if measurement.interrupted else 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


__all__ = ["register"]
