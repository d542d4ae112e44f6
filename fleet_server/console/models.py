"""Models: published models and their versions, entitlements, leases and usage, and the actions the
model rights allow - on the Models pages (this blueprint) and in the JSON API
(:mod:`fleet_server.console.api`), which share the operations below.

=================  =================  ==========================================================
action             right              what happens
=================  =================  ==========================================================
publish            ``model:write``    an uploaded ONNX file becomes a signed, encrypted package
                                      (:func:`fleet_server.modelstore.store.publish_model`); the
                                      plaintext upload is never kept (see :func:`publish_upload`)
edit policy        ``model:write``    a version's usage policy changes; its active leases are
                                      superseded and trusted holders are offered it again
                                      (:func:`fleet_server.modelstore.admin.set_policy`)
deploy             ``model:deploy``   a published version reaches the entitled devices (until then
                                      they keep the previously deployed one, or nothing); a policy
                                      change that loosens limits needs this right too
entitle/withdraw   ``model:deploy``   a device or device class may (no longer) receive the model;
                                      withdrawing revokes the leases it no longer covers and
                                      queues a signed ``key.denied`` for each device
retire             ``model:delete``   see :func:`retire_version` / :func:`retire_model`
=================  =================  ==========================================================

**Retiring** (the delete of the API) removes a version for good: its row - and with it the sealed
data key, so the package can never be decrypted again - and its package file. It is refused while
any device holds an *active* lease of it (withdraw the entitlement, or publish a newer version and
let the devices move on, first); devices that still hold a *superseded* lease of it are revoked and
sent a signed ``key.denied``. Retiring a model retires every version and removes its entitlements;
the model row stays while leases or usage history refer to it. Version numbers are never reused:
publishing refuses a version that is not newer than every retired one (the audit log records them).

Every action is written to the audit log by the caller (the view), after the change committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, redirect, render_template, request, url_for
from sqlalchemy import Table, delete, exists, select
from werkzeug.datastructures import FileStorage
from werkzeug.wrappers import Response as BaseResponse

from fleet_server.config import ServerConfig
from fleet_server.console.audit import AuditLog
from fleet_server.console.auth import current_principal
from fleet_server.console.rbac import Principal, Right, require
from fleet_server.console.services import ConsoleServices, services
from fleet_server.keys import ResultSigner, load_model_signing_key
from fleet_server.modelstore import admin as model_admin
from fleet_server.modelstore.kek import KEK_ENV, load_kek
from fleet_server.modelstore.policy import FIELDS, policy_from_mapping, policy_from_text
from fleet_server.modelstore.store import PackageStore, Published, PublishError, publish_model
from fleet_server.service.models import DOWN_KEY_DENIED
from fleet_server.storage import models as tables
from fleet_server.storage.model_repo import LeaseRecord, LoadRecord, VersionRecord
from fleet_server.storage.model_tables import EntitlementKind, LeaseState
from fleet_server.storage.repo import Repository, Tx
from fleet_server.updates.repository import UpdatesError, initialised_update_repository
from protocol import topics
from protocol.encoding import JsonValue
from protocol.errors import ConfigError, EdgeError, MalformedInputError
from protocol.messages import MODEL_NAME_RE, VERSION_RE, KeyDenied, ModelPolicy
from protocol.modelpkg import compare_versions

log = logging.getLogger("fleet_server.console")

bp = Blueprint("models", __name__)

_TABLES = tables.SQLModel.metadata.tables
_VERSION: Table = _TABLES["modelversion"]
_ENTITLEMENT: Table = _TABLES["entitlement"]
_MODEL: Table = _TABLES["model"]
_LEASE: Table = _TABLES["lease"]
_USAGE: Table = _TABLES["modelusage"]
_CLIENT_USAGE: Table = _TABLES["modelclientusage"]

UPLOAD_FORM_OVERHEAD = 64 * 1024
"""Bytes a model upload's request may carry beyond the file itself (the other form fields)."""
RETIRE_ACTIONS = ("model.retire_version", "model.retire")
"""Audit actions whose ``versions`` detail lists retired versions (never to be published again)."""
MAX_SETTINGS_TEXT = 48 * 1024
DONE = {
    "published": "Version published. It is not deployed yet: devices keep the previously deployed version "
                 "until someone with the model:deploy right deploys it.",
    "deployed": "Version deployed: entitled devices are offered it with their next trusted attestation.",
    "policy": "Policy changed: active leases of the version were superseded; trusted holders are offered "
              "it again and receive the new policy with their next key release.",
    "entitled": "Entitlement added: the devices are offered the model with their next trusted attestation.",
    "withdrawn": "Entitlement withdrawn: leases it no longer covers are revoked and a signed key-denied is "
                 "queued for each of those devices.",
    "retired": "Retired: the version's row, sealed data key and package file are gone.",
}


