"""Administrator operations on published models: entitlements and usage policies (used by the CLI).

Each operation is one write transaction. Withdrawing an entitlement revokes the leases (active or
superseded) of the devices that are no longer entitled and queues, in the same transaction, a signed
``key-denied`` for each of them in the outbox (a running worker publishes it): the device's
agent zeroizes the data key of that model on it. Changing a version's policy supersedes its
active leases and queues, for every trusted device that held one, a signed ``model-offer`` of that
version: the agent asks for the key again and receives the new policy in a new key release (a lost
offer is repeated with the device's next trusted attestation).

Publishing is not deploying: a published version reaches devices only after :func:`deploy` (by a
principal holding ``model:deploy``); until then they keep the newest deployed version, or nothing.
A policy change that loosens limits (:func:`fleet_server.modelstore.policy.loosened`) likewise needs
``model:deploy`` (``may_loosen``); tightening stays with ``model:write``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleet_server.keys import ResultSigner
from fleet_server.modelstore.policy import apply_settings, loosened, policy_from_text, policy_json
from fleet_server.modelstore.store import check_name, check_version
from fleet_server.service.models import DOWN_KEY_DENIED, DOWN_MODEL_OFFER
from fleet_server.storage.model_repo import LeaseRecord, ModelRecord, ModelTx, VersionRecord
from fleet_server.storage.model_tables import EntitlementKind, LeaseState
from fleet_server.storage.repo import Repository
from protocol import topics
from protocol.errors import EdgeError
from protocol.messages import NAME_RE, KeyDenied, ModelOffer, ModelPolicy, ModelRef
from protocol.topics import validate_device_id

__all__ = ["Deployment", "LooseningRefused", "ModelAdminError", "PolicyChange", "Withdrawal", "deploy",
           "entitle", "revoke_entitlement", "set_policy", "subject"]


_HELD = (LeaseState.ACTIVE, LeaseState.SUPERSEDED)  # leases whose key the device may still hold


class ModelAdminError(EdgeError):
    """An administrator's request on models cannot be carried out (unknown model or version...)."""


