"""The simulated network: per-link latency, loss and partitions, and TCP under loss.

Everything here is a pure function of the simulator's ``random.Random``, so a run
replays from its seed. Nodes are small integers (their index in the simulator);
addresses only matter to the cores.

TCP under loss (``tcp_handshake``, ``tcp_transfer``, ``tcp_refusal``). Stream
exchanges (push-pull, large messages, TCP fallback pings) over a lossy network are
not the reliable request/reply they are on a clean one: a lost SYN costs a second, a
lost segment a retransmission timeout, and that is what makes a TCP ping miss its
probe's deadline or a push-pull time out on a bad link. The engine uses this model
for every exchange while any loss is configured (``Network.reliable_streams`` turns
it off: the old reliable exchanges with latency only). Each direction's loss rate is
the one datagrams see on that link (``link_loss``, else ``loss``). What is modelled,
after Linux's defaults:

* *Handshake.* The SYN is lost with the forward loss rate and retransmitted by the
  client 1 s, then 2 s, 4 s, ... later (initial RTO 1 s, ``tcp_syn_retries`` 6:
  ``connect`` gives up 127 s after the first SYN). Once a SYN arrived, the server's
  SYN-ACK is lost with the backward rate and retransmitted on the server's own timer
  (1 s, 2 s, ...; ``tcp_synack_retries`` 5). The two phases add: ``(2^k1 - 1) +
  (2^k2 - 1)`` seconds for k1 lost SYNs and k2 lost SYN-ACKs. Not modelled: the
  SYN-ACK a retransmitted SYN triggers (a second chance at about the same moment as
  the server's timer, so the model is slightly pessimistic when a SYN-ACK was lost).
  The handshake's last ACK is not modelled either: the first data segment carries it.
* *Data.* Request and reply are each cut into segments of MSS 1448 bytes (the
  frame, header included), each lost with the rate of its direction. A lost segment
  is repaired by a retransmission timeout, ``RTO = srtt + max(200 ms, 4 rttvar)`` with
  Linux's first estimate from the handshake (srtt = RTT, rttvar = RTT/2), so about
  200 ms + RTT on a LAN, doubling for each further loss of the same segment; a
  segment followed by at least 3 more of the same message is fast-retransmitted one
  RTT after its loss instead (3 duplicate ACKs; its own later losses then cost RTOs).
  Segments recover in parallel (SACK): the message is late by its worst segment's
  repair, not the sum. ``tcp_retries2`` (15) lost copies of one segment abort the
  connection.
* *ACKs* are not lost in the model: a lost pure ACK is covered by the next one (they
  are cumulative), and the request's last ACK is the reply itself.
* *Refusals.* A SYN to a crashed node's address is answered by a RST; SYN and RST are
  each lost with their direction's rate and the client retries on its SYN schedule.

Not modelled: congestion control and slow start (a message leaves in one flight
whatever its size, as on a clean network here), bandwidth and queueing, delayed
ACKs, Linux's RACK and tail-loss probes (they repair a lost tail segment of a
multi-segment message in about two RTTs, where the model waits for the RTO),
per-segment latency jitter (one sample per direction per exchange), and the end of
retransmissions when the caller gives up (counted retransmissions are those the
schedule holds; SYNs only until the caller's deadline).
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
    #: Stream exchanges ignore loss (reliable request/reply with latency), as before
    #: the TCP model; by default they go through it whenever some loss is configured.
    reliable_streams: bool = False

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

    def loss_rate(self, src: int, dst: int) -> float:
        """The loss rate of the link from ``src`` to ``dst``."""
        return self.link_loss.get((src, dst), self.loss) if self.link_loss else self.loss

    def tcp_streams(self) -> bool:
        """Whether stream exchanges go through the TCP model (some loss, not off)."""
        return not self.reliable_streams and (self.loss > 0.0 or bool(self.link_loss))

    def delay(self, rng: random.Random, src: int, dst: int) -> float:
        if self.link_latency:
            lat = self.link_latency.get((src, dst))
            if lat is not None:
                return lat.sample(rng)
        return self.latency.sample(rng)

    def describe(self) -> dict[str, object]:
        return {"latency": self.latency.describe(), "loss": self.loss,
                "lossy_links": len(self.link_loss)}


# ---- TCP under loss ---------------------------------------------------------------------

#: Linux's defaults (``net.ipv4``): the SYN's initial RTO, ``tcp_syn_retries``,
#: ``tcp_synack_retries``, the floor of the data RTO (``TCP_RTO_MIN``),
#: ``tcp_retries2``, the duplicate-ACK threshold and the MSS of a 1500-byte MTU path
#: with timestamps.
SYN_RTO = 1.0
SYN_RETRIES = 6
SYNACK_RETRIES = 5
RTO_MIN = 0.2
DATA_RETRIES = 15
DUPTHRESH = 3
MSS = 1448
#: ``connect`` reports ETIMEDOUT this long after the first SYN (1+2+...+64 s).
CONNECT_GIVES_UP = SYN_RTO * (2 ** (SYN_RETRIES + 1) - 1)


def _losses(rng: random.Random, p: float, limit: int) -> int:
    """Copies of one packet lost before one gets through, at most ``limit + 1``
    (``limit + 1``: every allowed copy was lost). No draw at all when ``p`` is 0, so
    a loss-free link replays exactly as the reliable model."""
    k = 0
    if p > 0.0:
        while k <= limit and rng.random() < p:
            k += 1
    return k


def backoff_sum(k: int, first: float) -> float:
    """Time from the first copy to copy ``k + 1`` when the timer starts at ``first``
    and doubles: ``first * (2^k - 1)``."""
    return first * ((1 << k) - 1)


def data_rto(rtt: float) -> float:
    """Linux's RTO after its first RTT sample: srtt + max(rttvar floor, 4 * rtt/2)."""
    return rtt + max(RTO_MIN, 2.0 * rtt)


