"""MQTT topic names of the fleet protocol: the only module that builds or parses them.

Layout (``{id}`` is a device id, ``{kind}`` a message kind such as ``evidence``)::

    fleet/v1/devices/{id}/up/{kind}            device -> server   (device certificate, CN = {id})
    fleet/v1/devices/{id}/down/{kind}          server -> device
    fleet/v1/enroll/claim:{id}/up/{kind}       device -> server   (claim certificate, CN = claim:{id})
    fleet/v1/enroll/claim:{id}/down/{kind}     server -> device

The broker derives the MQTT username from the client certificate's CN (Mosquitto
``use_identity_as_username``) and its ACL patterns only let user ``U`` write ``.../U/up/#`` and read
``.../U/down/#`` in both subtrees.  The identity segment of a topic the server receives is therefore
the *authenticated* identity of the publisher, which is why :func:`parse_server_topic` validates it
strictly: a claim certificate may also publish to ``fleet/v1/devices/claim:{id}/up/...`` (the ACL
pattern cannot exclude it), and such a topic is refused here because ``claim:{id}`` is not a device
id.

Server workers subscribe with MQTT v5 shared subscriptions (:func:`server_subscriptions`) so that
several workers split the load.

Pure string functions: no paho import, no I/O.  Malformed names raise :class:`TopicError`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

from protocol.errors import MalformedInputError

PREFIX = "fleet/v1"
"""Root of every topic of this protocol version."""

SHARE_GROUP = "fleet-workers"
"""Default MQTT v5 shared-subscription group of the fleet server workers."""

SERVER_IDENTITY = "fleet-server"
"""CN (and therefore broker username) of the fleet server's client certificate; never a device id."""

CLAIM_PREFIX = "claim:"
"""Prefix of the CN of a device's bootstrap ("claim") certificate: ``claim:<device_id>``."""

_DEVICE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

RESERVED_IDS = frozenset({SERVER_IDENTITY})
"""Names that match the device-id syntax but can never be a device."""


class TopicError(MalformedInputError):
    """A topic name, device id or message kind is not valid for this protocol."""


class Subtree(StrEnum):
    """The two top-level subtrees below :data:`PREFIX`."""

    DEVICES = "devices"
    ENROLL = "enroll"


class Direction(StrEnum):
    """Message direction: ``up`` is device -> server, ``down`` is server -> device."""

    UP = "up"
    DOWN = "down"


class ServerTopic(NamedTuple):
    """A parsed device -> server topic.

    A ``NamedTuple`` (immutable, like the project's frozen dataclasses) so that callers may unpack it
    as ``subtree, identity, kind = parse_server_topic(topic)``.
    """

    subtree: Subtree
    identity: str
    """The topic's identity segment, equal to the publisher's broker username (certificate CN):
    ``<device_id>`` in :attr:`Subtree.DEVICES`, ``claim:<device_id>`` in :attr:`Subtree.ENROLL`."""
    kind: str

    @property
    def device_id(self) -> str:
        """The device the message is about (the claim prefix removed for enrollment topics)."""
        if self.subtree is Subtree.ENROLL:
            return self.identity[len(CLAIM_PREFIX):]
        return self.identity


# -- identities ------------------------------------------------------------------------------------
def is_valid_device_id(device_id: object) -> bool:
    """True if ``device_id`` is a syntactically valid, non-reserved device id."""
    return (isinstance(device_id, str) and _DEVICE_ID_RE.fullmatch(device_id) is not None
            and device_id not in RESERVED_IDS)


def validate_device_id(device_id: object) -> str:
    """Return ``device_id`` if it matches ``^[a-z0-9][a-z0-9-]{0,62}$`` and is not reserved.

    Raises :class:`TopicError` otherwise.
    """
    if not isinstance(device_id, str):
        raise TopicError(f"device id must be a string, not {type(device_id).__name__}")
    if _DEVICE_ID_RE.fullmatch(device_id) is None:
        raise TopicError(f"invalid device id {device_id[:80]!r}: must match [a-z0-9][a-z0-9-]{{0,62}}")
    if device_id in RESERVED_IDS:
        raise TopicError(f"device id {device_id!r} is reserved")
    return device_id


def validate_kind(kind: object) -> str:
    """Return ``kind`` if it is a valid message kind (``^[a-z][a-z0-9_-]{0,31}$``), else raise."""
    if not isinstance(kind, str) or _KIND_RE.fullmatch(kind) is None:
        raise TopicError(f"invalid message kind {str(kind)[:80]!r}: must match [a-z][a-z0-9_-]{{0,31}}")
    return kind


def claim_identity(device_id: str) -> str:
    """The CN of ``device_id``'s claim certificate (its broker username): ``claim:<device_id>``."""
    return CLAIM_PREFIX + validate_device_id(device_id)


def device_id_from_claim(identity: str) -> str:
    """Inverse of :func:`claim_identity`; raises :class:`TopicError` for anything else."""
    if not isinstance(identity, str) or not identity.startswith(CLAIM_PREFIX):
        raise TopicError(f"not a claim identity: {str(identity)[:80]!r}")
    return validate_device_id(identity[len(CLAIM_PREFIX):])


