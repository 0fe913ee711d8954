"""Tap: live summaries of requests that match a filter, for `rumor tap` (sans-IO).

A tap is a *session* on each agent, opened and polled by the ``tap`` query (guarded by
the API token): the asker's first poll opens it with a filter (service, path prefix,
listener), a duration, an event cap and a rate; each poll takes the events gathered
since the last. A session ends by itself at its deadline, after ``IDLE`` seconds
without a poll (the asker went away), or when its cap is reached; nobody has to close
it.

What a summary holds: method, path, status, latency, service, instance, tries, the
sidecar's reason code and phrase when it answered itself, caller, route rule; never a
body, and header values only for the names the operator asked for.

The data path pays for taps only while one is open: with none, the observer's
``request_ended`` returns after one test. An open tap costs a filter test per request
and, within its rate (a token bucket, at most ``MAX_RATE`` events/s), one small dict;
past the rate or a full buffer, events are counted as dropped, not built.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .observe import Exchange, NullObserver

MAX_SESSIONS = 16
MAX_RATE = 100.0  # events per second per session
DEFAULT_RATE = 50.0
MAX_BUFFER = 1000  # events held between polls
MAX_POLL = 500  # events one answer carries
MAX_DURATION = 300.0
IDLE = 5.0  # a session unpolled this long ends
MAX_HEADERS = 8
MAX_HEADER_NAME = 64
MAX_TEXT = 256  # a path or header value in a summary, truncated
MAX_ID = 32
WIRE_VERSION = 1


class TapError(ValueError):
    """A tap request that is not one (the reason is for the operator)."""


@dataclass(frozen=True, slots=True)
class TapRequest:
    """What the ``tap`` query asks: open (or keep polling) session ``id``."""

    id: str
    service: str = ""
    path: str = ""  # a prefix of the request target
    listener: str = ""  # "", "outbound" or "inbound"
    duration: float = 10.0  # 0: close the session now
    max_events: int = 100
    rate: float = DEFAULT_RATE
    headers: tuple[str, ...] = ()

    def payload(self) -> bytes:
        data: bytes = msgpack.packb([WIRE_VERSION, self.id, self.service, self.path,
                                     self.listener, self.duration, self.max_events,
                                     self.rate, list(self.headers)])
        return data


def tap_request(payload: bytes) -> TapRequest:
    """The ``TapRequest`` of a ``tap`` payload, checked; ``TapError`` otherwise."""
    try:
        doc = msgpack.unpackb(payload, raw=False, max_array_len=16, max_map_len=0,
                              max_str_len=512, max_bin_len=0, max_ext_len=0)
    except Exception:  # msgpack raises many types on junk
        raise TapError("a tap payload is a msgpack list") from None
    if not isinstance(doc, list) or len(doc) < 9 or doc[0] != WIRE_VERSION:
        raise TapError("a tap payload is [1, id, service, path, listener, duration, max, "
                       "rate, headers]")
    _, tid, service, path, listener, duration, max_events, rate, headers = doc[:9]
    if not (isinstance(tid, str) and 0 < len(tid) <= MAX_ID and tid.isalnum()):
        raise TapError("a tap id is 1-32 letters or digits")
    for what, v in (("service", service), ("path", path)):
        if not (isinstance(v, str) and len(v) <= MAX_TEXT and v.isprintable()):
            raise TapError(f"bad {what}")
    if listener not in ("", "outbound", "inbound"):
        raise TapError("listener is outbound, inbound or empty")
    if not (type(duration) in (int, float) and 0 <= duration <= MAX_DURATION):
        raise TapError(f"a tap lasts 0 to {MAX_DURATION:g} seconds")
    if not (type(max_events) is int and 1 <= max_events <= 100_000):
        raise TapError("max is 1 to 100000 events")
    if not (type(rate) in (int, float) and 0 < rate <= MAX_RATE):
        raise TapError(f"the rate is above 0 and at most {MAX_RATE:g} events/s")
    if not (isinstance(headers, list) and len(headers) <= MAX_HEADERS and all(
            isinstance(h, str) and 0 < len(h) <= MAX_HEADER_NAME
            and h.isascii() and h.isprintable() and ":" not in h for h in headers)):
        raise TapError(f"at most {MAX_HEADERS} header names")
    return TapRequest(tid, service, path, listener, float(duration), max_events,
                      float(rate), tuple(h.lower() for h in headers))


@dataclass(slots=True)
class Session:
    request: TapRequest
    deadline: float
    last_poll: float
    #: The deadline, or IDLE after the last poll if sooner: past it, take nothing.
    stop_at: float
    tokens: float
    refilled: float
    path: bytes = b""
    headers: tuple[bytes, ...] = ()
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque())
    matched: int = 0
    taken: int = 0  # events built (toward max_events)
    dropped: int = 0

    @property
    def full(self) -> bool:
        return self.taken >= self.request.max_events


class TapHub(NullObserver):
    """The sessions open on this agent, and the observer that feeds them.

    ``wall`` reads the wall clock (for the summaries' times); it is read at each poll,
    not per request."""

    def __init__(self, wall: Callable[[], float], now: float) -> None:
        self._wall = wall
        self.wall_offset = wall() - now
        self.sessions: dict[str, Session] = {}
        self._closed: dict[str, None] = {}  # ids of ended sessions, oldest first
        self.stats = {"opened": 0, "refused": 0, "events": 0, "dropped": 0}

    # ---- the request path -----------------------------------------------------------------

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        if not self.sessions:
            return
        ended = None
        for s in self.sessions.values():
            if now >= s.stop_at or s.full:
                # Ended (keep it while it has events to hand over) or abandoned.
                if not s.events or now - s.last_poll >= IDLE:
                    ended = ended or []
                    ended.append(s.request.id)
                continue
            r = s.request
            if (r.service and x.service != r.service) or (r.listener and x.listener != r.listener) \
                    or (s.path and not x.target.startswith(s.path)):
                continue
            s.matched += 1
            tokens = min(r.rate, s.tokens + (now - s.refilled) * r.rate)
            s.refilled = now
            if tokens < 1.0 or len(s.events) >= MAX_BUFFER:
                s.tokens = tokens
                s.dropped += 1
                continue
            s.tokens = tokens - 1.0
            s.taken += 1
            s.events.append(self._summary(x, now, s))
        if ended:
            for tid in ended:
                self._end(tid)

    def _summary(self, x: Exchange, now: float, s: Session) -> dict[str, Any]:
        h = x.headers_at
        ev: dict[str, Any] = {
            "at": round(x.started + self.wall_offset, 6), "listener": x.listener,
            "method": x.method.decode("latin-1"),
            "path": x.target[:MAX_TEXT].decode("latin-1"),
            "service": x.service, "status": x.status,
            "latency_ms": round(((h if h is not None else now) - x.started) * 1000, 3),
            "instance": x.instance, "tries": x.tries, "source": x.source,
            "route": x.route_rule, "code": x.code, "reason": x.reason,
        }
        if s.headers and x.headers is not None:
            shown: dict[str, str] = {}
            for name, value in x.headers:
                if name in s.headers:
                    text = value[:MAX_TEXT].decode("latin-1")
                    key = name.decode("ascii")
                    shown[key] = f"{shown[key]}, {text}" if key in shown else text
            ev["headers"] = shown
        return ev

    def _end(self, tid: str) -> None:
        s = self.sessions.pop(tid, None)
        if s is not None:
            self.stats["events"] += s.taken
            self.stats["dropped"] += s.dropped
            # A late poll of an ended tap must not open it again.
            self._closed[tid] = None
            while len(self._closed) > 4 * MAX_SESSIONS:
                del self._closed[next(iter(self._closed))]

    # ---- the query ----------------------------------------------------------------------

    def poll(self, now: float, r: TapRequest) -> dict[str, Any]:
        """Open session ``r.id`` if new (``TapError`` if too many are open), and take
        what it gathered. ``duration`` 0 closes it."""
        self.wall_offset = self._wall() - now
        for tid in [t for t, s in self.sessions.items()
                    if now >= s.deadline + IDLE or now - s.last_poll >= IDLE]:
            self._end(tid)
        s = self.sessions.get(r.id)
        if s is None:
            if r.duration == 0 or r.id in self._closed:
                return _answer([], 0, 0, False)
            if len(self.sessions) >= MAX_SESSIONS:
                self.stats["refused"] += 1
                raise TapError(f"{MAX_SESSIONS} taps are open on this agent already")
            s = self.sessions[r.id] = Session(
                r, now + r.duration, now, now, tokens=min(r.rate, 1.0 + r.rate / 10),
                refilled=now, path=r.path.encode("latin-1", "replace"),
                headers=tuple(h.encode("ascii") for h in r.headers))
            self.stats["opened"] += 1
        s.last_poll = now
        s.stop_at = min(s.deadline, now + IDLE)
        take = min(len(s.events), MAX_POLL)
        events = [s.events.popleft() for _ in range(take)]
        dropped, s.dropped = s.dropped, 0
        self.stats["dropped"] += dropped
        is_open = now < s.deadline and not s.full and r.duration > 0
        if not is_open and not s.events:
            self._end(r.id)
        return _answer(events, dropped, s.matched, is_open)


def _answer(events: list[dict[str, Any]], dropped: int, matched: int,
            is_open: bool) -> dict[str, Any]:
    return {"v": WIRE_VERSION, "events": events, "dropped": dropped, "matched": matched,
            "open": is_open}


# ---- reading a peer's answer ----------------------------------------------------------------

_EVENT_STR = ("listener", "method", "path", "service", "instance")
_EVENT_OPT = ("source", "route", "code", "reason")


def read_answer(data: bytes) -> dict[str, Any]:
    """A peer's ``tap`` answer, checked (``TapError``): every value typed and bounded."""
    try:
        doc = msgpack.unpackb(data, raw=False, max_array_len=MAX_POLL, max_map_len=32,
                              max_str_len=4 * MAX_TEXT, max_bin_len=0, max_ext_len=0)
    except Exception:  # msgpack raises many types on junk
        raise TapError("not msgpack") from None
    if not isinstance(doc, dict) or doc.get("v") != WIRE_VERSION:
        raise TapError("not a tap answer of version 1")
    events = doc.get("events")
    if not isinstance(events, list):
        raise TapError("events must be a list")
    out = []
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            raise TapError(f"event {i} is not a map")
        clean: dict[str, Any] = {}
        for k in _EVENT_STR:
            v = ev.get(k, "")
            if not isinstance(v, str) or len(v) > MAX_TEXT * 2:
                raise TapError(f"event {i}: bad {k}")
            clean[k] = v
        for k in _EVENT_OPT:
            v = ev.get(k)
            if v is not None and (not isinstance(v, str) or len(v) > MAX_TEXT * 4):
                raise TapError(f"event {i}: bad {k}")
            clean[k] = v
        for k in ("at", "latency_ms"):
            v = ev.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TapError(f"event {i}: bad {k}")
            clean[k] = float(v)
        for k in ("status", "tries"):
            v = ev.get(k)
            if type(v) is not int or not 0 <= v < 1000:
                raise TapError(f"event {i}: bad {k}")
            clean[k] = v
        hs = ev.get("headers")
        if hs is not None:
            if not (isinstance(hs, dict) and len(hs) <= MAX_HEADERS and all(
                    isinstance(k, str) and isinstance(v, str) and len(v) <= 8 * MAX_TEXT
                    for k, v in hs.items())):
                raise TapError(f"event {i}: bad headers")
            clean["headers"] = hs
        out.append(clean)
    counts = [doc.get(k) for k in ("dropped", "matched")]
    if not all(type(n) is int and n >= 0 for n in counts) or type(doc.get("open")) is not bool:
        raise TapError("bad counts")
    return {"events": out, "dropped": counts[0], "matched": counts[1], "open": doc["open"]}


__all__ = ["DEFAULT_RATE", "IDLE", "MAX_RATE", "MAX_SESSIONS", "TapError", "TapHub",
           "TapRequest", "read_answer", "tap_request"]
