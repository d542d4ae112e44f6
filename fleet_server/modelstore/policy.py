"""Model usage policies as an operator writes them: a TOML file or ``key=value`` settings.

The policy (:class:`protocol.messages.ModelPolicy`) travels inside every signed key release; the
device's inference guard enforces it. Here it is built strictly: unknown keys, wrong types and
out-of-range values are refused with a :class:`ConfigError` naming the key, and every policy is
validated by :meth:`ModelPolicy.from_json`, the same parser the device runs.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from protocol.encoding import JsonValue, canonical_bytes
from protocol.errors import ConfigError, MessageError
from protocol.messages import ModelPolicy

__all__ = ["FIELDS", "MAX_POLICY_BYTES", "apply_settings", "loosened", "policy_from_mapping",
           "policy_from_text", "policy_from_toml", "policy_json"]

FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ModelPolicy))
_OPTIONAL = frozenset({"client_daily_quota", "device_daily_quota", "lease_quota"})
_INTEGERS = frozenset({"k", "decimals", "max_batch", "client_rate", "client_burst"}) | _OPTIONAL
_NONE_WORDS = frozenset({"none", "null", "unlimited", ""})
_TRUE, _FALSE = frozenset({"true", "yes", "on", "1"}), frozenset({"false", "no", "off", "0"})
# A key release (signed, at most 64 KiB, payload base64-encoded inside) must still fit.
MAX_POLICY_BYTES = 40 * 1024


# Output modes from the least to the most revealing (protocol.messages.OUTPUT_MODES).
_REVEALING = {"label": 0, "topk": 1, "full": 2}
_LIMITS = ("k", "decimals", "max_batch", "client_rate", "client_burst", "client_daily_quota",
           "device_daily_quota", "lease_quota")


def _limit(value: int | None) -> float:
    return float("inf") if value is None else float(value)  # a missing quota is unlimited


def loosened(before: ModelPolicy, after: ModelPolicy) -> tuple[str, ...]:
    """The keys whose change from ``before`` to ``after`` loosens the policy: a more revealing
    output mode, more top-k labels or decimals, higher rates, batches or quotas (``None`` is
    unlimited), alarm blocking turned off. Loosening needs ``model:deploy``; tightening does not."""
    out = []
    if _REVEALING.get(after.output_mode, 3) > _REVEALING.get(before.output_mode, 3):
        out.append("output_mode")
    out += [key for key in _LIMITS if _limit(getattr(after, key)) > _limit(getattr(before, key))]
    if before.block_on_alarm and not after.block_on_alarm:
        out.append("block_on_alarm")
    return tuple(out)


def policy_json(policy: ModelPolicy) -> str:
    """Canonical JSON text of ``policy`` (what the database stores)."""
    return canonical_bytes(policy.to_json()).decode()


def policy_from_text(text: str) -> ModelPolicy:
    """Inverse of :func:`policy_json` (strict)."""
    try:
        return ModelPolicy.from_json(json.loads(text))
    except (ValueError, MessageError) as exc:
        raise ConfigError(f"stored model policy is invalid: {exc}") from None


def policy_from_mapping(values: Mapping[str, Any], base: ModelPolicy | None = None) -> ModelPolicy:
    """``base`` (default: the defaults) with ``values`` applied; every key and value checked."""
    merged: dict[str, JsonValue] = dict((base or ModelPolicy()).to_json())
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"policy: unknown key {key!r} (known: {', '.join(FIELDS)})")
        if key == "labels" and isinstance(value, list | tuple):
            value = list(value)
        merged[key] = value
    try:
        policy = ModelPolicy.from_json(merged)
    except MessageError as exc:
        raise ConfigError(f"policy: {exc.diagnostics()}") from None
    size = len(canonical_bytes(policy.to_json()))
    if size > MAX_POLICY_BYTES:
        raise ConfigError(f"policy: {size} bytes of JSON exceed {MAX_POLICY_BYTES} (too many or too long "
                          "labels for a key release message)")
    return policy


def policy_from_toml(path: Path) -> ModelPolicy:
    """A policy from a TOML file of ModelPolicy keys (missing keys take the defaults; a missing
    quota means unlimited)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read policy {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    section = data.get("policy", data) if set(data) <= {"policy"} else data
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: expected a table of policy keys")
    try:
        return policy_from_mapping(section)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.diagnostics()}") from None


def _setting_value(key: str, text: str) -> JsonValue:
    raw = text.strip()
    if key in _OPTIONAL and raw.lower() in _NONE_WORDS:
        return None
    if key in _INTEGERS:
        try:
            return int(raw, 10)
        except ValueError:
            raise ConfigError(f"policy {key}: expected an integer, not {raw[:40]!r}") from None
    if key == "block_on_alarm":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"policy {key}: expected true or false, not {raw[:40]!r}")
    if key == "labels":
        if raw.startswith("["):
            try:
                value = json.loads(raw)
            except ValueError:
                raise ConfigError("policy labels: invalid JSON list") from None
            return value if isinstance(value, list) else raw
        return [label.strip() for label in raw.split(",")] if raw else []
    return raw


def apply_settings(base: ModelPolicy, settings: list[str]) -> ModelPolicy:
    """``base`` with ``key=value`` settings applied (``--set k=3 --set lease_quota=none``)."""
    values: dict[str, JsonValue] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"policy setting {setting[:60]!r}: expected key=value")
        if key not in FIELDS:
            raise ConfigError(f"policy: unknown key {key!r} (known: {', '.join(FIELDS)})")
        values[key] = _setting_value(key, text)
    return policy_from_mapping(values, base)
