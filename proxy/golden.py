"""Golden metrics: requests/s, success rate and latency quantiles per edge, route rule
and instance, over a sliding window, mergeable across agents (sans-IO).

One series per (listener, source, secured, service, route rule, instance): the edge,
route and instance views are groupings of the same series, made when someone asks, so
a request costs one dictionary lookup, a few integer additions and one sketch insert.
Each series counts

- *requests* and *successes*: what the caller saw (Linkerd's "effective");
- *tries* and *try successes*: each try on the instance that served it ("actual"), so
  retries show as the gap between the two;
- the latency to the response head in a DDSketch (the ``ddsketch`` package, relative
  accuracy ``ACCURACY``; its bins counted per request, the sketch built when read, see
  ``Series``), whose quantiles merge exactly as the sketch allows: views from many
  agents add into one mesh-wide distribution, never an average of percentiles.

Time is cut into buckets aligned on the wall clock (``BUCKET`` seconds, a multiple of
which every agent uses), and a window is a run of whole buckets ending at a bucket
boundary; so the same window asked of several agents covers the same seconds on each
and their views add up. Buckets older than the longest window are dropped.

Bounds: service names, and callers' names that only a header gives, count only if the
agent knows them (the catalog or a policy names them), else they are ``unknown`` (a
header is the network's to choose); a caller its certificate proved is named; route
rules come from signed policy; instances from the catalog. On top of that a bucket
holds at most ``max_series`` series; the rest add into one more, ``(other)``, so a
hostile caller cannot make memory grow.

``Snapshot`` is the window's series, ``to_wire``/``from_wire`` its msgpack form (a
peer's answer is decoded as untrusted input, sketches checked before they are built),
``merge`` adds snapshots, and ``summarise`` groups them into rows for ``rumor stat``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping

from .grpc import failed as grpc_failed
from .observe import Exchange, NullObserver

# The sketch's protobuf message (and protobuf, ~35 ms) is imported by the two functions
# that use it, when a peer asks for or answers a stat query: not at the agent's start.

#: The sketches' relative accuracy: a quantile is within 1% of the true value. Part of
#: the wire format: agents merge only sketches made with the same mapping.
ACCURACY = 0.01
#: Bucket width in seconds, and the longest window kept.
BUCKET = 5.0
MAX_WINDOW = 60.0
DEFAULT_WINDOW = 60.0
MAX_SERIES = 1000
OTHER = "(other)"
UNKNOWN = "unknown"

WIRE_VERSION = 1
#: Latencies a sketch holds: 1 µs (shorter ones count as 1 µs) to 1 hour (a peer's keys
#: outside are refused).
_MAPPING = LogarithmicMapping(ACCURACY)
_key = _MAPPING.key
MIN_LATENCY = 1e-6
MIN_KEY = _MAPPING.key(MIN_LATENCY)
MAX_KEY = _MAPPING.key(3600.0)
MAX_SKETCH_BYTES = 16 * 1024
MAX_WIRE_SERIES = 8 * MAX_SERIES
MAX_NAME = 256

#: (listener, source, secured, service, route rule, instance).
Key = tuple[str, str, bool, str, str, str]
FIELDS = ("listener", "source", "secured", "service", "route", "instance")


class GoldenDecodeError(ValueError):
    """A golden-metrics answer that is not one."""


class Series:
    """One series' counts over one bucket (or, merged, over a window).

    ``bins`` are the latency sketch's bins, counted as they come: the DDSketch mapping
    (``ddsketch.mapping.LogarithmicMapping``) gives each latency its key, and the
    sketch itself is built from the counts when someone reads it (``sketch``). The
    same bins, so the same quantiles, as inserting each value into a ``DDSketch``, at
    half the cost per request (one mapping call and one dictionary update)."""

    __slots__ = ("bins", "requests", "successes", "tries", "try_successes")

    def __init__(self) -> None:
        self.requests = 0
        self.successes = 0
        self.tries = 0
        self.try_successes = 0
        self.bins: dict[int, int] = {}

    def add(self, other: Series) -> None:
        self.requests += other.requests
        self.successes += other.successes
        self.tries += other.tries
        self.try_successes += other.try_successes
        bins = self.bins
        for k, n in other.bins.items():
            bins[k] = bins.get(k, 0) + n

    @property
    def latencies(self) -> int:
        return sum(self.bins.values())

    def sketch(self) -> DDSketch:
        """The latency sketch of these bins."""
        sk = DDSketch(ACCURACY)
        value = _MAPPING.value
        for k, n in self.bins.items():
            sk.add(value(k), float(n))
        return sk


@dataclass(slots=True)
class Bucket:
    start: float  # wall clock, a multiple of BUCKET
    #: The request's raw fields to its series (several unknown names share one).
    by_raw: dict[tuple[Any, ...], Series] = field(default_factory=dict)
    series: dict[Key, Series] = field(default_factory=dict)


class GoldenMetrics(NullObserver):
    """The observer (``observe.py``) that keeps the golden metrics.

    ``wall`` reads the wall clock; it is called when a bucket ends (once per ``BUCKET``
    seconds), not per request: times on the request path are the listener's monotonic
    clock, put on the wall clock by an offset re-read at each bucket."""

    def __init__(self, wall: Callable[[], float], now: float, *,
                 known: Callable[[str], bool] = lambda name: True,
                 max_series: int = MAX_SERIES) -> None:
        if max_series < 1:
            raise ValueError("max_series must be at least 1")
        self._wall = wall
        self._known = known
        self.max_series = max_series
        self.buckets: deque[Bucket] = deque()
        self.wall_offset = 0.0
        self._end = -math.inf  # monotonic time at which the current bucket ends
        self._current = Bucket(0.0)
        #: Lookups (tries and request ends) folded into ``(other)``: a bucket was full.
        self.overflowed = 0
        self._rotate(now)

    # ---- the request path -----------------------------------------------------------------

    def try_ended(self, x: Exchange, endpoint: Any, now: float, outcome: str) -> None:
        if now >= self._end:
            self._rotate(now)
        raw = (x.listener, x.source, x.secured, x.service, x.route_rule, endpoint.key)
        s = self._current.by_raw.get(raw)
        if s is None:
            s = self._series(raw)
        s.tries += 1
        # Statuses 1xx-4xx sort below "5"; 5xx and the conditions ("connect-failure",
        # "client-gone", ...) do not.
        if outcome < "5" and (x.grpc_status is None or not grpc_failed(x.grpc_status)):
            s.try_successes += 1

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        if now >= self._end:
            self._rotate(now)
        raw = (x.listener, x.source, x.secured, x.service, x.route_rule, x.instance)
        s = self._current.by_raw.get(raw)
        if s is None:
            s = self._series(raw)
        s.requests += 1
        ok = complete and 100 <= x.status < 500 and (
            x.grpc_status is None or not grpc_failed(x.grpc_status))
        if ok:
            s.successes += 1
        if x.listener == "inbound" and x.code is None:
            s.tries += 1  # the one try on the local instance: no try_* calls inbound
            if ok:
                s.try_successes += 1
        h = x.headers_at
        took = (h if h is not None else now) - x.started
        k = _key(took if took > MIN_LATENCY else MIN_LATENCY)
        bins = s.bins
        bins[k] = bins.get(k, 0) + 1

    def _series(self, raw: tuple[Any, ...]) -> Series:
        """The series of a request not seen yet in this bucket (the slow path)."""
        b = self._current
        listener, source, secured, service, route, instance = raw
        known = self._known
        if service and not known(service):
            service, instance = UNKNOWN, ""
        # Our own identity (outbound) and a caller its certificate proved are named; an
        # unproven caller's header only if the agent knows the name.
        if source and listener == "inbound" and not secured and not known(source):
            source = UNKNOWN
        key: Key = (listener, source or "", bool(secured), service, route or "",
                    instance or "")
        s = b.series.get(key)
        if s is None:
            if len(b.series) >= self.max_series:
                self.overflowed += 1
                key = (listener, OTHER, False, OTHER, OTHER, OTHER)
                s = b.series.get(key)
            if s is None:
                s = b.series[key] = Series()
        if len(b.by_raw) < 4 * self.max_series:
            b.by_raw[raw] = s
        return s

    def _rotate(self, now: float) -> None:
        self.wall_offset = self._wall() - now
        wall = now + self.wall_offset
        start = math.floor(wall / BUCKET) * BUCKET
        if start != self._current.start or not self.buckets:
            self._current = Bucket(start)
            self.buckets.append(self._current)
        # Older than the longest window (or out of order after a clock step back).
        oldest = start - MAX_WINDOW
        while self.buckets and not oldest <= self.buckets[0].start <= start:
            self.buckets.popleft()
        if not self.buckets:
            self.buckets.append(self._current)
        self._end = start + BUCKET - self.wall_offset

    # ---- reading ----------------------------------------------------------------------------

    def snapshot(self, now: float, window: float = DEFAULT_WINDOW,
                 end: float | None = None) -> Snapshot:
        """The window of ``window`` seconds ending at ``end`` (wall clock; default: the
        start of the current bucket, so only whole buckets count), one merged series per
        key. ``end`` is rounded down to a bucket boundary."""
        if now >= self._end:
            self._rotate(now)
        window = aligned_window(window)
        if end is None:
            end = self._current.start
        end = math.floor(end / BUCKET) * BUCKET
        start = end - window
        merged: dict[Key, Series] = {}
        for b in self.buckets:
            if start <= b.start < end:
                for key, s in b.series.items():
                    into = merged.get(key)
                    if into is None:
                        into = merged[key] = Series()
                    into.add(s)
        return Snapshot(start, end, merged)


def aligned_window(window: float) -> float:
    """``window`` as whole buckets, 1 to ``MAX_WINDOW / BUCKET`` of them."""
    if not math.isfinite(window) or window <= 0:
        raise ValueError(f"a window is a positive duration, got {window}")
    if window > MAX_WINDOW:
        raise ValueError(f"the window is at most {MAX_WINDOW:g}s, got {window:g}s")
    return max(1, round(window / BUCKET)) * BUCKET


@dataclass(slots=True)
class Snapshot:
    """Series over the wall-clock window [start, end)."""

    start: float
    end: float
    series: dict[Key, Series]
    #: Agents whose views were added in.
    agents: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.end - self.start


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The sum of snapshots of the same window: counts added, sketches merged."""
    out: Snapshot | None = None
    for snap in snapshots:
        if out is None:
            out = Snapshot(snap.start, snap.end, {}, [])
        elif (snap.start, snap.end) != (out.start, out.end):
            raise ValueError(f"snapshots of different windows: [{snap.start}, {snap.end}) "
                             f"and [{out.start}, {out.end})")
        for key, s in snap.series.items():
            into = out.series.get(key)
            if into is None:
                into = out.series[key] = Series()
            into.add(s)
        out.agents += snap.agents
    return out if out is not None else Snapshot(0.0, 0.0, {}, [])


