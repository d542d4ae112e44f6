"""The agent's version string, as installed (sent in ``attest.request`` and shown by the CLI)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "edge-attest"


def agent_version() -> str:
    """The installed version of the ``edge-attest`` distribution, ``0+unknown`` when run from a tree
    that was not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
