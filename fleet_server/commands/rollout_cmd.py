"""``fleet-server rollout ...``: staged rollouts of firmware releases and model versions
(docs/rollouts.md).

* ``rollout create TARGET | --model NAME --version V [plan options] [group options]
  [--plan PLAN.toml] [--id ID] [--draft] [--dry-run] [--json]`` - the plan options have the plan
  file's key names (``--canary N|N%``, ``--canary-device ID``, ``--phases 10,50,100``,
  ``--phase-counts 5,20``, ``--abort-failure-percent X``, ``--min-executed N``, ``--abort-on
  KINDS``, ``--device-timeout-s S``, ``--retries N``, ``--max-rate N``, ``--approval``, ``--window
  22-04``, ``--rollback-on-abort``, ...); given options override the file's keys. Group:
  ``--class`` (default: the release's; required for a model), ``--firmware V``, ``--tag T``,
  ``--device ID`` (repeatable). ``--dry-run`` prints the devices each phase would take and stores
  nothing (``--id`` makes the split the one ``create --id`` will use).
* ``rollout list [--state S] [--json]``, ``rollout show ID [--json]`` (progress per phase, members).
* ``rollout pause|resume|cancel|abort ID``, ``rollout approve ID [--phase N]``.

The workers step running rollouts (``fleet-server run``). Every state-changing command is audited.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from fleet_server.console.audit import cli_actor, record_cli
from fleet_server.keys import load_signing_key
from fleet_server.rollouts.plan import Group, RolloutError, parse_plan
from fleet_server.service import rollouts
from fleet_server.service.cliutil import (
    add_config_argument,
    emit,
    emit_json,
    iso,
    load,
    now_ms,
    repository,
    table,
)
from fleet_server.storage.repo import Repository

MAX_PLAN_BYTES = 64 * 1024
_PLAN_OPTIONS = (  # (option, plan key, type, help)
    ("--canary", "canary", str, "canary devices: a count N or a percentage N%% of the group"),
    ("--phases", "phases", str, "cumulative percentages of the group, e.g. 10,50,100"),
    ("--phase-counts", "phase_counts", str, "cumulative device counts, e.g. 5,20,50"),
    ("--canary-success-percent", "canary_success_percent", float, "success needed in the canary (100)"),
    ("--success-percent", "success_percent", float, "success needed in later phases (95)"),
    ("--abort-failure-percent", "abort_failure_percent", float, "abort above this share of one kind (20)"),
    ("--min-executed", "min_executed", int, "finished devices before the abort rule applies (1)"),
    ("--abort-on", "abort_on", str, "failure kinds the abort rule counts (all)"),
    ("--device-timeout-s", "device_timeout_s", float, "seconds a device has to come back trusted (3600)"),
    ("--retries", "retries", int, "assignments again after a timeout or install failure (0-10, 0)"),
    ("--max-rate", "max_rate", int, "devices assigned per minute at most"),
    ("--window", "window", str, "maintenance window in UTC hours, e.g. 22-04"),
    ("--grace-s", "grace_s", float, "seconds the previous firmware stays acceptable after a commit"),
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("rollout", help="staged rollouts of firmware releases and model versions",
                                   description="Roll a release out in phases, gated on attestation.")
    sub = parser.add_subparsers(dest="rollout_command", metavar="SUBCOMMAND", required=True)

    create = sub.add_parser("create", help="create (and start) a rollout of a release or a model version")
    create.add_argument("target", metavar="TARGET", nargs="?",
                        help="the release's target (firmware/CLASS/VERSION.fwb)")
    create.add_argument("--model", metavar="NAME", help="roll out a published model version instead")
    create.add_argument("--version", dest="model_version", metavar="V",
                        help="the model version (with --model)")
    create.add_argument("--plan", type=Path, metavar="PLAN.toml", help="read the plan's keys from a file")
    for option, key, kind, text in _PLAN_OPTIONS:
        create.add_argument(option, dest=key, type=kind, help=text)
    create.add_argument("--canary-device", dest="canary_devices", action="append", metavar="ID",
                        help="a device named into the canary (repeat)")
    create.add_argument("--approval", action="store_const", const=True, default=None,
                        help="each phase after the canary waits for `rollout approve`")
    create.add_argument("--rollback-on-abort", action="store_const", const=True, default=None,
                        help="on abort, send the updated devices back to their previous release")
    create.add_argument("--class", dest="device_class", help="group: device class (default: the release's)")
    create.add_argument("--firmware", help="group: devices on this firmware version")
    create.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                        help="group: devices with this tag (repeat: all of them)")
    create.add_argument("--device", dest="devices", action="append", default=[], metavar="ID",
                        help="group: this device (repeat)")
    create.add_argument("--id", dest="rollout_id", help="the rollout's id (default: random)")
    create.add_argument("--draft", action="store_true", help="store it as a draft (resume starts it)")
    create.add_argument("--dry-run", action="store_true", help="print each phase's devices only")
    create.add_argument("--json", action="store_true")
    add_config_argument(create)
    create.set_defaults(handler=_create)

    ls = sub.add_parser("list", help="list rollouts")
    ls.add_argument("--state", help="only rollouts in this state")
    ls.add_argument("--json", action="store_true")
    add_config_argument(ls)
    ls.set_defaults(handler=_list)

    show = sub.add_parser("show", help="show a rollout's progress and devices")
    show.add_argument("rollout_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    add_config_argument(show)
    show.set_defaults(handler=_show)

    for name, what in (("pause", "pause a running rollout (no new assignments)"),
                       ("resume", "resume a paused rollout, or start a draft"),
                       ("cancel", "stop a rollout for good (no alert, no rollback)"),
                       ("abort", "abort a rollout (critical alert; rollback if the plan says so)")):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("rollout_id", metavar="ID")
        add_config_argument(cmd)
        cmd.set_defaults(handler=_operation, operation=name)

    approve = sub.add_parser("approve", help="approve the next phase of a rollout")
    approve.add_argument("rollout_id", metavar="ID")
    approve.add_argument("--phase", type=int, help="the phase to approve (default: the first not approved)")
    add_config_argument(approve)
    approve.set_defaults(handler=_approve)


def _plan_keys(args: argparse.Namespace) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    if args.plan is not None:
        try:
            data = args.plan.read_bytes()
        except OSError as exc:
            raise RolloutError(f"cannot read the plan {args.plan}: {exc.strerror or exc}") from None
        if len(data) > MAX_PLAN_BYTES:
            raise RolloutError(f"the plan {args.plan} is larger than {MAX_PLAN_BYTES} bytes")
        try:
            keys.update(tomllib.loads(data.decode("utf-8")))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RolloutError(f"the plan {args.plan} is not valid TOML: {exc}") from None
    # An option replaces the file's key; --phases and --phase-counts also replace each other's key.
    if args.phases is not None:
        keys.pop("phase_counts", None)
    if args.phase_counts is not None:
        keys.pop("phases", None)
    for key in [k for _, k, _, _ in _PLAN_OPTIONS] + ["canary_devices", "approval", "rollback_on_abort"]:
        if getattr(args, key) is not None:
            keys[key] = getattr(args, key)
    return keys


def _create(args: argparse.Namespace) -> int:
    plan = parse_plan(_plan_keys(args))
    config = load(args)
    model = _model(args)
    with repository(config) as repo:
        if model is None:
            release = repo.releases.release(args.target)
            if release is None:
                raise RolloutError(f"no release {args.target[:200]!r}")
            device_class = args.device_class or release.device_class
        elif args.device_class is None:
            raise RolloutError("a model rollout needs the group's --class")
        else:
            device_class = args.device_class
        group = Group(device_class, args.firmware, tuple(args.tags), tuple(args.devices))
        if args.dry_run:
            return _dry_run(repo, args, group, plan, model)
        rec = rollouts.create_rollout(repo, target=None if model else args.target, model=model, group=group,
                                      plan=plan, now=now_ms(), actor=cli_actor(), draft=args.draft,
                                      rollout_id=args.rollout_id)
        view = rollouts.view(repo, rec.id, now=now_ms())
        record_cli(repo.engine, "rollout.create", f"rollout:{rec.id}",
                   {"release": view.subject, "kind": rec.kind, "state": rec.state,
                    "devices": len(view.members), "plan": plan.to_json(), "group": group.to_json()},
                   now=now_ms())
    if args.json:
        return emit_json(rollouts.view_json(view))
    sizes = ", ".join(str(p.devices) for p in view.phases)
    return emit([f"rollout {rec.id} of {view.subject} {rec.state}: {len(view.members)} devices in phases "
                 f"[{sizes}] (phase 0 is the canary); the workers assign them"])


def _model(args: argparse.Namespace) -> tuple[str, str] | None:
    """(name, version) of ``--model NAME --version V``, or None for a release's TARGET."""
    if args.model is None and args.model_version is None:
        if args.target is None:
            raise RolloutError("give a release's TARGET or --model NAME --version V")
        return None
    if args.target is not None:
        raise RolloutError("give a release's TARGET or --model NAME --version V, not both")
    if args.model is None or args.model_version is None:
        raise RolloutError("a model rollout takes both --model NAME and --version V")
    return args.model, args.model_version


