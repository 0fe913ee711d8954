"""Following application messages through a dissemination trace (``gossip/trace.py``).

The same analysis reads a real cluster's trace files and a simulated run's events, so
the two can be compared message by message: for one message (a registration's
records, say), which node sent it first, how many copies were sent to and received by
each node, and when each first got one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: One trace event: (time, node, direction, peer, digests).
Event = tuple[float, str, str, str, list[str]]


@dataclass(slots=True)
class Spread:
    """One message's journey: its first sender and every copy."""

    digest: str
    origin: str
    start: float
    #: node -> times it received a copy (datagram or stream), in order.
    received: dict[str, list[float]] = field(default_factory=dict)
    #: node -> copies sent to it (by datagram), whether they arrived or not.
    sent_to: Counter[str] = field(default_factory=Counter)

    def copies(self, node: str) -> int:
        return len(self.received.get(node, ()))

    def first(self, node: str) -> float | None:
        times = self.received.get(node)
        return times[0] if times else None


def follow(events: Iterable[Event]) -> dict[str, Spread]:
    """Every message's spread, from events in any order (they are sorted by time)."""
    spreads: dict[str, Spread] = {}
    for t, node, direction, peer, digests in sorted(events, key=lambda e: e[0]):
        for d in digests:
            s = spreads.get(d)
            if s is None:
                if direction != "out":
                    continue  # sent before the trace began
                s = spreads[d] = Spread(d, node, t)
            if direction == "out":
                s.sent_to[peer] += 1
            elif direction in ("in", "in-stream"):
                s.received.setdefault(node, []).append(t)
    return spreads


def read_trace_files(paths: Iterable[Path]) -> Iterator[Event]:
    """Events from the JSON lines ``rumor agent --trace-gossip`` writes."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a line cut short when the agent stopped
                yield (e["t"], e["node"], e["dir"], e["peer"], e["msgs"])


def first_sent_after(spreads: dict[str, Spread], origin: str, t0: float) -> Spread | None:
    """The first message ``origin`` sent at or after ``t0`` (a registration's own)."""
    mine = [s for s in spreads.values() if s.origin == origin and s.start >= t0]
    return min(mine, key=lambda s: s.start) if mine else None


def copy_profile(spread: Spread, nodes: Iterable[str]) -> dict[str, Any]:
    """How evenly one message's copies reached ``nodes`` (the origin left out)."""
    others = [n for n in nodes if n != spread.origin]
    got = sorted(spread.copies(n) for n in others)
    least = min(others, key=lambda n: (spread.copies(n), n)) if others else ""
    return {"min_copies": got[0] if got else 0,
            "median_copies": got[len(got) // 2] if got else 0,
            "nodes_without_copy": sum(1 for c in got if c == 0),
            "least_served": least,
            "sent_to_least_served": spread.sent_to.get(least, 0),
            "copies_sent": sum(spread.sent_to.values())}