class ModelActionError(EdgeError):
    """A model action cannot be carried out; ``status`` is the HTTP status that says why (400 bad
    input, 404 no such model or version, 409 conflicts with the current state, 503 this server is
    not set up for it)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------
# operations (shared with the API)
# --------------------------------------------------------------------------------------------------
def check_model_name(name: str) -> str:
    """A model name that can exist (else 404: nothing by that name can be there)."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise ModelActionError(f"no model {name[:80]!r}", 404)
    return name


def check_model_version(name: str, version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ModelActionError(f"model {name} has no version {version[:40]!r}", 404)
    return version


def retired_versions(audit: AuditLog, name: str) -> list[str]:
    """Versions of ``name`` retired so far, from the audit log (newest first)."""
    found: set[str] = set()
    for action in RETIRE_ACTIONS:
        for entry in audit.entries(action=action, target=f"model:{name}", limit=10_000):
            versions = entry.details_dict().get("versions", [])
            found.update(v for v in versions if isinstance(v, str) and VERSION_RE.fullmatch(v))
    return sorted(found, key=lambda v: tuple(int(p) for p in v.split(".")), reverse=True)


def load_failures_by_version(repo: Repository, name: str) -> dict[str, list[LoadRecord]]:
    """Per version of ``name``: the devices whose onnxruntime could not load it, with its reason."""
    out: dict[str, list[LoadRecord]] = {}
    for record in repo.models.loads(name=name, state="failed"):
        out.setdefault(record.version, []).append(record)
    return out


def setting_text(key: str, value: JsonValue) -> str:
    """``key=value`` for a policy value (the form :func:`apply_settings` reads back)."""
    if value is None:
        return f"{key}=none"
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, list | tuple):
        return f"{key}={json.dumps(list(value), ensure_ascii=False)}"
    return f"{key}={value}"


def policy_settings(policy: ModelPolicy) -> list[str]:
    """Every key of ``policy`` as ``key=value`` lines."""
    return [setting_text(k, v) for k, v in policy.to_json().items()]


def settings_from_json(values: Mapping[str, Any], base: ModelPolicy) -> list[str]:
    """``key=value`` settings equivalent to a JSON object of policy keys, checked strictly first
    (JSON types, ranges: :class:`ConfigError` naming the key)."""
    policy_from_mapping(values, base)
    return [setting_text(k, values[k]) for k in values]


def parse_policy_json(text: str) -> ModelPolicy | None:
    """A policy from an upload's optional ``policy`` field: a JSON object of policy keys (missing
    keys take the defaults); empty: None (the version inherits the newest version's policy)."""
    if not text.strip():
        return None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        raise ModelActionError("policy: not valid JSON") from None
    if not isinstance(value, dict):
        raise ModelActionError("policy: expected a JSON object of policy keys")
    if not valid_unicode(value):
        raise ModelActionError("policy: strings must be valid Unicode (no lone surrogates)")
    try:
        return policy_from_mapping(value)
    except ConfigError as exc:
        raise ModelActionError(exc.diagnostics()) from None


