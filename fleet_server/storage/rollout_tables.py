"""Tables of staged rollouts and device tags. (Imported by :mod:`fleet_server.storage.models`;
migrations 0009, 0010.)

A ``rollout`` of ``kind`` ``firmware`` sends one release (``release_id``), one of ``kind`` ``model``
one published model version (``model_version_id``; the version is offered only to the members the
rollout assigned until it completes, then it is deployed) to a target group in phases (``plan``: the
:class:`~fleet_server.rollouts.plan.Plan` as JSON; ``target_group``: the
:class:`~fleet_server.rollouts.plan.Group` as JSON). ``state``: ``draft`` -> ``running`` <->
``paused`` -> ``completed`` | ``aborted`` | ``cancelled``. ``phase`` is the index of the phase now
executing (0 is the canary). ``abort_trigger_at`` is when the failure that crossed the abort
threshold happened, ``finished_at`` when the rollout stopped (abort latency = the difference).

A ``rolloutmember`` is one device of the group: its ``phase`` (decided once, from the deterministic
``order_key`` = sha256(rollout id, device id)), its ``state`` (``pending`` -> ``assigned`` ->
``succeeded`` | ``failed`` | ``rolled_back`` | ``timed_out`` | ``untrusted_after_update``), the
assignment it was sent (``assignment_id``), how many times (``attempts``).

A ``rolloutapproval`` lets one phase of a rollout start (plans with ``approval``).

``device_tag`` holds free-form tags of devices (target groups select by tag).
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel


class RolloutState(StrEnum):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    CANCELLED = "cancelled"


FINAL_ROLLOUT_STATES = (RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.CANCELLED)


class MemberState(StrEnum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    TIMED_OUT = "timed_out"
    UNTRUSTED_AFTER_UPDATE = "untrusted_after_update"


FAILURE_KINDS = (MemberState.FAILED, MemberState.ROLLED_BACK, MemberState.TIMED_OUT,
                 MemberState.UNTRUSTED_AFTER_UPDATE)
FINAL_MEMBER_STATES = (MemberState.SUCCEEDED, *FAILURE_KINDS)


class Rollout(SQLModel, table=True):
    """One staged rollout (see the module docstring)."""

    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(default="firmware", max_length=16)
    release_id: int | None = Field(default=None, foreign_key="release.id", index=True)
    model_version_id: int | None = Field(default=None, foreign_key="modelversion.id", index=True)
    target_group: str                                                   # Group JSON
    plan: str                                                           # Plan JSON
    state: str = Field(index=True, max_length=16)
    phase: int = 0
    reason: str = Field(default="", max_length=512)
    created_at: int = Field(sa_type=BigInteger)
    created_by: str = Field(default="", max_length=64)
    started_at: int | None = Field(default=None, sa_type=BigInteger)
    updated_at: int = Field(sa_type=BigInteger)
    abort_trigger_at: int | None = Field(default=None, sa_type=BigInteger)
    finished_at: int | None = Field(default=None, sa_type=BigInteger)


class RolloutMember(SQLModel, table=True):
    """One device of a rollout (see the module docstring)."""

    rollout_id: str = Field(primary_key=True, foreign_key="rollout.id", max_length=32)
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=63)
    phase: int
    order_key: str = Field(max_length=64)
    state: str = Field(default=MemberState.PENDING, max_length=24)
    attempts: int = 0
    assignment_id: str | None = Field(default=None, max_length=32)
    reason: str = Field(default="", max_length=512)
    joined_at: int = Field(sa_type=BigInteger)
    assigned_at: int | None = Field(default=None, sa_type=BigInteger)
    finished_at: int | None = Field(default=None, sa_type=BigInteger)


class RolloutApproval(SQLModel, table=True):
    """An approval of one phase of a rollout."""

    rollout_id: str = Field(primary_key=True, foreign_key="rollout.id", max_length=32)
    phase: int = Field(primary_key=True)
    approved_by: str = Field(max_length=64)
    approved_at: int = Field(sa_type=BigInteger)


class DeviceTag(SQLModel, table=True):
    """A tag of a device."""

    __tablename__ = "device_tag"

    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=63)
    tag: str = Field(primary_key=True, index=True, max_length=64)