def _dry_run(repo: Repository, args: argparse.Namespace, group: Group, plan: Any,
             model: tuple[str, str] | None) -> int:
    planned = rollouts.dry_run(repo, target=None if model else args.target, model=model, group=group,
                               plan=plan, rollout_id=args.rollout_id)
    what = f"model {model[0]} {model[1]}" if model else args.target
    if args.json:
        return emit_json({"rollout_id": planned.rollout_id, "release": what,
                          "phases": [{"phase": i, "devices": ids} for i, ids in enumerate(planned.phases)]})
    lines = [f"dry run of rollout {planned.rollout_id} of {what} "
             f"({sum(len(p) for p in planned.phases)} devices; pass --id {planned.rollout_id} to create "
             "exactly this split):"]
    for i, ids in enumerate(planned.phases):
        name = "canary" if i == 0 else f"phase {i}"
        lines.append(f"  {name}: {len(ids)} device(s): {', '.join(ids) or '-'}")
    return emit(lines)


def _list(args: argparse.Namespace) -> int:
    with repository(load(args)) as repo:
        found = repo.rollouts.rollouts([args.state] if args.state else None)
        views = [rollouts.view(repo, r.id, now=now_ms()) for r in found]
    if args.json:
        return emit_json([{k: v for k, v in rollouts.view_json(x).items() if k != "members"} for x in views])
    if not views:
        return emit(["no rollouts"])
    rows = [[v.rollout.id, v.subject, v.rollout.state, str(v.rollout.phase),
             " ".join(f"{p.succeeded}/{p.devices}" for p in v.phases), iso(v.rollout.created_at)]
            for v in views]
    return emit(table(["ID", "RELEASE", "STATE", "PHASE", "SUCCEEDED/DEVICES", "CREATED"], rows))


