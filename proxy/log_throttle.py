"""One log line per key and interval, the rest counted: a flood of bad connections
must cost a counter, not a line each (the metrics count every one).

Sans-IO: the caller passes ``now``. ``allow`` answers whether to log and how many
lines of that key it held back since the last one it let through, so the line that
does go out can say "4211 more like it since the last such line".
"""

from __future__ import annotations

from collections.abc import Hashable

#: Seconds between two lines of one key.
INTERVAL = 10.0
#: Keys remembered at once; past it the oldest are forgotten (an attacker choosing
#: keys must not grow this table).
MAX_KEYS = 1024


class LogThrottle:
    def __init__(self, interval: float = INTERVAL, max_keys: int = MAX_KEYS) -> None:
        self.interval = interval
        self.max_keys = max_keys
        #: key -> (when its last line went out, lines held back since).
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def allow(self, key: Hashable, now: float) -> int | None:
        """None: hold this line back. Otherwise log it, saying how many were held."""
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            self._seen[key] = (seen[0], seen[1] + 1)
            return None
        if seen is None and len(self._seen) >= self.max_keys:
            del self._seen[next(iter(self._seen))]  # the oldest inserted
        self._seen.pop(key, None)
        self._seen[key] = (now, 0)
        return 0 if seen is None else seen[1]


def held_note(held: int) -> str:
    """What a line that goes out adds about the ones held back before it."""
    return f" ({held} more like it since the last such line)" if held else ""
