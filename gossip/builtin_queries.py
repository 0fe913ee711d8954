"""The queries every agent answers: ``ping``, ``stats`` and ``explain`` (answers are
msgpack maps).

``ping`` says who answers and what it runs: name, release, gossip protocol, uptime.
``stats`` is the agent's gossip counters, its Lifeguard health score, its member
counts, and the round-trip times its probes measured to each peer (smoothed and last,
in milliseconds) — the data a later network-coordinate comparison needs, gathered from
every agent by one query. ``explain`` is the agent's history about one member
(``history.py``, in wall-clock time) since a wall-clock instant: what ``rumor explain``
merges into the story of a suspicion. It is guarded (the API token where one is set):
it shows who probed whom and when.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from .fields import MAX_NAME
from .history import to_wire
from .membership import Membership
from .query import Queries, QueryError, Request
from .wire import PROTOCOL_VERSION, Status

#: Peers whose RTTs one ``stats`` answer carries (the nearest first).
MAX_RTTS = 2048


def register_builtins(queries: Queries, core: Membership, release: str) -> None:
    """Register ``ping`` and ``stats`` on ``queries``."""

    def ping(r: Request) -> bytes:
        return _pack({"name": core.name, "version": release, "protocol": PROTOCOL_VERSION,
                      "uptime": round(r.now - queries.started, 3)})

    def stats(r: Request) -> bytes:
        if r.payload:
            raise QueryError("stats takes no payload")
        rtts = sorted(((m.rtt, name, m.rtt_last) for name, m in core.members.items()
                       if m.rtt is not None and name != core.name), key=lambda t: t[0])
        counts: dict[str, int] = {}
        for m in core.members.values():
            s = Status.NAMES.get(m.status, str(m.status))
            counts[s] = counts.get(s, 0) + 1
        return _pack({
            "name": core.name, "uptime": round(r.now - queries.started, 3),
            "health_score": core.awareness.score, "members": counts,
            "incarnation": core.incarnation,
            "gossip": dict(core.stats), "queries": dict(queries.stats),
            "rtt_ms": {name: [round(rtt * 1000, 3),
                              round((last or rtt) * 1000, 3)]
                       for rtt, name, last in rtts[:MAX_RTTS]},
        })

    def explain(r: Request) -> bytes:
        member, since_wall = explain_request(r.payload)
        since = since_wall - queries.wall_offset  # to this core's clock
        history = core.history
        return _pack(to_wire(history.about(member, since, health=True),
                             queries.wall_offset, history.evicted))

    queries.register("ping", ping)
    queries.register("stats", stats)
    queries.register("explain", explain, guarded=True)


def explain_payload(member: str, since_wall: float) -> bytes:
    """The ``explain`` query's payload: the member, and the wall-clock time from which
    records are wanted."""
    return _pack_any([member, float(since_wall)])


def explain_request(payload: bytes) -> tuple[str, float]:
    """The member and start time an ``explain`` payload asks for; ``QueryError`` if
    it is not one."""
    try:
        doc = msgpack.unpackb(payload, raw=False, max_array_len=2, max_map_len=0,
                              max_str_len=MAX_NAME * 4, max_bin_len=0, max_ext_len=0)
    except Exception:  # msgpack raises many types on junk
        raise QueryError("explain takes [member, since] as msgpack") from None
    if not (isinstance(doc, list) and len(doc) == 2 and isinstance(doc[0], str)
            and doc[0] and type(doc[1]) in (int, float) and math.isfinite(doc[1])):
        raise QueryError("explain takes [member, since] as msgpack")
    return doc[0], float(doc[1])


def _pack(doc: dict[str, Any]) -> bytes:
    return _pack_any(doc)


def _pack_any(doc: object) -> bytes:
    data: bytes = msgpack.packb(doc)
    return data


__all__ = ["explain_payload", "explain_request", "register_builtins"]