def merge_answers(answers: Mapping[str, Any], start: float,
                  end: float) -> tuple[Snapshot, dict[str, str]]:
    """The ``golden`` query's answers (member -> ``query.Answer``) for the window
    [start, end) added up, and why any were left out: a failed answer, one that does not
    decode, or one for another window."""
    views: list[Snapshot] = []
    errors: dict[str, str] = {}
    for member, a in sorted(answers.items()):
        if not a.ok:
            errors[member] = a.error or "failed"
            continue
        try:
            v = from_wire(a.data, member)
        except GoldenDecodeError as e:
            errors[member] = f"bad answer: {e}"
            continue
        if (v.start, v.end) != (start, end):
            errors[member] = f"answered for another window [{v.start}, {v.end})"
            continue
        views.append(v)
    return (merge(views) if views else Snapshot(start, end, {}, [])), errors


# ---- the wire ---------------------------------------------------------------------------------


def to_wire(snap: Snapshot) -> bytes:
    """msgpack: the window and per series its key, counts and sketch (DDSketch's own
    protobuf message)."""
    rows = [[*key, s.requests, s.successes, s.tries, s.try_successes,
             _proto_bytes(s.sketch())]
            for key, s in snap.series.items()]
    data: bytes = msgpack.packb({"v": WIRE_VERSION, "start": snap.start, "end": snap.end,
                                 "bucket": BUCKET, "accuracy": ACCURACY, "series": rows})
    return data


