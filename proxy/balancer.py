"""Load balancing: power of two choices over peak-EWMA latency × outstanding requests.

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
import random
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

#: Time constant of the decay, seconds (Linkerd's default). An observation's
#: weight, and a slow estimate read without new observations, fall to 1/e per decay.
DEFAULT_DECAY = 10.0
#: The latency a failed request counts as, at least.
FAILURE_PENALTY = 1.0
#: Smallest estimate used in a cost: with an estimate of 0 the outstanding count
#: would stop mattering, and every request would go to one endpoint.
MIN_ESTIMATE = 1e-6

__all__ = ["DEFAULT_DECAY", "FAILURE_PENALTY", "MIN_ESTIMATE", "Balancer", "PeakEwma"]


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


class Balancer:
    """P2C over peak-EWMA cost, for endpoints named by string keys.

    The caller passes the candidates on each pick, after dropping the ones that must
    not get traffic (critical, failed, ejected). Candidate sets can differ between
    requests (route subsets, retries that avoid an instance already tried) while
    state stays per endpoint. Calls for a key the balancer hasn't seen create its
    state, and ``forget_except`` drops the state of endpoints that went away.
    """

    __slots__ = ("_ewmas", "_random", "decay", "failure_penalty")

    def __init__(self, rng: random.Random, decay: float = DEFAULT_DECAY, *,
                 failure_penalty: float = FAILURE_PENALTY) -> None:
        if not decay > 0:
            raise ValueError(f"decay must be > 0 seconds, got {decay!r}")
        self._random = rng.random
        self.decay = decay
        self.failure_penalty = failure_penalty
        self._ewmas: dict[str, PeakEwma] = {}

    def _ewma(self, key: str) -> PeakEwma:
        e = self._ewmas.get(key)
        if e is None:
            e = self._ewmas[key] = PeakEwma(self.decay)
        return e

    def seed(self, key: str, rtt: float) -> None:
        """Set the cold-start estimate, typically the probe RTT to the endpoint's host.
        It is ignored once the endpoint has been observed, so calling it on every
        pick is cheap and harmless."""
        e = self._ewmas.get(key)
        if e is None:
            self._ewmas[key] = PeakEwma(self.decay, rtt)
        elif e.stamp is None:
            e.value = max(rtt, 0.0)

    def start(self, key: str, now: float) -> None:
        """A request to ``key`` is being sent. Every start needs a matching finish."""
        self._ewma(key).outstanding += 1

    def finish(self, key: str, now: float, latency: float, ok: bool = True) -> None:
        """The request ended: the response headers arrived after ``latency`` seconds
        (``ok``), or it failed (``ok`` False: 5xx, connect error, timeout)."""
        self._ewma(key).finish(now, latency, ok, self.failure_penalty)

    def pick(self, now: float, keys: Sequence[str]) -> str | None:
        """The cheaper of two distinct random candidates. Ties are broken at random.
        Returns None for no candidates and the only one for one."""
        n = len(keys)
        if n < 2:
            return keys[0] if n else None
        r = self._random
        # random() < 1, and for any n < 2**53, random() * n rounds to less than n.
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        a = keys[i]
        b = keys[j]
        xa, ma, measured_a = self._read(now, a)
        xb, mb, measured_b = self._read(now, b)
        # An endpoint not measured yet is assumed no slower than its rival when the
        # rival has been measured (or nothing is known of it); see the module
        # docstring. Between two unmeasured endpoints, the seeds decide.
        ya = xa
        if not measured_a and xb is not None and (xa is None or (measured_b and xb < xa)):
            xa = xb
        if not measured_b and ya is not None and (xb is None or (measured_a and ya < xb)):
            xb = ya
        ca = (MIN_ESTIMATE if xa is None or xa < MIN_ESTIMATE else xa) * ma
        cb = (MIN_ESTIMATE if xb is None or xb < MIN_ESTIMATE else xb) * mb
        if ca < cb:
            return a
        if cb < ca:
            return b
        return a if r() < 0.5 else b

    def _read(self, now: float, key: str) -> tuple[float | None, int, bool]:
        """(estimate or None, outstanding + 1, measured) of ``key``, creating nothing."""
        e = self._ewmas.get(key)
        if e is None:
            return None, 1, False
        v = e.value
        s = e.stamp
        if s is None:
            return v, e.outstanding + 1, False
        if v is not None and now > s:
            v *= math.exp((s - now) / e.decay)
        return v, e.outstanding + 1, True

    def forget_except(self, keys: Iterable[str]) -> None:
        """Drop the state of every endpoint not in ``keys``, except those with
        requests still in flight: their ``finish`` is still to come."""
        keep = keys if isinstance(keys, AbstractSet | Mapping) else set(keys)
        gone = [k for k, e in self._ewmas.items() if k not in keep and e.outstanding == 0]
        for k in gone:
            del self._ewmas[k]

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the state of these endpoints, in flight or not."""
        for k in keys:
            self._ewmas.pop(k, None)

    def __contains__(self, key: object) -> bool:
        return key in self._ewmas

    def __len__(self) -> int:
        return len(self._ewmas)

    def snapshot(self, now: float) -> dict[str, dict[str, float | int | bool | None]]:
        """For metrics and the API, per endpoint: ``estimate_ms`` (None when
        unknown), ``outstanding``, ``cost`` (estimate_ms × (outstanding + 1), None
        when unknown) and ``observed`` (False while only the seed is known)."""
        out: dict[str, dict[str, float | int | bool | None]] = {}
        for k, e in self._ewmas.items():
            x = e.estimate(now)
            ms = None if x is None else x * 1000.0
            out[k] = {"estimate_ms": ms, "outstanding": e.outstanding,
                      "cost": None if ms is None else ms * (e.outstanding + 1),
                      "observed": e.stamp is not None}
        return out