def valid_unicode(value: Any) -> bool:
    """True if every string in a parsed JSON value encodes as UTF-8 (JSON escapes can smuggle lone
    surrogates in, which no database text column and no canonical encoding accepts)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def publish_upload(config: ServerConfig, repo: Repository, audit: AuditLog, *, name: str, version: str,
                   model: bytes, policy: ModelPolicy | None, now: int, actor: str) -> Published:
    """Publish uploaded ONNX bytes as ``name`` ``version`` (see the module docstring).

    The caller reads the upload (spooled by Werkzeug into an anonymous temporary file: mode 0600 and
    unlinked from the start, so nothing is left behind even after a crash), passes the bytes here,
    and closes the file; only the encrypted package is kept.
    """
    try:
        PackageStore.relative_path(name, version)
    except PublishError as exc:
        raise ModelActionError(exc.diagnostics()) from None
    if not model:
        raise ModelActionError("the model file is empty")
    newest = repo.models.newest(name)
    if newest is not None and compare_versions(version, newest.version) <= 0:
        raise ModelActionError(f"{name} {version} is not newer than the newest published version "
                               f"{newest.version}", 409)
    for retired in retired_versions(audit, name)[:1]:
        if compare_versions(version, retired) <= 0:
            raise ModelActionError(f"{name} {version} is not newer than the retired version {retired} "
                                   "(version numbers are never reused)", 409)
    try:
        kek = load_kek(config.models.kek_file)
        if kek is None:
            raise ConfigError(f"no key-encryption key: set ${KEK_ENV} or create {config.models.kek_file}")
        signing_key = load_model_signing_key(config.models.signing_key)
    except ConfigError as exc:
        log.error("event=model_publish_unavailable error=%s", exc.diagnostics())
        raise ModelActionError("this server cannot publish models: its model-signing key or key-encryption "
                               "key is not available (see the server log)", 503) from None
    try:
        return publish_model(repo, model=model, name=name, version=version, signing_key=signing_key, kek=kek,
                             store=PackageStore(config.models.store_dir), now=now, actor=actor, policy=policy,
                             targets=initialised_update_repository(config, clock=lambda: now / 1000))
    except MalformedInputError as exc:  # not a valid ONNX model, or an unsupported io signature
        raise ModelActionError(f"not a publishable ONNX model: {exc.diagnostics()}") from None
    except ConfigError as exc:  # onnx is not installed on this server
        log.error("event=model_publish_unavailable error=%s", exc.diagnostics())
        raise ModelActionError("this server cannot check ONNX models (see the server log)", 503) from None
    except UpdatesError as exc:  # published, but the update repository refused the target
        log.error("event=model_target_failed error=%s", exc.diagnostics())
        raise ModelActionError("the model was published but not added to the update repository "
                               "(see the server log)", 503) from None
    except PublishError as exc:
        newest = repo.models.newest(name)
        if newest is not None and compare_versions(version, newest.version) <= 0:  # published meanwhile
            raise ModelActionError(exc.diagnostics(), 409) from None
        log.error("event=model_publish_failed error=%s", exc.diagnostics())
        raise ModelActionError("the package could not be stored (see the server log)", 503) from None


@dataclass(frozen=True, slots=True)
class RetiredVersion:
    """One retired version: what the audit log keeps of it."""

    version: str
    package_id: str
    package_sha256: str
    package_removed: bool


@dataclass(frozen=True, slots=True)
class Retirement:
    """The outcome of :func:`retire_version` / :func:`retire_model`."""

    name: str
    versions: tuple[RetiredVersion, ...]
    leases_revoked: tuple[LeaseRecord, ...]
    entitlements_removed: int = 0
    model_removed: bool = False

    def audit_details(self) -> dict[str, Any]:
        return {"versions": [v.version for v in self.versions],
                "packages": {v.version: {"package_id": v.package_id, "package_sha256": v.package_sha256,
                                         "file_removed": v.package_removed} for v in self.versions},
                "leases_revoked": len(self.leases_revoked),
                "devices_denied": sorted({x.device_id for x in self.leases_revoked}),
                "entitlements_removed": self.entitlements_removed, "model_removed": self.model_removed}


def _retire_in(tx: Tx, name: str, model_id: int, versions: Sequence[VersionRecord], *, signer: ResultSigner,
               now: int, actor: str) -> list[LeaseRecord]:
    """Retire ``versions`` inside ``tx``: refuse if one has an active lease, revoke superseded ones
    (queuing a signed ``key.denied`` per device and version), delete the rows."""
    models = tx.models
    for v in versions:
        active = models.leases(model_id=model_id, version=v.version, state=LeaseState.ACTIVE)
        if active:
            holders = sorted({x.device_id for x in active})
            shown = ", ".join(holders[:5]) + (f" and {len(holders) - 5} more" if len(holders) > 5 else "")
            raise ModelActionError(
                f"{name} {v.version} is in use: {len(holders)} device(s) hold an active lease ({shown}). "
                "Withdraw their entitlement (their leases are revoked), or publish a newer version and let "
                "them move to it, then retire it.", 409)
    revoked: list[LeaseRecord] = []
    for v in versions:
        ended = models.end_leases(state=LeaseState.REVOKED, reason=f"version retired by {actor}", now=now,
                                  model_id=model_id, version=v.version, from_states=(LeaseState.SUPERSEDED,))
        for device_id in sorted({x.device_id for x in ended}):
            notice = KeyDenied(name=name, version=v.version,
                               reasons=(f"model {name} {v.version} was retired",))
            tx.add_outbox(topics.device_down(device_id, DOWN_KEY_DENIED),
                          signer.sign(notice, aud=device_id, ts=now), now)
        revoked.extend(ended)
        tx.conn.execute(delete(_VERSION).where(_VERSION.c.id == v.id))
    return revoked


def _remove_packages(store: PackageStore, name: str, versions: Iterable[VersionRecord]
                     ) -> list[RetiredVersion]:
    out = []
    for v in versions:
        path = Path(store.root) / v.package_path
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            removed = False
        except OSError as exc:
            log.error("event=model_package_not_removed path=%s error=%s", path, exc.strerror or exc)
            removed = False
        out.append(RetiredVersion(v.version, v.package_id, v.package_sha256.hex(), removed))
    return out


def retire_version(repo: Repository, store: PackageStore, *, name: str, version: str, signer: ResultSigner,
                   now: int, actor: str) -> Retirement:
    """Retire one version (see the module docstring)."""
    check_model_name(name)
    check_model_version(name, version)
    with repo.write("retiring a model version") as tx:
        model = tx.models.model(name)
        if model is None:
            raise ModelActionError(f"no model {name!r}", 404)
        chosen = next((v for v in tx.models.versions(model.id, lock=True) if v.version == version), None)
        if chosen is None:
            raise ModelActionError(f"model {name} has no version {version}", 404)
        revoked = _retire_in(tx, name, model.id, [chosen], signer=signer, now=now, actor=actor)
    # After the commit: a failed transaction leaves the package in place with its row.
    return Retirement(name, tuple(_remove_packages(store, name, [chosen])), tuple(revoked))


def retire_model(repo: Repository, store: PackageStore, *, name: str, signer: ResultSigner, now: int,
                 actor: str) -> Retirement:
    """Retire every version of a model and remove its entitlements (see the module docstring)."""
    check_model_name(name)
    with repo.write("retiring a model") as tx:
        model = tx.models.model(name)
        if model is None:
            raise ModelActionError(f"no model {name!r}", 404)
        versions = tx.models.versions(model.id, lock=True)
        revoked = _retire_in(tx, name, model.id, versions, signer=signer, now=now, actor=actor)
        removed = tx.conn.execute(delete(_ENTITLEMENT).where(_ENTITLEMENT.c.model_id == model.id)).rowcount
        referenced = any(tx.conn.execute(select(exists().where(t.c.model_id == model.id))).scalar()
                         for t in (_LEASE, _USAGE, _CLIENT_USAGE))
        if not referenced:  # no history refers to it: the name goes too
            tx.conn.execute(delete(_MODEL).where(_MODEL.c.id == model.id))
    retired = _remove_packages(store, name, versions)
    if not referenced:
        with contextlib.suppress(OSError):  # not empty or already gone: nothing to tidy
            (Path(store.root) / name).rmdir()
    return Retirement(name, tuple(retired), tuple(revoked), int(removed or 0), not referenced)


def entitlement_subject(kind: str, subject: str) -> dict[str, str]:
    """Keyword arguments of :func:`fleet_server.modelstore.admin.entitle` for (kind, subject)."""
    if kind == EntitlementKind.DEVICE:
        return {"device_id": subject}
    if kind == EntitlementKind.CLASS:
        return {"device_class": subject}
    raise ModelActionError("kind: 'device' or 'class'")


# --------------------------------------------------------------------------------------------------
# pages
# --------------------------------------------------------------------------------------------------
def _principal() -> Principal:
    principal = current_principal()
    if principal is None:  # pragma: no cover - require() ran first
        abort(401)
    return principal


def _index_page(*, error: str | None = None, status: int = 200, values: Mapping[str, str] | None = None
                ) -> tuple[str, int]:
    svc = services()
    return render_template("models.html", models=svc.repo.models.models(),
                           sections=svc.queries.model_overview(), error=error, values=values or {},
                           max_upload_mib=svc.settings.max_upload_mib), status


@bp.get("/")
@require(Right.MODEL_READ)
def index() -> tuple[str, int]:
    return _index_page()


def _detail_page(name: str, *, error: str | None = None, status: int = 200) -> tuple[str, int]:
    svc = services()
    try:
        check_model_name(name)
    except ModelActionError:
        abort(404)
    model = svc.repo.models.model(name)
    if model is None:
        abort(404)
    versions = svc.repo.models.versions(name)
    policies = {}
    for v in versions:
        try:
            policies[v.version] = "\n".join(policy_settings(policy_from_text(v.policy)))
        except ConfigError:
            policies[v.version] = ""
    return render_template(
        "model_detail.html", model=model, versions=versions, policies=policies,
        entitlements=svc.repo.models.entitlements(name), leases=svc.repo.models.leases(name=name, limit=50),
        usage=svc.repo.models.usage(name=name)[:30], retired=retired_versions(svc.audit, name),
        load_failures=load_failures_by_version(svc.repo, name), fields=FIELDS, error=error,
        done=DONE.get(request.args.get("done", "")),
        kinds=[k.value for k in EntitlementKind]), status


@bp.get("/<name>")
@require(Right.MODEL_READ)
def detail(name: str) -> tuple[str, int]:
    return _detail_page(name)


def _failed(exc: ModelActionError, name: str | None = None) -> tuple[str, int]:
    if exc.status == 404:
        abort(404)
    if name is not None and services().repo.models.model(name) is not None:
        return _detail_page(name, error=exc.diagnostics(), status=exc.status)
    return _index_page(error=exc.diagnostics(), status=exc.status,
                       values={k: request.form.get(k, "")[:64] for k in ("name", "version")})


def _done(name: str, what: str) -> BaseResponse:
    return redirect(url_for("models.detail", name=name, done=what), code=303)


def upload_file(field: str = "file") -> FileStorage | None:
    """The uploaded file of a multipart form, or None."""
    found = request.files.get(field)
    return found if isinstance(found, FileStorage) and found.filename is not None else None


@bp.post("/publish")
@require(Right.MODEL_WRITE)
def publish() -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    name = request.form.get("name", "").strip()[:64]
    version = request.form.get("version", "").strip()[:32]
    upload = upload_file()
    try:
        if upload is None:
            raise ModelActionError("choose an ONNX file to upload")
        try:
            data = upload.stream.read(svc.settings.max_upload_bytes + 1)
        finally:
            upload.close()
        if len(data) > svc.settings.max_upload_bytes:
            raise ModelActionError(f"the model file is larger than {svc.settings.max_upload_mib} MiB", 413)
        policy = parse_policy_json(request.form.get("policy", "")[:MAX_SETTINGS_TEXT])
        published = publish_upload(svc.config, svc.repo, svc.audit, name=name, version=version, model=data,
                                   policy=policy, now=svc.now(), actor=principal.actor)
    except ModelActionError as exc:
        return _failed(exc)
    svc.record(principal, "model.publish", f"model:{published.name}", publish_details(published))
    return _done(published.name, "published")


def publish_details(published: Published) -> dict[str, Any]:
    """What the audit log records of a publication."""
    return {"version": published.version, "package_id": published.package_id,
            "package_sha256": published.package_sha256.hex(), "package_size": published.package_size,
            "plaintext_size": published.plaintext_size, "signing_key_id": published.signing_key_id,
            "kek_id": published.kek_id}


def policy_change_details(change: model_admin.PolicyChange) -> dict[str, Any]:
    """What the audit log records of a policy change (the keys that changed, before and after)."""
    before, after = change.before.to_json(), change.after.to_json()
    return {"version": change.version, "superseded": change.superseded,
            "changed": {k: {"from": before[k], "to": after[k]} for k in after if before[k] != after[k]}}


@bp.post("/<name>/versions/<version>/policy")
@require(Right.MODEL_WRITE)
def set_policy(name: str, version: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    text = request.form.get("settings", "")[:MAX_SETTINGS_TEXT]
    lines = (line.strip() for line in text.splitlines())
    settings = [line for line in lines if line and not line.startswith("#")]
    try:
        check_model_name(name)
        check_model_version(name, version)
        if svc.repo.models.version(name, version) is None:
            raise ModelActionError(f"model {name} has no version {version}", 404)
        try:
            change = model_admin.set_policy(svc.repo, name, settings, version=version, now=svc.now(),
                                            actor=principal.actor, signer=svc.signer(),
                                            may_loosen=principal.can(Right.MODEL_DEPLOY))
        except model_admin.LooseningRefused as exc:
            raise ModelActionError(exc.diagnostics(), 403) from None
        except (ConfigError, model_admin.ModelAdminError) as exc:
            raise ModelActionError(exc.diagnostics()) from None
    except ModelActionError as exc:
        return _failed(exc, name)
    svc.record(principal, "model.policy", f"model:{name}", policy_change_details(change))
    return _done(name, "policy")


def deploy_version(svc: ConsoleServices, principal: Principal, name: str, version: str
                   ) -> model_admin.Deployment:
    """Deploy ``name`` ``version`` and audit it (``model.deploy``) when it changed something."""
    check_model_name(name)
    check_model_version(name, version)
    if svc.repo.models.version(name, version) is None:
        raise ModelActionError(f"model {name} has no version {version}", 404)
    try:
        deployment = model_admin.deploy(svc.repo, name, version, now=svc.now(), actor=principal.actor)
    except model_admin.ModelAdminError as exc:
        status = 404 if svc.repo.models.version(name, version) is None else 409
        raise ModelActionError(exc.diagnostics(), status) from None
    if deployment.deployed:
        svc.record(principal, "model.deploy", f"model:{name}",
                   {"version": version, "previous": deployment.previous})
    return deployment


@bp.post("/<name>/versions/<version>/deploy")
@require(Right.MODEL_DEPLOY)
def deploy(name: str, version: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    try:
        deploy_version(svc, principal, name, version)
    except ModelActionError as exc:
        return _failed(exc, name)
    return _done(name, "deployed")


def _existing_model(name: str) -> None:
    check_model_name(name)
    if services().repo.models.model(name) is None:
        raise ModelActionError(f"no model {name!r}", 404)


def _subject_form() -> tuple[str, str]:
    return request.form.get("kind", "")[:8], request.form.get("subject", "").strip()[:64]


@bp.post("/<name>/entitle")
@require(Right.MODEL_DEPLOY)
def entitle(name: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    kind, subject = _subject_form()
    try:
        _existing_model(name)
        try:
            created = model_admin.entitle(svc.repo, name, **entitlement_subject(kind, subject), now=svc.now(),
                                          actor=principal.actor)
        except model_admin.ModelAdminError as exc:
            status = 404 if svc.repo.models.model(name) is None else 400
            raise ModelActionError(exc.diagnostics(), status) from None
        except MalformedInputError as exc:
            raise ModelActionError(exc.diagnostics()) from None
    except ModelActionError as exc:
        return _failed(exc, name)
    svc.record(principal, "model.entitle", f"model:{name}", {"kind": kind, "subject": subject,
                                                              "created": created})
    return _done(name, "entitled")


@bp.post("/<name>/withdraw")
@require(Right.MODEL_DEPLOY)
def withdraw(name: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    kind, subject = _subject_form()
    try:
        _existing_model(name)
        try:
            result = model_admin.revoke_entitlement(svc.repo, name, signer=svc.signer(), now=svc.now(),
                                                    actor=principal.actor,
                                                    **entitlement_subject(kind, subject))
        except model_admin.ModelAdminError as exc:
            status = 404 if svc.repo.models.model(name) is None else 400
            raise ModelActionError(exc.diagnostics(), status) from None
        except MalformedInputError as exc:
            raise ModelActionError(exc.diagnostics()) from None
        if not result.removed:
            raise ModelActionError(f"{kind} {subject} has no entitlement to model {name}", 404)
    except ModelActionError as exc:
        return _failed(exc, name)
    svc.record(principal, "model.withdraw", f"model:{name}", withdrawal_details(kind, subject, result))
    return _done(name, "withdrawn")


def withdrawal_details(kind: str, subject: str, result: model_admin.Withdrawal) -> dict[str, Any]:
    return {"kind": kind, "subject": subject, "leases_revoked": len(result.revoked),
            "devices_denied": sorted({x.device_id for x in result.revoked})}


def _retire(svc: ConsoleServices, principal: Principal, name: str, version: str | None) -> Retirement:
    store = PackageStore(svc.config.models.store_dir)
    if version is None:
        return retire_model(svc.repo, store, name=name, signer=svc.signer(), now=svc.now(),
                            actor=principal.actor)
    return retire_version(svc.repo, store, name=name, version=version, signer=svc.signer(), now=svc.now(),
                          actor=principal.actor)


@bp.post("/<name>/versions/<version>/retire")
@require(Right.MODEL_DELETE)
def retire_one(name: str, version: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    try:
        retirement = _retire(svc, principal, name, version)
    except ModelActionError as exc:
        return _failed(exc, name)
    svc.record(principal, "model.retire_version", f"model:{name}", retirement.audit_details())
    return _done(name, "retired")


@bp.post("/<name>/retire")
@require(Right.MODEL_DELETE)
def retire_all(name: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    try:
        retirement = _retire(svc, principal, name, None)
    except ModelActionError as exc:
        return _failed(exc, name)
    svc.record(principal, "model.retire", f"model:{name}", retirement.audit_details())
    if retirement.model_removed:
        return redirect(url_for("models.index"), code=303)
    return _done(name, "retired")


@bp.url_value_preprocessor
def _upload_limit(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # Runs before the application's request checks (which parse the form for the CSRF token): the
    # upload's request may be larger than MAX_CONTENT_LENGTH, up to the configured limit.
    if endpoint == "models.publish":
        request.max_content_length = services().settings.max_upload_bytes + UPLOAD_FORM_OVERHEAD
