"""The peak-EWMA latency estimate, and why ``peak_ewma`` balances as it does.

``balancers.PeakEwmaBalancer`` (the default balancer) keeps one ``PeakEwma`` per
endpoint and compares pairs of them as this docstring explains: power of two choices
over peak-EWMA latency × outstanding requests.

This is the balancer of Finagle and Linkerd ("p2c + peak EWMA"). Each endpoint keeps
a latency estimate that jumps to a slower observation at once and creeps back down
only as fast observations accumulate. Its *cost* is that estimate times
(outstanding requests + 1), so a fast endpoint that is already busy stops looking
fast. A pick samples two distinct candidates at random and takes the cheaper one:
O(1) per request, no global sort, and no herd onto a single "best" endpoint, since
every other endpoint wins some comparisons. A slow endpoint loses almost every
comparison it takes part in. An endpoint that is only a bit slower loses only while
it is also busier.

The code is sans-IO: time is always an argument (``now``, seconds on any monotonic
clock), randomness comes from an injected ``random.Random``, so simulations and
tests replay exactly.

Where this differs from Finagle and tower, and why:

* Reading a cost does not change any state. Finagle and tower decay the estimate on
  each read by feeding it an observation of 0, so an endpoint's estimate depends on
  how often the balancer happened to look at it. Here a read computes
  ``estimate × exp(-age / decay)`` (age = time since the last observation) and
  stores nothing. The effect the decay is there for stays the same: an endpoint that
  was slow, and so gets no traffic and no new observations, looks cheaper and
  cheaper until it gets a request again. It is retried now and then, never starved
  forever.
* The first real observation replaces the cold-start estimate outright. The seed
  is the gossip probe RTT to the endpoint's host: a guess about the network that
  leaves out the service's own time, not a sample of the same quantity.
* An endpoint not measured yet is assumed to be no slower than a rival that has
  been measured. Its seed can make it look faster, never slower, and with no seed
  it is taken to be as fast as the rival. A seed is only a lower bound on what a
  request will see, and the alternatives starve new endpoints. A constant penalty
  for the unknown (Finagle uses 1 s when it has no estimate but requests are
  pending) keeps a new instance out for decay × ln(penalty / latency) seconds,
  about a minute on a LAN. That includes an instance on the local node, which has
  no probe RTT. A seed that happens to be above the rivals' measured latency would
  keep one out forever, since a seed doesn't decay. With this rule the outstanding
  counts decide instead: the unmeasured endpoint wins a tie while it is idle and
  loses once it has a request in flight that its rival doesn't. So it gets about
  one request at a time until its first answer measures it. Between two unmeasured
  endpoints the seeds decide, so a cold start prefers the nearer hosts.
* A failed request counts as at least ``failure_penalty`` (1 s) of latency. A fast
  failure such as a 503 or a refused connection must make an endpoint look worse,
  not better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Time constant of the decay, seconds (Linkerd's default). An observation's
#: weight, and a slow estimate read without new observations, fall to 1/e per decay.
DEFAULT_DECAY = 10.0
#: The latency a failed request counts as, at least.
FAILURE_PENALTY = 1.0
#: Smallest estimate used in a cost: with an estimate of 0 the outstanding count
#: would stop mattering, and every request would go to one endpoint.
MIN_ESTIMATE = 1e-6

__all__ = ["DEFAULT_DECAY", "FAILURE_PENALTY", "MIN_ESTIMATE", "PeakEwma"]


@dataclass(slots=True)
class PeakEwma:
    """One endpoint's latency estimate (seconds) and outstanding request count.

    ``value`` is the estimate as of ``stamp``, the time of the last observation.
    ``stamp`` is None until an observation arrives, and while it is None ``value``
    is the cold-start seed, or None when nothing at all is known.
    """

    decay: float = DEFAULT_DECAY
    value: float | None = None
    stamp: float | None = None
    outstanding: int = 0

    def __init__(self, decay: float = DEFAULT_DECAY, initial: float | None = None) -> None:
        if not decay > 0:
            raise ValueError(f"decay must be > 0 seconds, got {decay!r}")
        self.decay = decay
        self.value = None if initial is None else max(initial, 0.0)
        self.stamp = None
        self.outstanding = 0

    @property
    def observed(self) -> bool:
        return self.stamp is not None

    def estimate(self, now: float) -> float | None:
        """The estimate read at ``now``, or None when nothing is known. It decays toward
        0 with the time since the last observation. A seed doesn't decay, since the
        caller keeps it fresh from the probes."""
        v = self.value
        s = self.stamp
        if v is None or s is None or now <= s:
            return v
        return v * math.exp((s - now) / self.decay)

    def cost(self, now: float, unknown: float = FAILURE_PENALTY) -> float:
        """estimate × (outstanding + 1), with ``unknown`` standing in for a missing
        estimate. (The balancer compares pairs instead, see the module docstring.)"""
        e = self.estimate(now)
        if e is None:
            e = unknown
        return max(e, MIN_ESTIMATE) * (self.outstanding + 1)

    def observe(self, now: float, rtt: float) -> None:
        """Take in one latency. A value above the current (decayed) estimate replaces
        it: that is the peak. Otherwise the result is value × w + rtt × (1 - w), with
        w = exp(-age / decay) and age the time since the last observation. A busy
        endpoint's estimate thus averages over about ``decay`` seconds. After a long
        silence w is near 0, and the result is about the new observation plus what
        is left of the decayed old peak."""
        rtt = max(rtt, 0.0)
        s = self.stamp
        v = self.value
        if s is None or v is None:
            self.value = rtt  # the first observation replaces the seed
        else:
            age = now - s
            w = math.exp(-age / self.decay) if age > 0 else 1.0
            current = v * w
            self.value = rtt if rtt > current else current + rtt * (1.0 - w)
        if s is None or now > s:
            self.stamp = now

    def start(self) -> None:
        self.outstanding += 1

    def finish(self, now: float, rtt: float, ok: bool = True,
               penalty: float = FAILURE_PENALTY) -> None:
        """A request ended after ``rtt`` seconds. A failure counts as at least
        ``penalty`` of latency."""
        if self.outstanding > 0:
            self.outstanding -= 1
        self.observe(now, rtt if ok else max(rtt, penalty))