def _show(args: argparse.Namespace) -> int:
    with repository(load(args)) as repo:
        v = rollouts.view(repo, args.rollout_id, now=now_ms())
    if args.json:
        return emit_json(rollouts.view_json(v))
    r = v.rollout
    lines = [f"rollout {r.id} of {v.subject}: {r.state}, phase {r.phase}"
             + (f" ({v.waiting})" if v.waiting else "") + (f" - {r.reason}" if r.reason else ""),
             f"  created  {iso(r.created_at)} by {r.created_by}; started {iso(r.started_at)}; "
             f"finished {iso(r.finished_at)}"]
    lines += table(["PHASE", "DEVICES", "SUCCEEDED", "FAILED", "ASSIGNED", "PENDING", "APPROVED"],
                   [["canary" if i == 0 else str(i), str(p.devices), str(p.succeeded), str(p.failed),
                     str(p.assigned), str(p.pending), "yes" if i in v.approvals else "-"]
                    for i, p in enumerate(v.phases)])
    lines += table(["DEVICE", "PHASE", "STATE", "ATTEMPTS", "REASON"],
                   [[m.device_id, str(m.phase), m.state, str(m.attempts), m.reason or "-"]
                    for m in v.members])
    return emit(lines)


def _operation(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        if args.operation == "pause":
            rec = rollouts.pause(repo, args.rollout_id, now=now_ms())
        elif args.operation == "resume":
            rec = rollouts.resume(repo, args.rollout_id, now=now_ms())
        elif args.operation == "cancel":
            rec = rollouts.cancel(repo, args.rollout_id, now=now_ms(), actor=cli_actor(),
                                  signer=load_signing_key(config.signing_key))
        else:
            rec = rollouts.abort(repo, args.rollout_id, signer=load_signing_key(config.signing_key),
                                 now=now_ms(), actor=cli_actor())
        record_cli(repo.engine, f"rollout.{args.operation}", f"rollout:{rec.id}", {"state": rec.state},
                   now=now_ms())
    return emit([f"rollout {rec.id}: {rec.state}"])


def _approve(args: argparse.Namespace) -> int:
    with repository(load(args)) as repo:
        phase = rollouts.approve(repo, args.rollout_id, now=now_ms(), actor=cli_actor(), phase=args.phase)
        record_cli(repo.engine, "rollout.approve", f"rollout:{args.rollout_id}", {"phase": phase},
                   now=now_ms())
    return emit([f"rollout {args.rollout_id}: phase {phase} approved"])