def _proto_bytes(sketch: DDSketch) -> bytes:
    from ddsketch.pb.proto import DDSketchProto

    proto = DDSketchProto.to_proto(sketch)  # type: ignore[no-untyped-call]
    data: bytes = proto.SerializeToString()
    return data


def from_wire(data: bytes, agent: str = "") -> Snapshot:
    """A peer's ``to_wire``, validated; only ``GoldenDecodeError`` is raised."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True,
                              max_array_len=MAX_WIRE_SERIES, max_map_len=16,
                              max_str_len=MAX_NAME * 4, max_bin_len=MAX_SKETCH_BYTES,
                              max_ext_len=0)
    except Exception as e:  # msgpack raises many types on junk
        raise GoldenDecodeError(f"not msgpack: {type(e).__name__}") from None
    if not isinstance(doc, dict) or doc.get("v") != WIRE_VERSION:
        raise GoldenDecodeError("not a golden-metrics document of version 1")
    start, end = _time(doc.get("start")), _time(doc.get("end"))
    if not 0 < end - start <= MAX_WINDOW:
        raise GoldenDecodeError("bad window")
    if doc.get("accuracy") != ACCURACY:
        raise GoldenDecodeError(f"sketches of accuracy {doc.get('accuracy')!r}, not "
                                f"{ACCURACY}: not mergeable")
    rows = doc.get("series")
    if not isinstance(rows, list):
        raise GoldenDecodeError("series must be a list")
    series: dict[Key, Series] = {}
    for i, row in enumerate(rows):
        key, s = _row(i, row)
        into = series.get(key)
        if into is None:
            series[key] = s
        else:
            into.add(s)
    return Snapshot(start, end, series, [agent] if agent else [])


def _time(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GoldenDecodeError("bad window")
    return float(v)


def _row(i: int, row: object) -> tuple[Key, Series]:
    if not isinstance(row, list) or len(row) < 11:
        raise GoldenDecodeError(f"series {i}: expected 11 fields")
    listener, source, secured, service, route, instance = row[:6]
    for name in (listener, source, service, route, instance):
        if type(name) is not str or len(name) > MAX_NAME or not name.isprintable():
            raise GoldenDecodeError(f"series {i}: bad name")
    if type(secured) is not bool:
        raise GoldenDecodeError(f"series {i}: secured must be a boolean")
    counts = row[6:10]
    if not all(type(n) is int and 0 <= n < 2**53 for n in counts):
        raise GoldenDecodeError(f"series {i}: counts must be non-negative integers")
    s = Series()
    s.requests, s.successes, s.tries, s.try_successes = counts
    if s.successes > s.requests or s.try_successes > s.tries:
        raise GoldenDecodeError(f"series {i}: more successes than requests")
    s.bins = _bins(i, row[10])
    if s.latencies > s.requests:
        raise GoldenDecodeError(f"series {i}: more latencies than requests")
    return (listener, source, secured, service, route, instance), s


def _bins(i: int, data: object) -> dict[int, int]:
    """The bins of a peer's sketch (DDSketch's protobuf message), checked: our mapping,
    positive latencies between 1 µs and 1 hour, whole counts."""
    if not isinstance(data, bytes):
        raise GoldenDecodeError(f"series {i}: the sketch must be bytes")
    from ddsketch.pb import ddsketch_pb2 as pb

    proto = pb.DDSketch()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError, and others on junk
        raise GoldenDecodeError(f"series {i}: the sketch is not a DDSketch message") from None
    m = proto.mapping
    if m.gamma != _MAPPING.gamma or m.indexOffset != 0 or m.interpolation != pb.IndexMapping.NONE:
        raise GoldenDecodeError(f"series {i}: the sketch's mapping is not ours")
    pos, neg = proto.positiveValues, proto.negativeValues
    if neg.contiguousBinCounts or neg.binCounts or pos.binCounts or proto.zeroCount:
        raise GoldenDecodeError(f"series {i}: unexpected bins in the sketch")
    counts = pos.contiguousBinCounts
    lo = pos.contiguousBinIndexOffset
    if counts and not (lo >= MIN_KEY and lo + len(counts) - 1 <= MAX_KEY):
        raise GoldenDecodeError(f"series {i}: latencies outside 1 µs to 1 h")
    if not all(math.isfinite(c) and 0 <= c < 2**53 and c == int(c) for c in counts):
        raise GoldenDecodeError(f"series {i}: bad bin counts")
    return {lo + j: int(c) for j, c in enumerate(counts) if c}


# ---- views ------------------------------------------------------------------------------------

#: What each view groups by (fields of the key).
BY: dict[str, tuple[str, ...]] = {
    "edge": ("listener", "source", "secured", "service"),
    "route": ("listener", "service", "route"),
    "instance": ("listener", "service", "instance"),
    "service": ("listener", "service"),
}
QUANTILES = (0.5, 0.95, 0.99)


def summarise(snap: Snapshot, by: str = "service", *, service: str | None = None,
              listener: str | None = None) -> list[dict[str, Any]]:
    """Rows of the window grouped ``by`` a view (``BY``), busiest first: counts, rates,
    success rates (effective and actual), latency quantiles in milliseconds (None
    without requests)."""
    fields = BY[by]
    idx = [FIELDS.index(f) for f in fields]
    groups: dict[tuple[Any, ...], Series] = {}
    for key, s in snap.series.items():
        if service is not None and key[3] != service:
            continue
        if listener is not None and key[0] != listener:
            continue
        g = tuple(key[i] for i in idx)
        into = groups.get(g)
        if into is None:
            into = groups[g] = Series()
        into.add(s)
    secs = snap.seconds or 1.0
    rows = []
    for g, s in groups.items():
        row: dict[str, Any] = dict(zip(fields, g, strict=True))
        row.update(requests=s.requests, successes=s.successes, tries=s.tries,
                   try_successes=s.try_successes,
                   rps=round(s.requests / secs, 3),
                   success=round(s.successes / s.requests, 4) if s.requests else None,
                   actual_rps=round(s.tries / secs, 3),
                   actual_success=round(s.try_successes / s.tries, 4) if s.tries else None)
        sk = s.sketch() if s.bins else None
        for q in QUANTILES:
            v = sk.get_quantile_value(q) if sk is not None else None
            row[f"p{round(q * 100)}_ms"] = None if v is None else round(v * 1000, 3)
        rows.append(row)
    rows.sort(key=lambda r: (-r["requests"], [str(r[f]) for f in fields]))
    return rows


def quantile(snap: Snapshot, q: float, keys: Sequence[Key] | None = None) -> float | None:
    """The ``q`` quantile of latency over ``keys`` (default: every series), seconds."""
    merged = Series()
    for key, s in snap.series.items():
        if keys is None or key in keys:
            merged.add(s)
    v: float | None = merged.sketch().get_quantile_value(q) if merged.bins else None
    return v


__all__ = ["ACCURACY", "BUCKET", "BY", "DEFAULT_WINDOW", "FIELDS", "MAX_SERIES",
           "MAX_WINDOW", "OTHER", "UNKNOWN", "GoldenDecodeError", "GoldenMetrics", "Key",
           "Series", "Snapshot", "aligned_window", "from_wire", "merge", "merge_answers",
           "quantile", "summarise", "to_wire"]
