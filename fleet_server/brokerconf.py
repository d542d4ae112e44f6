"""The fleet's Mosquitto configuration pieces, in one place: the ACL and a TLS listener.

``fleet-server init`` writes them for the operator (``broker/acl``, ``broker/mosquitto.conf``) and
:class:`firmware_sim.broker.MosquittoBroker` runs the tests, the harness and the demo with them, so
both brokers enforce exactly the same rules. Identities and listeners are explained in
``docs/protocol.md`` (*Identities and credentials*).
"""

from __future__ import annotations

from pathlib import Path

from protocol.topics import PREFIX, SERVER_IDENTITY, Direction, Subtree

ACL = (
    "# The fleet's Mosquitto ACL: %u is the client certificate's CN (use_identity_as_username).\n"
    f"user {SERVER_IDENTITY}\n"
    f"topic readwrite {PREFIX}/#\n"
    "\n"
    "# Directional: a client may only publish 'up' and only read 'down', each in its own subtree.\n"
    f"pattern write {PREFIX}/{Subtree.DEVICES}/%u/{Direction.UP}/#\n"
    f"pattern read {PREFIX}/{Subtree.DEVICES}/%u/{Direction.DOWN}/#\n"
    f"pattern write {PREFIX}/{Subtree.ENROLL}/%u/{Direction.UP}/#\n"
    f"pattern read {PREFIX}/{Subtree.ENROLL}/%u/{Direction.DOWN}/#\n"
)
"""Anything not granted is denied (including ``$SYS``)."""


def listener_lines(listen: str, *, client_ca: Path | str, cert: Path | str, key: Path | str,
                   devices: bool, crl: Path | str | None = None) -> list[str]:
    """One TLS listener (``listen``: ``"PORT"`` or ``"PORT HOST"``) requiring a client certificate
    of ``client_ca`` whose CN is the MQTT username. ``devices``: the device listener, where the
    client id is forced to the username (no device can take over another client's session by its
    client id) and ``crl`` lists revoked device certificates."""
    lines = [f"listener {listen}", "protocol mqtt", f"cafile {client_ca}", f"certfile {cert}",
             f"keyfile {key}", "tls_version tlsv1.2", "require_certificate true",
             "use_identity_as_username true"]
    if devices:
        lines.append("use_username_as_clientid true")
        if crl is not None:
            lines.append(f"crlfile {crl}")
    return [*lines, ""]


__all__ = ["ACL", "listener_lines"]
