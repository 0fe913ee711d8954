"""What the scenarios measure, fed by the member events the cores emit.

The listener sees every ``MemberEvent`` of every node, so it must stay O(1) per event:
at 10,000 nodes a converge run emits 10^8 of them. Per-subject tracks keep counts and
threshold times; full per-observer time lists only for the subjects we plot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..gossip.effects import MemberEvent
from ..gossip.wire import Status
from .engine import Simulator

FRACTIONS = (0.5, 0.99, 1.0)


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, min, mean, p50, p90, p99, max of ``values`` (None when empty)."""
    xs = sorted(values)
    if not xs:
        return {"count": 0, "min": None, "mean": None, "p50": None, "p90": None,
                "p99": None, "max": None}

    def pct(q: float) -> float:
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]

    return {"count": len(xs), "min": _r(xs[0]), "mean": _r(sum(xs) / len(xs)),
            "p50": _r(pct(0.5)), "p90": _r(pct(0.9)), "p99": _r(pct(0.99)),
            "max": _r(xs[-1])}


def _r(x: float) -> float:
    return round(x, 6)


@dataclass(slots=True)
class Spread:
    """How news about one subject reached the observers.

    ``need`` observers must learn it; ``times`` (relative to ``start``) are kept only
    when ``keep_times``, otherwise just the 50/99/100% crossing times."""

    start: float
    need: int
    keep_times: bool = False
    count: int = 0
    first: float | None = None
    crossings: dict[float, float] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    #: Observers counted so far; None when the events themselves come once per
    #: observer (a "join" is emitted only for a member new to it), which saves 10^8
    #: set entries in a 10,000-node converge.
    seen: set[int] | None = field(default_factory=set)

    def learn(self, now: float, observer: int) -> bool:
        """Count ``observer`` once; True when this made the news reach everyone."""
        if self.seen is not None:
            if observer in self.seen:
                return False
            self.seen.add(observer)
        self.count += 1
        dt = now - self.start
        if self.first is None:
            self.first = dt
        if self.keep_times:
            self.times.append(dt)
        for f in FRACTIONS:
            if f not in self.crossings and self.count >= math.ceil(f * self.need):
                self.crossings[f] = dt
        return self.count == self.need

    def at(self, fraction: float) -> float | None:
        return self.crossings.get(fraction)


