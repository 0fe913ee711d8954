# layer: shell — writes the access log (trio, time)
"""The access log: one JSON object per proxied request, one line each.

Written straight to a file (or stdout) rather than through `logging`: it is the
highest-volume output of the agent, and a log record per request would cost more than
the proxying. Fields are stable for machines: ``ts`` (ISO 8601, UTC), ``listener``
(``outbound``/``inbound``), ``method``, ``path``, ``service``, ``instance``,
``status``, ``duration_ms`` (to the last byte), ``upstream_ms`` (to response
headers), ``bytes``, ``attempts``, ``client``, ``source``, ``trace_id``, ``error``
(the sidecar's own phrase, or "response not completed"), ``code`` (its reason code),
``route_rule`` and ``fault`` (the fault rule that delayed or aborted it).
``AccessLogObserver`` is the request pipeline's observer that writes them.

The request path only appends the entry and its time to a list; ``run`` (a task of
the agent's nursery) formats and writes what accumulated every ``interval`` seconds,
in one write from a worker thread, so neither JSON nor a system call nor a slow disk
is on the request path. Lines reach the file within ``interval``; at shutdown what is
pending is written. A disk that cannot keep up loses entries beyond ``max_pending``
(counted in ``dropped``), never the requests' time.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

import trio

from .observe import Exchange, NullObserver

log = logging.getLogger("rumor.proxy")

FLUSH_INTERVAL = 0.2
MAX_PENDING = 65536


class AccessLog:
    def __init__(self, target: str, *, interval: float = FLUSH_INTERVAL,
                 max_pending: int = MAX_PENDING) -> None:
        self._own = target != "-"
        # Held open for the agent's lifetime; close() releases it.
        self._out: IO[str] = (open(target, "a", encoding="utf-8")  # noqa: SIM115
                              if self._own else sys.stdout)
        self._interval = interval
        self._max_pending = max_pending
        self._pending: list[tuple[float, dict[str, Any]]] = []
        self.dropped = 0
        #: A new target from a reload, switched to by the next write (which may be
        #: running in a worker thread: the switch happens there, between batches).
        self._reopen: str | None = None
        self.target = target

    def write(self, entry: dict[str, Any]) -> None:
        """Log one request (the request path: an append, nothing more)."""
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        self._pending.append((time.time(), entry))

    def flush(self) -> None:
        """Format and write what is pending, now (blocking)."""
        batch, self._pending = self._pending, []
        if batch:
            self._write(batch)

    async def run(self) -> None:
        """Write what accumulated every ``interval`` until cancelled, then the rest."""
        try:
            while True:
                await trio.sleep(self._interval)
                batch, self._pending = self._pending, []
                if batch:
                    await trio.to_thread.run_sync(self._write, batch)
        finally:
            self.flush()

    def reopen(self, target: str) -> None:
        """Write to ``target`` ("-": stdout) from the next batch on (a reload)."""
        self._reopen = self.target = target

    def close(self) -> None:
        self.flush()
        if self._own:
            self._out.close()

    def _write(self, batch: list[tuple[float, dict[str, Any]]]) -> None:
        if self._reopen is not None:
            self._switch(self._reopen)
        self._out.write("".join(_line(now, entry) for now, entry in batch))
        self._out.flush()

    def _switch(self, target: str) -> None:
        self._reopen = None
        try:
            new: IO[str] = (open(target, "a", encoding="utf-8")  # noqa: SIM115
                            if target != "-" else sys.stdout)
        except OSError as e:
            log.error("access log: cannot open %s (%s); still writing to the previous "
                      "file", target, e.strerror or e, extra={"event": "access_log_error"})
            return
        if self._own:
            self._out.close()
        self._out, self._own = new, target != "-"


def _line(now: float, entry: dict[str, Any]) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    return json.dumps({"ts": ts, **entry}, separators=(",", ":")) + "\n"


class AccessLogObserver(NullObserver):
    """Writes one access-log entry per request, at its end (observe.py)."""

    __slots__ = ("log",)

    def __init__(self, access_log: AccessLog) -> None:
        self.log = access_log

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        entry: dict[str, Any] = {
            "listener": x.listener, "method": x.method.decode("ascii", "replace"),
            "path": x.target.decode("ascii", "replace")[:512], "service": x.service,
            "status": x.status, "duration_ms": round((now - x.started) * 1000, 3),
            "bytes": sent, "client": x.client, "source": x.source, "trace_id": x.trace,
            "instance": x.instance}
        if x.listener == "outbound":
            entry["attempts"] = x.tries
        if x.headers_at is not None:
            entry["upstream_ms"] = round((x.headers_at - x.started) * 1000, 3)
        entry["error"] = x.reason if x.code is not None else (
            None if complete else "response not completed")
        if x.code is not None:
            entry["code"] = x.code
        if x.route_rule is not None:
            entry["route_rule"] = x.route_rule
        if x.fault is not None:
            entry["fault"] = x.fault
            if x.fault_delay:
                entry["fault_delay_ms"] = round(x.fault_delay * 1000, 3)
        self.log.write(entry)
