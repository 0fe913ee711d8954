"""When the lab's delay line lets a packet go: the sans-IO core of ``delay_line``.

The kernel here has no netem, so the lab delays packets in user space: NFQUEUE hands
each packet's headers to the delay line, which holds the verdict until the packet's
release time. This module decides that time, from the packet's arrival (the shell's
clock, passed in), its flow key (source and destination address) and an injected
``random.Random``, with the simulator's own latency specs (``fixed:D``,
``uniform:LO:HI``, ``lognormal:MEDIAN:SIGMA``) so a lab run and a ``rumor sim`` run are
configured alike.

Also here, as pure functions: reading the addresses and protocol out of an IPv4 or
IPv6 header prefix, and the lateness histogram the shell reports.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from rumor.simulations.network import Latency, Uniform, parse_latency

#: The flow key of a packet whose header cannot be read: all such packets share one
#: FIFO line, so they are still delayed and never reordered among themselves. (No real
#: key is empty: a key is 8 or 32 bytes.)
DEFAULT_KEY = b""

IPPROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


def parse_delay_spec(text: str) -> Latency:
    """A latency spec, as ``rumor sim`` reads it, checked for use as a real delay.

    The simulator tolerates odd numbers (a negative ``uniform`` low end is clamped by
    the engine); a delay line must not hold a packet forever, so parameters must be
    finite and non-negative, and ``uniform`` must have LO <= HI.
    """
    latency = parse_latency(text)
    for name, value in latency.describe().items():
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"bad delay {text!r}: {name} must be a finite number >= 0")
    if isinstance(latency, Uniform) and latency.low > latency.high:
        raise ValueError(f"bad delay {text!r}: uniform needs LO <= HI")
    return latency


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """What the delay line reads of a packet: IP version, protocol, addresses."""

    version: int
    #: IPv4 protocol or IPv6 next header (extension headers are not followed).
    protocol: int
    #: 4 or 16 bytes each, network order.
    source: bytes
    destination: bytes

    @property
    def protocol_name(self) -> str:
        return IPPROTO_NAMES.get(self.protocol, str(self.protocol))


def parse_header(data: bytes | bytearray | memoryview) -> PacketHeader:
    """The IPv4 or IPv6 header at the start of ``data`` (a copy-range prefix is
    enough: 20 bytes for v4, 40 for v6). Anything else raises ValueError."""
    if len(data) < 1:
        raise ValueError("empty packet")
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20:
            raise ValueError(f"IPv4 header truncated: {len(data)} bytes, 20 needed")
        if (data[0] & 0x0F) < 5:
            raise ValueError(f"IPv4 header length {data[0] & 0x0F} words, at least 5 expected")
        return PacketHeader(4, data[9], bytes(data[12:16]), bytes(data[16:20]))
    if version == 6:
        if len(data) < 40:
            raise ValueError(f"IPv6 header truncated: {len(data)} bytes, 40 needed")
        return PacketHeader(6, data[6], bytes(data[8:24]), bytes(data[24:40]))
    raise ValueError(f"not an IP packet: version nibble {version}")


def flow_key(data: bytes | bytearray | memoryview) -> bytes:
    """Source and destination address of the packet (8 or 32 bytes), or DEFAULT_KEY if
    the header cannot be read.

    The pair, so the key means the same on either side of a link: queued on a host's
    egress, every packet has that host's source, and the key is in effect the
    destination; queued on its ingress, in effect the source. Either way one key is one
    (sender, receiver) path, the simulator's link. The same answer as
    ``source + destination`` of ``parse_header(data)`` (a property test holds them
    together), without building the header: this runs once per delayed packet."""
    n = len(data)
    if n >= 20 and data[0] >> 4 == 4 and data[0] & 0x0F >= 5:
        return bytes(data[12:20])
    if n >= 40 and data[0] >> 4 == 6:
        return bytes(data[8:40])
    return DEFAULT_KEY


class DelaySchedule:
    """Release times for one queue's packets.

    A packet arriving at ``arrival`` with flow key ``key`` (``flow_key``: its source
    and destination) is released at ``max(arrival + sample, last release for key)``:
    the packets of one path leave in arrival order, so TCP sees no reordering (netem's
    jitter reorders; a real link does not). What that does to the distribution: the
    delay a packet sees is ``D_n = max(d_n, D_{n-1} - gap_n)`` (``d_n`` its sample,
    ``gap_n`` the time since the previous packet on that path), never below its own
    sample. A ``fixed`` spec is unchanged. A spread spec (``uniform``, ``lognormal``)
    is shifted upwards once the gaps are shorter than the spread: a long draw holds the
    packets behind it (head-of-line, as on a real FIFO link), so at high rates
    ``uniform:LO:HI`` tends to HI (median 23.5 ms for ``uniform:0.015:0.025`` at 5,000
    packets/s) and ``lognormal`` to its tail. Sparse traffic (gossip probes) gets the
    spec as written. ``per_key`` overrides the spec for given flow keys (the
    simulator's per-link latency).
    """

    #: Above this many tracked paths, forget those that no longer constrain.
    PRUNE_AT = 4096

    def __init__(self, latency: Latency, rng: random.Random,
                 per_key: Mapping[bytes, Latency] | None = None) -> None:
        self.latency = latency
        self.rng = rng
        self.per_key = dict(per_key or {})
        self._last: dict[bytes, float] = {}

    def release(self, arrival: float, key: bytes) -> float:
        """The release time of a packet that arrived at ``arrival`` for ``key``."""
        latency = self.per_key.get(key, self.latency) if self.per_key else self.latency
        d = latency.sample(self.rng)
        if not d > 0.0:  # negative or NaN: no delay (never before arrival)
            d = 0.0
        t = arrival + d
        last = self._last.get(key)
        if last is not None and last > t:
            t = last
        elif len(self._last) >= self.PRUNE_AT and last is None:
            self._prune(arrival)
        self._last[key] = t
        return t

    def _prune(self, now: float) -> None:
        # An entry whose last release is past cannot delay a packet arriving now.
        for k in [k for k, v in self._last.items() if v <= now]:
            del self._last[k]

    @property
    def paths(self) -> int:
        return len(self._last)


class LatenessHistogram:
    """Histogram of non-negative durations (seconds) in constant memory, O(1) add, so
    the delay line can record every release at line rate: 1 µs buckets up to
    ``LINEAR_US`` (16 ms), then buckets 2 % wide. A quantile is its bucket's middle
    (never above the exact ``max``)."""

    LINEAR_US = 16384
    GROWTH = 1.02

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self._log_growth = math.log(self.GROWTH)
        self.count = 0
        self.max = 0.0
        self.total = 0.0

    def add(self, value: float) -> None:
        if not value > 0.0:
            value = 0.0
        i = int(value * 1e6)
        if i >= self.LINEAR_US:
            i = self.LINEAR_US + int(math.log(value * 1e6 / self.LINEAR_US)
                                     / self._log_growth)
        b = self._buckets
        b[i] = b.get(i, 0) + 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value

    def _value(self, i: int) -> float:
        if i < self.LINEAR_US:
            return (i + 0.5) * 1e-6
        k = i - self.LINEAR_US  # [L·g^k, L·g^(k+1)) µs
        return float(self.LINEAR_US * self.GROWTH ** (k + 0.5) * 1e-6)

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1), 0.0 when empty; never above ``max``."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} outside [0, 1]")
        if self.count == 0:
            return 0.0
        rank = q * (self.count - 1)
        seen = 0
        for i in sorted(self._buckets):
            seen += self._buckets[i]
            if seen > rank:
                return min(self._value(i), self.max)
        return self.max

    def summary(self) -> dict[str, float | int]:
        return {"count": self.count, "p50": self.quantile(0.5), "p99": self.quantile(0.99),
                "max": self.max, "mean": self.total / self.count if self.count else 0.0}
