"""The story of a suspicion: a bounded history of the membership events a node took
part in (sans-IO).

Consul's operators grep every node's log to find who first suspected a member and why.
Each membership core keeps, in ``core.history``, the events it took part in: probes
that failed (direct, then indirect), suspicions it raised, heard and counted as
independent confirmations, suspicions that ran out (it declared the member failed),
deaths it heard of, refutations (its own, and members it saw refute), its own
incarnation changes, and its Lifeguard local-health score changes. Every record carries
the core's time (``now``: no clock here), our local-health score at that moment, the
member it is about and who did it (us, or the accuser).

The history is a ring bounded in bytes: each record's cost is an upper bound on its
msgpack size (``Record.cost``), so the whole history, sent as a query answer, stays
within ``max_bytes`` (64 KiB by default); the oldest records are evicted and counted.
Recording is rare by construction: a successful probe records nothing.

``to_wire``/``from_wire`` are the plain encoding a query answer carries (wall-clock
times), the latter validating untrusted input and raising only ``HistoryDecodeError``.
``explain.py`` merges the answers of many agents into one timeline and tells the story.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .fields import MAX_NAME

#: A value in a record's detail: counts, durations, names, lists of names.
DetailValue = int | float | str | tuple[str, ...]

# ---- record kinds ---------------------------------------------------------------------------

#: Our probe of ``member`` got no ack within the probe timeout (``after`` s): we go
#: indirect, asking ``helpers``.
PROBE_DIRECT_FAILED = "probe_direct_failed"
#: The whole probe window passed without an ack: ``helpers`` asked, ``nacks`` of
#: ``expected_nacks`` came back (Lifeguard), ``tcp`` whether a TCP ping was tried.
PROBE_INDIRECT_FAILED = "probe_indirect_failed"
#: No UDP ack, but the TCP ping got through: no suspicion (UDP blocked?).
PROBE_TCP_ONLY = "probe_tcp_only"
#: We suspect ``member`` (``incarnation``, ``timeout``): ``via`` ``probe`` after our own
#: failed probe, ``push-pull`` from a peer's state, ``dead`` from a peer's dead.
#: (Every suspicion record carries ``via``: ``gossip`` for a heard one.)
SUSPECT_RAISED = "suspect_raised"
#: We heard ``by`` suspect ``member`` and started our suspicion timer.
SUSPECT_HEARD = "suspect_heard"
#: ``by`` independently confirmed a suspicion we hold: ``confirmations`` so far, the
#: suspicion's ``timeout`` now (Lifeguard shrinks it).
SUSPECT_CONFIRMED = "suspect_confirmed"
#: Our suspicion of ``member`` ran out after ``after`` s with ``confirmations``: we
#: declared it failed.
DECLARED_DEAD = "declared_dead"
#: We heard from ``by`` that ``member`` failed.
DEAD_HEARD = "dead_heard"
#: We heard that ``member`` left (its own word).
LEFT_HEARD = "left_heard"
#: We were accused (``accused`` incarnation, by ``accuser`` when known) and refuted
#: with ``incarnation``.
REFUTED = "refuted"
#: ``member``, which we held ``was`` (suspect, failed, left), is alive again at
#: ``incarnation``: a refutation when it was suspect.
REFUTE_SEEN = "refute_seen"
#: Our own incarnation changed ``old`` -> ``new`` (``why``).
INCARNATION = "incarnation"
#: Our Lifeguard local-health score changed ``old`` -> ``new`` (``why``).
HEALTH = "health"

KINDS = frozenset({PROBE_DIRECT_FAILED, PROBE_INDIRECT_FAILED, PROBE_TCP_ONLY,
                   SUSPECT_RAISED, SUSPECT_HEARD, SUSPECT_CONFIRMED, DECLARED_DEAD,
                   DEAD_HEARD, LEFT_HEARD, REFUTED, REFUTE_SEEN, INCARNATION, HEALTH})

#: What a record's text log line says for each kind (``describe``).
_TEXT: dict[str, str] = {
    PROBE_DIRECT_FAILED: "probe of {member} failed directly",
    PROBE_INDIRECT_FAILED: "probe of {member} failed indirectly too",
    PROBE_TCP_ONLY: "{member} answered only a TCP ping",
    SUSPECT_RAISED: "suspect {member}",
    SUSPECT_HEARD: "heard {by} suspect {member}",
    SUSPECT_CONFIRMED: "{by} confirmed the suspicion of {member}",
    DECLARED_DEAD: "declared {member} failed",
    DEAD_HEARD: "heard from {by} that {member} failed",
    LEFT_HEARD: "heard that {member} left",
    REFUTED: "refuted an accusation",
    REFUTE_SEEN: "{member} is alive again",
    INCARNATION: "incarnation changed",
    HEALTH: "local health changed",
}

#: The structured log line's ``event`` for each kind (``Record.to_json``).
CATEGORY: dict[str, str] = {
    PROBE_DIRECT_FAILED: "probe", PROBE_INDIRECT_FAILED: "probe", PROBE_TCP_ONLY: "probe",
    SUSPECT_RAISED: "suspicion", SUSPECT_HEARD: "suspicion", SUSPECT_CONFIRMED: "suspicion",
    DECLARED_DEAD: "failure", DEAD_HEARD: "failure", LEFT_HEARD: "failure",
    REFUTED: "refutation", REFUTE_SEEN: "refutation",
    INCARNATION: "incarnation", HEALTH: "health",
}

DEFAULT_MAX_BYTES = 64 * 1024
#: A record's fixed cost on top of its encoded fields (ring slot, bookkeeping).
RECORD_OVERHEAD = 16

# ---- wire limits (from_wire) ----------------------------------------------------------------

WIRE_VERSION = 1
#: Records one answer may carry: far above what a 64 KiB history holds (~400).
MAX_WIRE_RECORDS = 8192
MAX_WIRE_BYTES = 4 * 1024 * 1024
MAX_KIND = 32
MAX_DETAIL_ENTRIES = 16
MAX_DETAIL_KEY = 32
MAX_DETAIL_TEXT = 256
MAX_DETAIL_LIST = 32
MAX_HEALTH = 1 << 16
#: Integers in details stay exact in JSON and msgpack.
MAX_DETAIL_INT = 2**53


class HistoryDecodeError(ValueError):
    """An encoded history (a query answer) is malformed."""


@dataclass(frozen=True, slots=True)
class Record:
    """One membership event this node took part in.

    ``at`` is the core's time (``now``) in a live history and the answering agent's wall
    clock once decoded from the wire; ``health`` is our local-health score when it
    happened; ``member`` is whom it is about; ``by`` who did it (us, or the accuser)."""

    kind: str
    at: float
    member: str
    by: str
    health: int
    detail: Mapping[str, DetailValue] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.detail.get(key, default)

    def cost(self) -> int:
        """An upper bound on this record's msgpack size plus a fixed overhead: what
        it counts against the history's byte bound."""
        n = RECORD_OVERHEAD + 1 + 9 + 9 + _str_cost(self.kind) + _str_cost(self.member) \
            + _str_cost(self.by) + 3
        for k, v in self.detail.items():
            n += _str_cost(k) + _value_cost(v)
        return n

    def to_json(self) -> dict[str, Any]:
        """The structured log line's fields: ``event`` is the category (``probe``,
        ``suspicion``, ``failure``, ``refutation``, ``incarnation``, ``health``; never
        ``member``, the member-change contract), ``kind`` the record's kind."""
        doc: dict[str, Any] = {"event": CATEGORY.get(self.kind, "history"),
                               "kind": self.kind, "member": self.member, "by": self.by,
                               "health": self.health, "at": round(self.at, 6)}
        for k, v in self.detail.items():
            doc.setdefault(k, list(v) if isinstance(v, tuple) else v)
        return doc

    def describe(self) -> str:
        """One line for people, e.g. ``heard n2 suspect n4 (incarnation 3)``."""
        text = _TEXT.get(self.kind, self.kind).format(member=self.member, by=self.by)
        parts = []
        for k, v in self.detail.items():
            if isinstance(v, float):
                parts.append(f"{k} {v:.3f}")
            elif isinstance(v, tuple):
                parts.append(f"{k} {','.join(v) or '-'}")
            else:
                parts.append(f"{k} {v}")
        return f"{text} ({', '.join(parts)})" if parts else text