class Recorder:
    """Listens to every member event of a simulator and keeps the scenario figures."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        sim.on_member = self.on_member
        #: Crash tracking: subject -> (first suspicion, failure knowledge spread).
        self.crash_suspect: dict[int, Spread] = {}
        self.crash_failed: dict[int, Spread] = {}
        #: Join tracking (converge, churn): subject -> spread of its "join" events.
        self.joins: dict[int, Spread] = {}
        self.join_keep = 0  # how many join subjects keep full time lists (plots)
        self.joins_complete = 0
        #: Nodes that ever crashed (failures about them are not false positives).
        self.ever_crashed: set[int] = set()
        #: Nodes the scenario made slow (paused); reported apart from healthy ones.
        self.slow: set[int] = set()
        self.false_failed_healthy = 0
        self.false_failed_slow = 0
        self.false_suspect_healthy = 0
        self.false_suspect_slow = 0
        #: (time, observer, subject) of false failures of healthy nodes (capped).
        self.false_examples: list[tuple[float, str, str]] = []
        self.window_start: float | None = None

    # ---- ground truth from the scenario ---------------------------------------------------

    def crashed(self, idx: int) -> None:
        """Call when ``idx`` crashes: every node up now should learn of it."""
        self.ever_crashed.add(idx)
        need = sum(1 for n in self.sim.nodes if n.up and n.idx != idx)
        now = self.sim.now
        self.crash_suspect[idx] = Spread(now, need)
        self.crash_failed[idx] = Spread(now, need, keep_times=True)

    def track_join(self, idx: int, need: int, rejoin: bool = False,
                   plot: bool = True) -> None:
        """Follow the news of ``idx`` joining; a ``rejoin`` (restart under a known
        name) is learnt through "alive" events too, so it counts observers in a set.
        The first ``join_keep`` subjects with ``plot`` keep their curve."""
        keep = plot and self.join_keep > 0
        if keep:
            self.join_keep -= 1
        self.joins[idx] = Spread(self.sim.now, need, keep_times=keep,
                                 seen=set() if rejoin else None)

    # ---- the listener --------------------------------------------------------------------

    def on_member(self, now: float, observer: int, ev: MemberEvent) -> None:
        kind = ev.kind
        if kind == "update" or kind == "reap":
            return
        subject = self.sim.by_name.get(ev.name, -1)
        if kind == "join" or kind == "alive":
            sp = self.joins.get(subject)
            if sp is not None and (kind == "join" or sp.seen is not None) \
                    and sp.learn(now, observer):
                self.joins_complete += 1
            return
        if ev.status == Status.DEAD or ev.status == Status.SUSPECT:
            sp = self.crash_failed.get(subject) if ev.status == Status.DEAD else \
                self.crash_suspect.get(subject)
            if sp is not None and not self.sim.nodes[subject].up:
                sp.learn(now, observer)
                if ev.status == Status.DEAD:
                    # Knowing of the failure implies having heard of it.
                    self.crash_suspect[subject].learn(now, observer)
                return
            if subject in self.ever_crashed or subject < 0:
                return
            slow = subject in self.slow
            if ev.status == Status.DEAD:
                if slow:
                    self.false_failed_slow += 1
                else:
                    self.false_failed_healthy += 1
                if not slow and len(self.false_examples) < 20:
                    self.false_examples.append(
                        (round(now, 3), self.sim.nodes[observer].name, ev.name))
            elif slow:
                self.false_suspect_slow += 1
            else:
                self.false_suspect_healthy += 1

    # ---- reports ---------------------------------------------------------------------------

    def detection(self) -> dict[str, Any]:
        first_sus = [s.first for s in self.crash_suspect.values() if s.first is not None]
        first_fail = [s.first for s in self.crash_failed.values() if s.first is not None]
        out: dict[str, Any] = {
            "crashed": len(self.crash_failed),
            "first_suspicion_s": summarize(first_sus),
            "first_failure_s": summarize(first_fail),
        }
        for f in FRACTIONS:
            vals = [s.at(f) for s in self.crash_failed.values()]
            out[f"all_know_{_pct(f)}_s"] = summarize(v for v in vals if v is not None)
        for f in FRACTIONS:
            vals = [s.at(f) for s in self.crash_suspect.values()]
            out[f"suspect_{_pct(f)}_s"] = summarize(v for v in vals if v is not None)
        # How fast the first accusation spread: SWIM's O(log n) dissemination.
        spreads = [(s.first, s.at(1.0)) for s in self.crash_suspect.values()]
        out["suspicion_spread_s"] = summarize(
            b - a for a, b in spreads if a is not None and b is not None)
        out["undetected"] = sum(1 for s in self.crash_failed.values() if s.at(1.0) is None)
        per_observer = [t for s in self.crash_failed.values() for t in s.times]
        out["per_observer_failure_s"] = summarize(per_observer)
        return out

    def dissemination(self, spreads: Sequence[Spread]) -> dict[str, Any]:
        out: dict[str, Any] = {"subjects": len(spreads)}
        for f in FRACTIONS:
            vals = [s.at(f) for s in spreads]
            out[f"to_{_pct(f)}_s"] = summarize(v for v in vals if v is not None)
        out["incomplete"] = sum(1 for s in spreads if s.at(1.0) is None)
        return out

    def false_positives(self) -> dict[str, Any]:
        return {"failed_healthy": self.false_failed_healthy,
                "failed_slow": self.false_failed_slow,
                "suspect_healthy": self.false_suspect_healthy,
                "suspect_slow": self.false_suspect_slow,
                "examples": [list(e) for e in self.false_examples]}

    def curves(self, points: int = 50) -> dict[str, Any]:
        """Infection curves (fraction of observers that know vs seconds) for plots."""
        def curve(sp: Spread) -> list[list[float]]:
            ts = sorted(sp.times)
            if not ts or sp.need <= 0:
                return []
            step = max(1, len(ts) // points)
            return [[_r(t), _r((i + 1) / sp.need)] for i, t in enumerate(ts)
                    if i % step == 0 or i == len(ts) - 1]
        return {"failure": {self.sim.nodes[k].name: curve(v)
                            for k, v in list(self.crash_failed.items())[:10]},
                "join": {self.sim.nodes[k].name: curve(v)
                         for k, v in self.joins.items() if v.keep_times}}


def _pct(f: float) -> str:
    return f"{round(f * 100):d}pct"


class Traffic:
    """Datagrams and bytes per node per second over a measurement window."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.t0 = sim.now
        self.base = self._snapshot()

    def _snapshot(self) -> list[tuple[int, int, int, int]]:
        return [(n.packets_out, n.bytes_out, n.streams_out, n.stream_bytes_out)
                for n in self.sim.nodes]

    def report(self) -> dict[str, Any]:
        dt = self.sim.now - self.t0
        now = self._snapshot()
        live = [n.idx for n in self.sim.nodes if n.up]
        if dt <= 0 or not live:
            return {}
        def rate(col: int) -> list[float]:
            base = self.base
            return [(now[i][col] - (base[i][col] if i < len(base) else 0)) / dt
                    for i in live]
        pk, by, st, sb = rate(0), rate(1), rate(2), rate(3)
        return {
            "window_s": _r(dt),
            "packets_per_node_per_s": _r(sum(pk) / len(pk)),
            "packets_per_node_per_s_max": _r(max(pk)),
            "bytes_per_node_per_s": _r(sum(by) / len(by)),
            "bytes_per_node_per_s_max": _r(max(by)),
            "streams_per_node_per_s": _r(sum(st) / len(st)),
            "stream_bytes_per_node_per_s": _r(sum(sb) / len(sb)),
        }
