"""The simulated network: per-link latency, loss and partitions.

Everything here is a pure function of the simulator's ``random.Random``, so a run
replays from its seed. Nodes are small integers (their index in the simulator);
addresses only matter to the cores.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


class Latency:
    """One-way delay of a datagram, in seconds."""

    def sample(self, rng: random.Random) -> float:
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Fixed(Latency):
    delay: float

    def sample(self, rng: random.Random) -> float:
        return self.delay

    def describe(self) -> dict[str, object]:
        return {"kind": "fixed", "delay": self.delay}


@dataclass(frozen=True, slots=True)
class Uniform(Latency):
    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)

    def describe(self) -> dict[str, object]:
        return {"kind": "uniform", "low": self.low, "high": self.high}


@dataclass(frozen=True, slots=True)
class LogNormal(Latency):
    """Log-normal around ``median`` (a long right tail, like real RTTs), never below
    ``floor`` and capped at ``cap`` so one draw cannot stall a run."""

    median: float
    sigma: float
    floor: float = 0.0
    cap: float = 5.0

    def sample(self, rng: random.Random) -> float:
        d = self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        return min(max(d, self.floor), self.cap)

    def describe(self) -> dict[str, object]:
        return {"kind": "lognormal", "median": self.median, "sigma": self.sigma,
                "floor": self.floor, "cap": self.cap}


def parse_latency(text: str) -> Latency:
    """``fixed:0.001``, ``uniform:0.001:0.005``, ``lognormal:0.0005:0.5`` (seconds)."""
    kind, *nums = text.split(":")
    try:
        vals = [float(x) for x in nums]
    except ValueError:
        raise ValueError(f"bad latency {text!r}: numbers expected after the kind") from None
    if kind == "fixed" and len(vals) == 1:
        return Fixed(vals[0])
    if kind == "uniform" and len(vals) == 2:
        return Uniform(vals[0], vals[1])
    if kind == "lognormal" and len(vals) == 2:
        return LogNormal(vals[0], vals[1])
    raise ValueError(f"bad latency {text!r}: expected fixed:D, uniform:LO:HI or "
                     "lognormal:MEDIAN:SIGMA")


#: Network defaults that go with each gossip profile.
PROFILE_LATENCY: dict[str, Latency] = {
    "lan": LogNormal(0.0005, 0.5, floor=0.0001),
    "wan": LogNormal(0.05, 0.5, floor=0.005),
    "local": Fixed(0.0001),
}


@dataclass(slots=True)
class Partition:
    """Datagrams and streams from ``a`` to ``b`` are black-holed (and from ``b`` to
    ``a`` too if ``symmetric``). ``b`` empty means "everyone not in ``a``"."""

    a: frozenset[int]
    b: frozenset[int] = frozenset()
    symmetric: bool = True

    def _in_b(self, x: int) -> bool:
        return x in self.b if self.b else x not in self.a

    def blocks(self, src: int, dst: int) -> bool:
        if src in self.a and self._in_b(dst):
            return True
        return self.symmetric and dst in self.a and self._in_b(src)


@dataclass(slots=True)
class Network:
    """Latency, loss and partitions between node indices."""

    latency: Latency
    #: Probability that any datagram is lost.
    loss: float = 0.0
    #: Extra per-link loss, (src, dst) -> probability (replaces ``loss`` on that link).
    link_loss: dict[tuple[int, int], float] = field(default_factory=dict)
    #: Per-link latency overrides.
    link_latency: dict[tuple[int, int], Latency] = field(default_factory=dict)
    partitions: list[Partition] = field(default_factory=list)

    def blocked(self, src: int, dst: int) -> bool:
        return any(p.blocks(src, dst) for p in self.partitions)

    def datagram(self, rng: random.Random, src: int, dst: int) -> float | None:
        """Delay of a datagram from ``src`` to ``dst``, or None if it is lost."""
        if self.partitions and self.blocked(src, dst):
            return None
        loss = self.link_loss.get((src, dst), self.loss) if self.link_loss else self.loss
        if loss > 0.0 and rng.random() < loss:
            return None
        return self.delay(rng, src, dst)

    def delay(self, rng: random.Random, src: int, dst: int) -> float:
        if self.link_latency:
            lat = self.link_latency.get((src, dst))
            if lat is not None:
                return lat.sample(rng)
        return self.latency.sample(rng)

    def describe(self) -> dict[str, object]:
        return {"latency": self.latency.describe(), "loss": self.loss,
                "lossy_links": len(self.link_loss)}