def _str_cost(s: str) -> int:
    # msgpack: a str header of at most 5 bytes; UTF-8 at most 4 bytes per character
    # (ASCII names, the usual case, cost their length: counted exactly).
    return 5 + (len(s) if s.isascii() else 4 * len(s))


def _value_cost(v: DetailValue) -> int:
    if isinstance(v, str):
        return _str_cost(v)
    if isinstance(v, tuple):
        return 5 + sum(_str_cost(x) for x in v)
    return 9


class MemberHistory:
    """The bounded history of one node (see the module docstring).

    ``record`` is called by the membership core; ``on_record`` (set by a shell) sees
    every record as it is made, e.g. to log it."""

    __slots__ = ("_records", "bytes", "clock", "evicted", "max_bytes", "on_record",
                 "owner", "recorded")

    def __init__(self, owner: str = "", max_bytes: int = DEFAULT_MAX_BYTES,
                 on_record: Callable[[Record], None] | None = None) -> None:
        if max_bytes < 1024:
            raise ValueError(f"a member history needs at least 1024 bytes, got {max_bytes}")
        self.owner = owner
        self.max_bytes = max_bytes
        self.on_record = on_record
        #: (record, its cost), oldest first.
        self._records: deque[tuple[Record, int]] = deque()
        #: The estimated bytes held (never above ``max_bytes``).
        self.bytes = 0
        #: Records dropped to stay within the bound, and made in all.
        self.evicted = 0
        self.recorded = 0
        #: The core's latest time seen (ticks, records): the time of a record made by a
        #: command that has no ``now`` of its own.
        self.clock = 0.0

    def __len__(self) -> int:
        return len(self._records)

    def record(self, kind: str, at: float, member: str, by: str, health: int,
               **detail: DetailValue) -> Record:
        rec = Record(kind, at, member, by, health, detail)
        cost = rec.cost()
        if at > self.clock:
            self.clock = at
        self.recorded += 1
        if cost <= self.max_bytes:
            records = self._records
            records.append((rec, cost))
            self.bytes += cost
            while self.bytes > self.max_bytes:
                _, c = records.popleft()
                self.bytes -= c
                self.evicted += 1
        else:
            self.evicted += 1
        if self.on_record is not None:
            self.on_record(rec)
        return rec

    def records(self) -> list[Record]:
        """Every record held, oldest first."""
        return [r for r, _ in self._records]

    def since(self, t: float) -> list[Record]:
        """The records at or after ``t`` (core time), oldest first."""
        return [r for r, _ in self._records if r.at >= t]

    def about(self, member: str, since: float = -math.inf, *,
              health: bool = False) -> list[Record]:
        """The records about ``member`` at or after ``since``, oldest first; with
        ``health``, our own local-health changes too (the context of our probes)."""
        return [r for r, _ in self._records if r.at >= since
                and (r.member == member or (health and r.kind == HEALTH))]