@dataclass(frozen=True, slots=True)
class TcpPhase:
    """What loss added to one phase of an exchange: ``extra`` seconds beyond the
    loss-free schedule (None: the phase never completes) and the retransmissions."""

    extra: float | None
    retransmits: int


def tcp_handshake(rng: random.Random, p_fwd: float, p_back: float,
                  budget: float = math.inf) -> TcpPhase:
    """SYN (lost with ``p_fwd``) then SYN-ACK (``p_back``), each retransmitted on its
    own sender's doubling timer from 1 s. ``budget``: the caller's time left; SYNs
    after it are not counted as sent (the caller closed the socket)."""
    k1 = _losses(rng, p_fwd, SYN_RETRIES)
    syns = sum(1 for j in range(1, min(k1, SYN_RETRIES) + 1)
               if backoff_sum(j, SYN_RTO) < budget)
    if k1 > SYN_RETRIES:
        return TcpPhase(None, syns)
    k2 = _losses(rng, p_back, SYNACK_RETRIES)
    if k2 > SYNACK_RETRIES:
        return TcpPhase(None, syns + SYNACK_RETRIES)
    return TcpPhase(backoff_sum(k1, SYN_RTO) + backoff_sum(k2, SYN_RTO), syns + k2)


def tcp_refusal(rng: random.Random, p_fwd: float, p_back: float) -> TcpPhase:
    """A SYN to a closed port: each attempt on the client's SYN schedule is answered
    by a RST; the attempt counts if both the SYN and the RST get through."""
    k = 0
    if p_fwd > 0.0 or p_back > 0.0:
        while k <= SYN_RETRIES and (rng.random() < p_fwd or rng.random() < p_back):
            k += 1
    if k > SYN_RETRIES:
        return TcpPhase(None, SYN_RETRIES)
    return TcpPhase(backoff_sum(k, SYN_RTO), k)


def tcp_transfer(rng: random.Random, nbytes: int, p: float, rtt: float) -> TcpPhase:
    """One message of ``nbytes`` (at least one segment: an empty one is its FIN)
    over a link losing ``p``; ``rtt`` sets the RTO and the fast-retransmit delay.

    The first lost segment is found with a geometric skip (one draw per loss, not
    per segment), so a megabyte push-pull costs a few draws, not 700."""
    if p <= 0.0:
        return TcpPhase(0.0, 0)
    n = max(1, -(-nbytes // MSS))
    rto = data_rto(rtt)
    worst = 0.0
    sent = 0
    i = -1
    log_keep = math.log1p(-p) if p < 1.0 else -math.inf
    while True:
        # Segments delivered before the next loss: geometric with parameter p.
        if log_keep == -math.inf:
            i += 1
        else:
            u = rng.random()
            skip = math.log1p(-u) / log_keep
            # A vanishing p (a denormal draw) makes the skip overflow: no more losses.
            i = n if skip >= n else i + 1 + int(skip)
        if i >= n:
            break
        # Segment i was lost once; further copies of it may be lost too.
        k = 1 + _losses(rng, p, DATA_RETRIES - 1)
        sent += min(k, DATA_RETRIES)
        if k > DATA_RETRIES:
            return TcpPhase(None, sent)
        # Enough segments behind it for 3 duplicate ACKs: fast retransmit, else RTO.
        fast = n - 1 - i >= DUPTHRESH
        cost = rtt + backoff_sum(k - 1, rto) if fast else backoff_sum(k, rto)
        if cost > worst:
            worst = cost
    return TcpPhase(worst, sent)
