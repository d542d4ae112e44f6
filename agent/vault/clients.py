"""The local inference API's clients: who may call, with which token, within which limits.

``[inference] clients_file`` names a TOML file with one table per client app::

    [clients.camera-app]
    token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    rate = 5              # optional: requests per second (default and cap: the model policy's)
    burst = 10            # optional: bucket size (default and cap: the policy's)
    daily_quota = 1000    # optional: samples per UTC day (cap: the policy's client quota)
    models = ["classifier"]   # optional: models this client may use (default: all)

Only the SHA-256 of each bearer token is stored (``sha256sum`` of the token, hex). Per-client limits
may only be tighter than the model's policy, which the server signs into every key release: the
effective value is the smaller of the two.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.inference.guard import ClientInfo
from agent.inference.limits import CLIENT_ID_RE
from protocol.errors import ConfigError
from protocol.messages import MODEL_NAME_RE, ModelPolicy

__all__ = ["ClientEntry", "client_table", "load_clients", "parse_clients"]

MAX_CLIENTS_FILE = 256 * 1024
MAX_CLIENTS = 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEYS = frozenset({"token_sha256", "rate", "burst", "daily_quota", "models"})


@dataclass(frozen=True, slots=True)
class ClientEntry:
    """One client app from the clients file (limits ``None``: the policy's)."""

    client_id: str
    token_sha256: bytes
    rate: float | None = None
    burst: float | None = None
    daily_quota: int | None = None
    models: frozenset[str] | None = None


def _number(where: str, value: Any, *, integer: bool, lo: float) -> float:
    wrong_type = isinstance(value, bool) or not isinstance(value, int | float)
    if wrong_type or (integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: expected {'an integer' if integer else 'a number'}")
    if value < lo or value > 1e12:
        raise ConfigError(f"{where}: {value} is out of range")
    return value


def parse_clients(data: Mapping[str, Any], source: str = "clients file") -> tuple[ClientEntry, ...]:
    """Strictly read parsed TOML (see the module docstring); :class:`ConfigError` names the key."""
    if set(data) - {"clients"}:
        raise ConfigError(f"{source}: unknown key {sorted(set(data) - {'clients'})[0]!r}")
    table = data.get("clients", {})
    if not isinstance(table, dict) or len(table) > MAX_CLIENTS:
        raise ConfigError(f"{source}: [clients] must be a table of at most {MAX_CLIENTS} clients")
    out: list[ClientEntry] = []
    seen: set[bytes] = set()
    for cid, entry in sorted(table.items()):
        where = f"{source}: clients.{cid}"
        if not CLIENT_ID_RE.fullmatch(cid):
            raise ConfigError(f"{where}: invalid client id")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(entry) - _KEYS
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
        digest = entry.get("token_sha256")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ConfigError(f"{where}.token_sha256: expected 64 lowercase hex digits (the token's SHA-256)")
        token = bytes.fromhex(digest)
        if token in seen:
            raise ConfigError(f"{where}.token_sha256: the same token is registered twice")
        seen.add(token)
        models = entry.get("models")
        names_ok = isinstance(models, list) and all(isinstance(m, str) and MODEL_NAME_RE.fullmatch(m)
                                                    for m in models)
        if models is not None and not names_ok:
            raise ConfigError(f"{where}.models: expected a list of model names")
        rate = entry.get("rate")
        burst = entry.get("burst")
        quota = entry.get("daily_quota")
        out.append(ClientEntry(
            client_id=cid, token_sha256=token,
            rate=None if rate is None else _number(f"{where}.rate", rate, integer=False, lo=0.001),
            burst=None if burst is None else _number(f"{where}.burst", burst, integer=False, lo=1),
            daily_quota=None if quota is None
            else int(_number(f"{where}.daily_quota", quota, integer=True, lo=0)),
            models=None if models is None else frozenset(models)))
    return tuple(out)


def load_clients(path: Path) -> tuple[ClientEntry, ...]:
    """Read and check the clients file (:class:`ConfigError` on any problem)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CLIENTS_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"inference.clients_file: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CLIENTS_FILE:
        raise ConfigError(f"inference.clients_file: {path} is larger than {MAX_CLIENTS_FILE} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"inference.clients_file: {path} is not valid TOML: {exc}") from None
    return parse_clients(data, str(path.name))


def _cap(value: float | None, cap: float | None) -> float | None:
    if value is None:
        return cap
    return value if cap is None else min(value, cap)


def client_table(entries: Iterable[ClientEntry], policy: ModelPolicy, model: str) -> dict[bytes, ClientInfo]:
    """The guard's client table for ``model``: token hash -> :class:`ClientInfo`, with every limit the
    smaller of the client's and the signed policy's. Clients not allowed this model are left out."""
    table: dict[bytes, ClientInfo] = {}
    for e in entries:
        if e.models is not None and model not in e.models:
            continue
        rate = _cap(e.rate, float(policy.client_rate))
        burst = _cap(e.burst, float(policy.client_burst))
        quota = _cap(e.daily_quota, policy.client_daily_quota)
        assert rate is not None and burst is not None
        table[e.token_sha256] = ClientInfo(client_id=e.client_id, rate=rate, burst=max(1.0, burst),
                                           daily_quota=None if quota is None else int(quota),
                                           models=frozenset({model}))
    return table