class LooseningRefused(ModelAdminError):
    """A policy change would loosen limits and the principal does not hold ``model:deploy``."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """The outcome of :func:`deploy`."""

    name: str
    version: str
    deployed: bool
    """False if the version was already deployed (nothing changed)."""
    previous: str | None
    """The newest version deployed before (what devices were offered until now), or None."""


def _locked_version(models: ModelTx, name: str,
                    version: str | None) -> tuple[ModelRecord, list[VersionRecord], VersionRecord]:
    """The model ``name``, its versions (newest first, locked for this transaction) and ``version``
    among them (``None``: the newest); :class:`ModelAdminError` if there is no such model or version."""
    model = models.model(check_name(name))
    if model is None:
        raise ModelAdminError(f"no model {name!r}")
    versions = models.versions(model.id, lock=True)
    if version is None:
        if not versions:
            raise ModelAdminError(f"model {name} has no published version")
        return model, versions, versions[0]
    check_version(version)
    chosen = next((x for x in versions if x.version == version), None)
    if chosen is None:
        raise ModelAdminError(f"model {name} has no version {version}")
    return model, versions, chosen


def deploy(repo: Repository, name: str, version: str, *, now: int, actor: str = "admin") -> Deployment:
    """Deploy ``version`` of ``name``: entitled devices are offered it with their next trusted
    attestation. Refused for a version older than the newest deployed one (roll back by publishing
    and deploying a newer version), and while a rollout of a version of the model is unfinished
    (it deploys its version when it completes)."""
    with repo.write("deploying a model version") as tx:
        models = tx.models
        model, versions, chosen = _locked_version(models, name, version)
        rollout = tx.rollouts.active_model_rollout(model.id)
        if rollout is not None:
            raise ModelAdminError(f"model {name} is in rollout {rollout}: it deploys its version when it "
                                  "completes (cancel it to deploy by hand)")
        current = next((x for x in versions if x.deployed), None)  # newest first
        if chosen.deployed:
            return Deployment(name, version, False, None if current is None else current.version)
        if current is not None and current.order > chosen.order:
            raise ModelAdminError(f"{name} {version} is older than the deployed version {current.version}")
        models.deploy_version(chosen.id, now=now, actor=actor)
    return Deployment(name, version, True, None if current is None else current.version)


def subject(*, device_class: str | None, device_id: str | None) -> tuple[str, str]:
    """(kind, subject) of an entitlement naming exactly one of a device class or a device id."""
    if (device_class is None) == (device_id is None):
        raise ModelAdminError("name either a device class or a device id")
    if device_id is not None:
        return EntitlementKind.DEVICE, validate_device_id(device_id)
    assert device_class is not None
    if not NAME_RE.fullmatch(device_class):
        raise ModelAdminError(f"invalid device class {device_class[:80]!r}")
    return EntitlementKind.CLASS, device_class


def entitle(repo: Repository, name: str, *, device_class: str | None = None, device_id: str | None = None,
            now: int, actor: str = "admin") -> bool:
    """Entitle a device or a device class to model ``name``; False if it already was."""
    kind, who = subject(device_class=device_class, device_id=device_id)
    with repo.write("entitling a device") as tx:
        model = tx.models.model(check_name(name))
        if model is None:
            raise ModelAdminError(f"no model {name!r}; publish it first")
        return tx.models.add_entitlement(model.id, kind, who, now=now, actor=actor)


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """The outcome of :func:`revoke_entitlement`."""

    removed: bool
    revoked: tuple[LeaseRecord, ...]
    """Active or superseded leases revoked because their device is no longer entitled (one signed
    ``key-denied`` queued per device and version)."""


def revoke_entitlement(repo: Repository, name: str, *, signer: ResultSigner, now: int,
                       device_class: str | None = None, device_id: str | None = None,
                       actor: str = "admin") -> Withdrawal:
    """Withdraw an entitlement; revoke the leases it no longer covers and tell those devices."""
    kind, who = subject(device_class=device_class, device_id=device_id)
    with repo.write("withdrawing an entitlement") as tx:
        models = tx.models
        model = models.model(check_name(name))
        if model is None:
            raise ModelAdminError(f"no model {name!r}")
        removed = models.remove_entitlement(model.id, kind, who)
        # Superseded leases count too: after a policy change the device still holds the key until
        # it asks again, and its attestations keep renewing what it holds.
        live = models.leases(model_id=model.id, states=_HELD)
        devices = models.device_trust([lease.device_id for lease in live])
        lost = sorted({lease.device_id for lease in live
                       if lease.device_id not in devices
                       or not models.entitled(model.id, lease.device_id, devices[lease.device_id][1])})
        revoked = models.end_leases(state=LeaseState.REVOKED, reason=f"entitlement withdrawn by {actor}",
                                    now=now, device_ids=lost, model_id=model.id, from_states=_HELD)
        for device_id, version in sorted({(x.device_id, x.version) for x in revoked}):
            notice = KeyDenied(name=name, version=version,
                               reasons=(f"device {device_id} is no longer entitled to model {name}",))
            tx.add_outbox(topics.device_down(device_id, DOWN_KEY_DENIED),
                          signer.sign(notice, aud=device_id, ts=now), now)
    return Withdrawal(removed, tuple(revoked))


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """The outcome of :func:`set_policy`."""

    name: str
    version: str
    before: ModelPolicy
    after: ModelPolicy
    superseded: int


def set_policy(repo: Repository, name: str, settings: Sequence[str], *, now: int, version: str | None = None,
               actor: str = "admin", signer: ResultSigner | None = None,
               may_loosen: bool = True) -> PolicyChange:
    """Apply ``key=value`` settings to the policy of ``version`` (default: the newest) of ``name``.

    With ``signer``, the trusted devices whose lease was superseded are sent a new offer at once.
    Without ``may_loosen`` (the principal lacks ``model:deploy``) a change that loosens the policy
    is refused with :class:`LooseningRefused`."""
    with repo.write("changing a model policy") as tx:
        models = tx.models
        model, _, chosen = _locked_version(models, name, version)
        before = policy_from_text(chosen.policy)
        after = apply_settings(before, list(settings))
        looser = loosened(before, after)
        if looser and not may_loosen:
            raise LooseningRefused(f"loosening the policy of {name} {chosen.version} ({', '.join(looser)}) "
                                   "needs the model:deploy right")
        superseded = 0
        if after != before:
            models.set_policy(chosen.id, policy_json(after))
            ended = models.end_leases(state=LeaseState.SUPERSEDED, reason=f"policy changed by {actor}",
                                      now=now, model_id=model.id, version=chosen.version)
            superseded = len(ended)
            devices = models.device_trust([lease.device_id for lease in ended])
            ref = ModelRef(name=name, version=chosen.version, size=chosen.package_size,
                           package_sha256=chosen.package_sha256)
            for device_id in sorted({lease.device_id for lease in ended}):
                state, _, trusted_until = devices.get(device_id, ("", "", None))
                if signer is None or state != "trusted" or (trusted_until or 0) <= now:
                    continue  # offered again with its next trusted attestation
                tx.add_outbox(topics.device_down(device_id, DOWN_MODEL_OFFER),
                              signer.sign(ModelOffer(models=(ref,)), aud=device_id, ts=now), now)
    return PolicyChange(name, chosen.version, before, after, superseded)
