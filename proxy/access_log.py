"""The access log: one JSON object per proxied request, one line each.

Written straight to a file (or stdout) rather than through `logging`: it is the
highest-volume output of the agent, and a log record per request would cost more than
the proxying. Fields are stable for machines: ``ts`` (ISO 8601, UTC), ``listener``
(``outbound``/``inbound``), ``method``, ``path``, ``service``, ``instance``,
``status``, ``duration_ms`` (to the last byte), ``upstream_ms`` (to response
headers), ``bytes``, ``attempts``, ``client``, ``source``, ``trace_id``, ``error``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any


class AccessLog:
    def __init__(self, target: str) -> None:
        self._own = target != "-"
        # Held open for the agent's lifetime; close() releases it.
        self._out: IO[str] = (open(target, "a", encoding="utf-8")  # noqa: SIM115
                              if self._own else sys.stdout)

    def write(self, entry: dict[str, Any]) -> None:
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        self._out.write(json.dumps({"ts": ts, **entry}, separators=(",", ":")) + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._own:
            self._out.close()