# ---- the wire ------------------------------------------------------------------------------


def to_wire(records: Iterable[Record], wall_offset: float = 0.0,
            evicted: int = 0) -> dict[str, Any]:
    """A msgpack- and JSON-friendly document of ``records`` with wall-clock times
    (core time + ``wall_offset``); ``evicted`` says how many older ones were dropped."""
    return {"v": WIRE_VERSION, "evicted": evicted,
            "records": [[r.kind, r.at + wall_offset, r.member, r.by, r.health,
                         {k: list(v) if isinstance(v, tuple) else v
                          for k, v in r.detail.items()}]
                        for r in records]}


def from_wire(data: object) -> list[Record]:
    """The records of a ``to_wire`` document (or its msgpack bytes), validated: only
    ``HistoryDecodeError`` is raised, for wrong types, sizes or counts. Times are the
    answering agent's wall clock. Unknown kinds pass (a newer agent may add some)."""
    return _decode(data)[0]


def wire_evicted(data: object) -> int:
    """How many records the answering agent had dropped from its history."""
    return _decode(data)[1]


def read_wire(data: object) -> tuple[list[Record], int]:
    """``from_wire`` and ``wire_evicted`` in one decode."""
    return _decode(data)


def _decode(data: object) -> tuple[list[Record], int]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > MAX_WIRE_BYTES:
            raise HistoryDecodeError(f"history of {len(data)} bytes exceeds {MAX_WIRE_BYTES}")
        try:
            data = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True,
                                   max_array_len=MAX_WIRE_RECORDS,
                                   max_map_len=MAX_DETAIL_ENTRIES + 8,
                                   max_str_len=MAX_DETAIL_TEXT * 4,
                                   max_bin_len=0, max_ext_len=0)
        except Exception as e:  # msgpack raises many types on junk
            raise HistoryDecodeError(f"not msgpack: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise HistoryDecodeError("a history is a map")
    if data.get("v") != WIRE_VERSION:
        raise HistoryDecodeError(f"unknown history version {data.get('v')!r}")
    evicted = data.get("evicted", 0)
    if type(evicted) is not int or not 0 <= evicted <= MAX_DETAIL_INT:
        raise HistoryDecodeError("evicted must be a non-negative integer")
    raw = data.get("records")
    if not isinstance(raw, list):
        raise HistoryDecodeError("records must be a list")
    if len(raw) > MAX_WIRE_RECORDS:
        raise HistoryDecodeError(f"{len(raw)} records; at most {MAX_WIRE_RECORDS}")
    return [_record(i, r) for i, r in enumerate(raw)], evicted


def _record(i: int, r: object) -> Record:
    if not isinstance(r, (list, tuple)) or len(r) != 6:
        raise HistoryDecodeError(f"record {i}: expected a list of 6 fields")
    kind, at, member, by, health, detail = r
    if not (type(kind) is str and 0 < len(kind) <= MAX_KIND and kind.isidentifier()):
        raise HistoryDecodeError(f"record {i}: bad kind")
    if type(at) not in (int, float) or not math.isfinite(at):
        raise HistoryDecodeError(f"record {i}: time must be a finite number")
    for what, name in (("member", member), ("by", by)):
        if not (type(name) is str and len(name) <= MAX_NAME and name.isprintable()):
            raise HistoryDecodeError(f"record {i}: bad {what}")
    if type(health) is not int or not 0 <= health <= MAX_HEALTH:
        raise HistoryDecodeError(f"record {i}: bad health score")
    if not isinstance(detail, dict) or len(detail) > MAX_DETAIL_ENTRIES:
        raise HistoryDecodeError(f"record {i}: detail must be a small map")
    out: dict[str, DetailValue] = {}
    for k, v in detail.items():
        if not (type(k) is str and 0 < len(k) <= MAX_DETAIL_KEY and k.isidentifier()):
            raise HistoryDecodeError(f"record {i}: bad detail key")
        out[k] = _detail_value(i, k, v)
    return Record(kind, float(at), member, by, health, out)


def _detail_value(i: int, k: str, v: object) -> DetailValue:
    t = type(v)
    if t is int:
        assert isinstance(v, int)
        if abs(v) <= MAX_DETAIL_INT:
            return v
    elif t is float:
        assert isinstance(v, float)
        if math.isfinite(v):
            return v
    elif t is str:
        assert isinstance(v, str)
        if len(v) <= MAX_DETAIL_TEXT and v.isprintable():
            return v
    elif t in (list, tuple):
        assert isinstance(v, (list, tuple))
        if len(v) <= MAX_DETAIL_LIST and all(
                type(x) is str and len(x) <= MAX_NAME and x.isprintable() for x in v):
            return tuple(v)
    raise HistoryDecodeError(f"record {i}: bad detail {k!r}")


__all__ = [
    "CATEGORY", "DEAD_HEARD", "DECLARED_DEAD", "DEFAULT_MAX_BYTES", "HEALTH", "INCARNATION",
    "KINDS",
    "LEFT_HEARD", "PROBE_DIRECT_FAILED", "PROBE_INDIRECT_FAILED", "PROBE_TCP_ONLY",
    "REFUTED", "REFUTE_SEEN", "SUSPECT_CONFIRMED", "SUSPECT_HEARD", "SUSPECT_RAISED",
    "HistoryDecodeError", "MemberHistory", "Record", "from_wire", "read_wire", "to_wire",
    "wire_evicted",
]
