"""Business hours: a daily UTC time window, and whether an instant falls inside it (pure).

``BusinessHours.parse("08:00-18:00")`` is the window from 08:00 (inclusive) to 18:00 (exclusive),
every day, in UTC. A window whose end is before its start wraps midnight (``"22:00-06:00"``).
Used by the key broker's alert rule: a key release or a model download outside the window raises
an alert (and is refused when ``alerts.block_off_hours`` is set).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import ConfigError

_WINDOW_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])$")
_DAY_MS = 86_400_000
_MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class BusinessHours:
    """A daily window ``[start, end)`` in minutes after midnight UTC (``end`` may be 1440)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < 1440 and 0 < self.end <= 1440 and self.start != self.end):
            raise ConfigError(f"business hours {self}: start and end must differ and lie within one day")

    @classmethod
    def parse(cls, text: str) -> BusinessHours:
        """``"HH:MM-HH:MM"`` (UTC; ``24:00`` allowed as an end). Raises :class:`ConfigError`."""
        m = _WINDOW_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise ConfigError(f"business hours {text!r}: expected HH:MM-HH:MM (UTC), e.g. 08:00-18:00")
        start = int(m.group(1)) * 60 + int(m.group(2))
        end = int(m.group(3)) * 60 + int(m.group(4))
        if end > 1440:
            raise ConfigError(f"business hours {text!r}: the end is after 24:00")
        return cls(start, end or 1440)  # an end of 00:00 means midnight, the end of the day

    def contains(self, now_ms: int) -> bool:
        """True if ``now_ms`` (ms since the epoch) is inside the window on its UTC day."""
        minute = (now_ms % _DAY_MS) // _MINUTE_MS
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # wraps midnight

    def __str__(self) -> str:
        return (f"{self.start // 60:02d}:{self.start % 60:02d}-"
                f"{self.end // 60:02d}:{self.end % 60:02d} UTC")
