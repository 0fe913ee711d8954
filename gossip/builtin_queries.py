"""The queries every agent answers: ``ping`` and ``stats`` (answers are msgpack maps).

``ping`` says who answers and what it runs: name, release, gossip protocol, uptime.
``stats`` is the agent's gossip counters, its Lifeguard health score, its member
counts, and the round-trip times its probes measured to each peer (smoothed and last,
in milliseconds) — the data a later network-coordinate comparison needs, gathered from
every agent by one query.
"""

from __future__ import annotations

from typing import Any

import msgpack

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

    queries.register("ping", ping)
    queries.register("stats", stats)


def _pack(doc: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(doc)
    return data


__all__ = ["register_builtins"]