# -- construction ----------------------------------------------------------------------------------
def _topic(subtree: Subtree, identity: str, direction: Direction, kind: str) -> str:
    return f"{PREFIX}/{subtree}/{identity}/{direction}/{validate_kind(kind)}"


def device_up(device_id: str, kind: str) -> str:
    """Topic a device publishes ``kind`` messages on: ``fleet/v1/devices/{id}/up/{kind}``."""
    return _topic(Subtree.DEVICES, validate_device_id(device_id), Direction.UP, kind)


def device_down(device_id: str, kind: str) -> str:
    """Topic the server publishes ``kind`` messages to a device on: ``.../devices/{id}/down/{kind}``."""
    return _topic(Subtree.DEVICES, validate_device_id(device_id), Direction.DOWN, kind)


def enroll_up(device_id: str, kind: str) -> str:
    """Topic a device holding a claim certificate publishes on: ``.../enroll/claim:{id}/up/{kind}``."""
    return _topic(Subtree.ENROLL, claim_identity(device_id), Direction.UP, kind)


def enroll_down(device_id: str, kind: str) -> str:
    """Topic the server answers an enrolling device on: ``.../enroll/claim:{id}/down/{kind}``."""
    return _topic(Subtree.ENROLL, claim_identity(device_id), Direction.DOWN, kind)


def device_down_filter(device_id: str) -> str:
    """Subscription filter of a device for everything the server sends it."""
    return f"{PREFIX}/{Subtree.DEVICES}/{validate_device_id(device_id)}/{Direction.DOWN}/#"


def enroll_down_filter(device_id: str) -> str:
    """Subscription filter of an enrolling device (claim certificate) for the server's answers."""
    return f"{PREFIX}/{Subtree.ENROLL}/{claim_identity(device_id)}/{Direction.DOWN}/#"


def server_subscriptions(group: str = SHARE_GROUP) -> tuple[str, str]:
    """The fleet server's MQTT v5 shared-subscription filters (devices' and enrolling devices' ``up``).

    Every worker subscribing with the same ``group`` receives a share of the messages; each message
    goes to exactly one worker of the group.
    """
    if not isinstance(group, str) or _GROUP_RE.fullmatch(group) is None:
        raise TopicError(f"invalid shared-subscription group {str(group)[:80]!r}")
    return (f"$share/{group}/{PREFIX}/{Subtree.DEVICES}/+/{Direction.UP}/#",
            f"$share/{group}/{PREFIX}/{Subtree.ENROLL}/+/{Direction.UP}/#")


# -- parsing ---------------------------------------------------------------------------------------
_PREFIX_PARTS = PREFIX.split("/")


def _split(topic: object) -> list[str]:
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, not {type(topic).__name__}")
    if len(topic) > 512:
        raise TopicError("topic is too long")
    parts = topic.split("/")
    if len(parts) != len(_PREFIX_PARTS) + 4 or parts[:len(_PREFIX_PARTS)] != _PREFIX_PARTS:
        raise TopicError(f"not a {PREFIX} topic: {topic[:120]!r}")
    return parts[len(_PREFIX_PARTS):]


def _identity(subtree: Subtree, identity: str) -> str:
    if subtree is Subtree.DEVICES:
        return validate_device_id(identity)
    device_id_from_claim(identity)
    return identity


def parse_server_topic(topic: str) -> ServerTopic:
    """Parse a topic the fleet server received (device -> server, ``up`` direction only).

    Raises :class:`TopicError` for anything that is not exactly ``fleet/v1/devices/{id}/up/{kind}``
    or ``fleet/v1/enroll/claim:{id}/up/{kind}`` with a valid id and kind, including a claim
    identity in the ``devices`` subtree.
    """
    subtree_s, identity, direction, kind = _split(topic)
    try:
        subtree = Subtree(subtree_s)
    except ValueError:
        raise TopicError(f"unknown subtree {subtree_s[:40]!r}") from None
    if direction != Direction.UP:
        raise TopicError(f"the server only accepts '{Direction.UP}' topics, not {direction[:40]!r}")
    return ServerTopic(subtree, _identity(subtree, identity), validate_kind(kind))


def parse_device_topic(topic: str, device_id: str) -> str:
    """Parse a topic a device received on its device-certificate connection; return the kind.

    Only ``fleet/v1/devices/{device_id}/down/{kind}`` for this very ``device_id`` is accepted.
    """
    subtree, identity, direction, kind = _split(topic)
    if subtree != Subtree.DEVICES or direction != Direction.DOWN or identity != validate_device_id(device_id):
        raise TopicError(f"not a down topic of device {device_id!r}: {topic[:120]!r}")
    return validate_kind(kind)


def parse_enroll_topic(topic: str, device_id: str) -> str:
    """Parse a topic a device received on its claim-certificate connection; return the kind.

    Only ``fleet/v1/enroll/claim:{device_id}/down/{kind}`` is accepted.
    """
    subtree, identity, direction, kind = _split(topic)
    if subtree != Subtree.ENROLL or direction != Direction.DOWN or identity != claim_identity(device_id):
        raise TopicError(f"not an enrollment topic of device {device_id!r}: {topic[:120]!r}")
    return validate_kind(kind)
