"""Load balancers chosen per service: one interface, five algorithms, weights, drain and
slow start.

A resilience document names the algorithm (``BalancerSpec.algorithm``, one of
``BALANCERS``); ``make_balancer`` builds it. Every algorithm implements
``LoadBalancer``: the caller passes the candidates on each pick, already filtered (health,
route subset, outlier ejection), and reports each request's ``start`` and ``finish``.
State is per endpoint key, so candidate sets may differ between requests.

Rules all algorithms share:

* **Weights.** An endpoint's share follows its registered weight (``Endpoint.weight``).
  Weight 0 means *draining*: it is never picked, but requests already in flight to it
  finish normally (``finish`` works for any key).
* **Exclude.** ``exclude`` names the keys this request already tried. They are avoided
  while any other pickable candidate is left; if all are excluded, all are candidates.
* **Slow start** (``SlowStart``, Envoy's formula). An endpoint's effective weight is
  ``weight × max(min_percent / 100, (age / window) ** (1 / aggression))``, ``age`` being
  the time since the balancer first saw it in a pick, or since ``readmitted``. The
  endpoints of the very first pick keep their full weight: a balancer that has just been
  created (agent start, new policy) has no traffic to protect them from, and ramping all
  of them together would change no share. ``window`` 0 turns slow start off.

Algorithms:

* ``peak_ewma`` (default): ``balancer.py``'s power of two choices over peak-EWMA latency
  × (outstanding + 1), divided by the effective weight. At equal weights with slow start
  off it is the same arithmetic and draws the same random numbers as the one balancer
  rumor had before, so its picks are identical. See *slow start and peak EWMA*.
* ``least_request``: Envoy's P2C over outstanding requests: of two random candidates
  the one with the higher ``weight / (outstanding + 1) ** bias`` wins (bias 1), ties at
  random. At equal weights this is plain least-request P2C.
* ``round_robin``: smooth weighted round robin (nginx): deterministic, exact shares
  (weights 3 and 1 give 3:1 in every 4 picks), no bursts to the heavy endpoint.
* ``random``: weighted random.
* ``hash``: consistent hashing with a Maglev table (see *hash*).

With the two P2C algorithms a weight acts through the outstanding counts: an endpoint
with weight 3 wins until it has about three times the requests in flight of a rival
with weight 1, so the shares approach the weights as concurrency grows (Little's law:
at equal latency outstanding is proportional to share). At almost no concurrency the
heavier endpoint wins every comparison it takes part in, so weights then act more like
priorities; round_robin and random give exact weighted shares at any load.

Slow start and peak EWMA. The peak EWMA latches a slow answer: an instance whose first
answer took ten times the others' loses every comparison until its estimate has decayed,
``decay × ln(10)`` ≈ 23 s at the default decay. No traffic reaches it meanwhile, so
nothing corrects the estimate, and a freshly started instance (cold caches, the first
connection behind it) is shut out by its own warm-up: in ``rumor demo`` one of three
instances got 1 of the first 300 requests. During its slow-start window an endpoint is
therefore in *grace*:

* its estimate is the median of its last ``GRACE_SAMPLES`` answers, not a peak, so one
  slow answer is outvoted by the next ones, while an instance that is slow every time
  is judged slow as soon as it has ``GRACE_MIN`` answers;
* until it has ``GRACE_MIN`` answers it counts as not measured yet (no slower than its
  rival, the cold-start rule), so it gets those few requests;
* read without new answers, its estimate decays with ``window / GRACE_DECAY_DIVISOR``
  (0.25 s) as its time constant instead of ``decay``: several cold answers in a row (the
  first requests behind a new instance are often all slow) cannot shut it out for the
  window; it is asked again within about a second, and a genuinely slow instance loses
  again, at the cost of a few requests per second of its window;
* when the window ends the median becomes the peak EWMA's starting value;
* a failed request ends the grace at once (and counts as the usual penalty): slow
  start protects against slow warm-up, not against errors.

The endpoints of the balancer's first pick get no window of grace (nor a ramp: ramping
all of them together would change no share). A window there was tried and measured: it
hides a degraded instance's tail for the whole window (``slow-backend`` tail10x200 at
1,000 req/s: p99 67 ms instead of about 2 ms, 0.6% of requests to the degraded
instance), because the harness, like an agent that just started, meets every instance
at once. They are only judged by the median of their first ``GRACE_MIN`` answers instead
of the first alone (with the usual decay): a cold first answer is outvoted by the next
two, as at ``rumor demo``'s start, where the coldest of three instances otherwise got
1 of the first 300 requests, while a degraded instance costs three requests.

Hash. Each endpoint key gets an offset and a skip from ``blake2b`` (stdlib, keyed by a
fixed personalisation, 16 bytes: offset from the first 8, skip from the last 8), and the
Maglev table (size ``table_size``, a prime, default 5,003 and never below 100 × the
number of endpoints: Envoy's 65,537 takes ~0.1 s to fill in Python, which would stall
the event loop at every change of the instance set. Sizes come in tiers, 5,003, 50,021
and 500,009, so the size, and with it every key's slot, changes only when a service
crosses 50 or 500 instances) is filled in turns, an endpoint taking a turn per round in
proportion to its weight (Envoy's weighted Maglev). blake2b is stable across processes
and machines, unlike ``hash()``, so every sidecar sends a given key to the same
instance; it is a C implementation taking well under a microsecond for short input, and
its output is uniform for similar names (``web-1``, ``web-2``), where crc32's low bits
are not. Adding or removing one of N endpoints moves about 1/N of the table. The table
is built once per candidate set (cached by the set of (key, weight), endpoints sorted by
key so every sidecar builds the same table) and a pick is one blake2b of the request's
key and one lookup: slot = first 8 bytes mod the table size. A retry (primary in
``exclude``) walks the table from the primary's slot to the next distinct endpoint not
excluded. A request without a key (``hash_key`` None) is balanced as ``random``. Slow
start does not rebuild the table (which would move keys back and forth): the last 8
bytes of the key's digest give it a number u in [0, 1), and a key whose primary is
ramping with factor f goes there only if u < f, else to the next distinct endpoint. As f
grows keys move onto the new endpoint, and once moved they stay.

The code is sans-IO like ``balancer.py``: time is an argument, randomness an injected
``random.Random``.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from itertools import accumulate
from typing import Any, Protocol, TypeVar

from ..policy.documents import BALANCERS, BalancerSpec, SlowStart
from .balancer import DEFAULT_DECAY, FAILURE_PENALTY, MIN_ESTIMATE, PeakEwma

__all__ = [
    "DEFAULT_TABLE_SIZE",
    "Candidate",
    "HashBalancer",
    "LeastRequestBalancer",
    "LoadBalancer",
    "PeakEwmaBalancer",
    "RandomBalancer",
    "RoundRobinBalancer",
    "Snapshot",
    "maglev_table",
    "make_balancer",
    "table_size_for",
]

#: Maglev table size for up to 655 endpoints (a prime; above that, the next prime
#: ≥ 100 × endpoints).
DEFAULT_TABLE_SIZE = 5003
#: In its slow-start grace an endpoint's estimate is the median of its last answers,
#: this many at most; with fewer than ``GRACE_MIN`` it counts as not measured yet.
GRACE_SAMPLES = 5
GRACE_MIN = 3
#: In grace an unanswered estimate decays with window / this as its time constant (0.25 s
#: for the default 10 s window instead of the 10 s decay).
GRACE_DECAY_DIVISOR = 40.0
#: Tables kept per hash balancer (route subsets and drains make a few candidate sets).
TABLE_CACHE = 8
_NO_SLOW_START = SlowStart(0.0)
_PERSON = b"rumor-maglev"


class Candidate(Protocol):
    """What a balancer needs of an endpoint (``attempts.Endpoint`` has it)."""

    @property
    def key(self) -> str: ...

    @property
    def weight(self) -> int: ...


E = TypeVar("E", bound=Candidate)
Snapshot = dict[str, dict[str, float | int | bool | None]]


class LoadBalancer(Protocol):
    """The interface every algorithm implements (see the module docstring)."""

    algorithm: str

    def pick(self, now: float, candidates: Sequence[E], hash_key: bytes | None = None,
             exclude: Collection[str] = ()) -> E | None:
        """One of ``candidates`` with weight > 0, preferring keys not in ``exclude``;
        None if none has a weight above 0."""
        ...

    def start(self, key: str, now: float) -> None:
        """A request to ``key`` is being sent; every start needs a matching finish."""
        ...

    def finish(self, key: str, now: float, latency: float, ok: bool = True) -> None:
        """That request ended after ``latency`` s; ``ok`` False for 5xx, errors."""
        ...

    def seed(self, key: str, rtt: float) -> None:
        """A cold-start latency guess (probe RTT); only peak_ewma uses it."""
        ...

    def readmitted(self, key: str, now: float) -> None:
        """An ejected endpoint is back at ``now``: its slow start begins again."""
        ...

    def release(self, key: str) -> None:
        """End a request without judging the instance (a mesh rate-limit refusal)."""
        ...

    def forget(self, keys: Iterable[str]) -> None:
        """Drop these endpoints' state, in flight or not."""
        ...

    def forget_except(self, keys: Iterable[str]) -> None:
        """Drop the state of endpoints not in ``keys`` that have nothing in flight."""
        ...

    def snapshot(self, now: float) -> Snapshot:
        """Per endpoint, for metrics and the API."""
        ...


def _p2c(r: float, s: float, n: int) -> tuple[int, int]:
    """Two distinct indices below ``n`` ≥ 2 from two uniform draws, as balancer.py."""
    # random() < 1, and for any n < 2**53, random() * n rounds to less than n.
    i = int(r * n)
    j = int(s * (n - 1))
    if j >= i:
        j += 1
    return i, j


class _Base:
    """Outstanding counts, the slow-start ramp and the candidate filter."""

    algorithm = ""

    def __init__(self, rng: random.Random, slow_start: SlowStart | None = None) -> None:
        ss = _NO_SLOW_START if slow_start is None else slow_start
        if not ss.window >= 0 or math.isinf(ss.window):
            raise ValueError(f"slow start window must be >= 0 seconds, got {ss.window!r}")
        if ss.window > 0 and not ss.aggression > 0:
            raise ValueError(f"slow start aggression must be > 0, got {ss.aggression!r}")
        if not 0 <= ss.min_percent <= 100:
            raise ValueError(f"slow start min_percent must be 0-100, got {ss.min_percent!r}")
        self._random = rng.random
        self.slow_start = ss
        self._window = float(ss.window)
        self._exponent = 1.0 / ss.aggression if ss.window > 0 else 1.0
        self._floor = ss.min_percent / 100.0
        #: When each key's ramp began (first seen, or readmitted); kept after the ramp
        #: so a key is not new twice. Only tracked with slow start on.
        self._since: dict[str, float] = {}
        #: No key ramps at or after this time: the fast path.
        self._ramp_until = -math.inf
        self._out: dict[str, int] = {}
        #: The last candidate list seen without ``exclude`` and its pool: the shell
        #: passes the same list object until the catalog changes, so a pick costs no
        #: filtering (and the slow-start bookkeeping runs once per list).
        self._last: Sequence[Any] | None = None
        self._last_pool: list[Any] = []
        #: The running sums of weights of the last pool a weighted random pick read.
        self._cum_for: Sequence[Any] | None = None
        self._cum: list[float] = []

    # ---- slow start --------------------------------------------------------------------

    def _note(self, now: float, candidates: Sequence[Candidate]) -> None:
        since = self._since
        warm = not since  # the first pick: its endpoints start warm
        for e in candidates:
            k = e.key
            if k not in since:
                if warm:
                    since[k] = now - self._window
                    self._first_seen(k)
                else:
                    self._begin_ramp(k, now)

    def _first_seen(self, key: str) -> None:
        """An endpoint of the first pick: it starts warm, with no ramp."""

    def _begin_ramp(self, key: str, now: float) -> None:
        self._since[key] = now
        if now + self._window > self._ramp_until:
            self._ramp_until = now + self._window

    def _factor(self, key: str, now: float) -> float:
        """The slow-start multiplier of ``key``'s weight at ``now`` (1 when warm)."""
        if now >= self._ramp_until:
            return 1.0
        t0 = self._since.get(key)
        if t0 is None:
            return 1.0
        age = now - t0
        if age >= self._window:
            return 1.0
        if age <= 0:
            return self._floor
        ramp: float = (age / self._window) ** self._exponent
        return max(self._floor, ramp)

    def _ramping(self, now: float) -> bool:
        return self._window > 0 and now < self._ramp_until

    def readmitted(self, key: str, now: float) -> None:
        if self._window > 0:
            self._begin_ramp(key, now)

    # ---- candidates --------------------------------------------------------------------

    def _pool(self, now: float, candidates: Sequence[E], exclude: Collection[str]) -> list[E]:
        """The pickable candidates: weight > 0, not excluded unless all are."""
        if not exclude and candidates is self._last:
            return self._last_pool
        if self._window > 0:
            self._note(now, candidates)
        if exclude:
            pool = [e for e in candidates if e.weight > 0 and e.key not in exclude]
            if pool:
                return pool
        pool = [e for e in candidates if e.weight > 0]
        if not exclude:
            self._last, self._last_pool = candidates, pool
        return pool

    def _pair(self, now: float, candidates: Sequence[E],
              exclude: Collection[str]) -> tuple[E, E] | E | None:
        """Two distinct random pickable candidates for the power of two choices; the
        only one, or None, when there are fewer."""
        pool = self._pool(now, candidates, exclude)
        n = len(pool)
        if n < 2:
            return pool[0] if n else None
        r = self._random
        i, j = _p2c(r(), r(), n)
        return pool[i], pool[j]

    def _weights(self, now: float, pool: Sequence[Candidate]) -> list[float]:
        if self._ramping(now):
            f = self._factor
            return [e.weight * f(e.key, now) for e in pool]
        return [float(e.weight) for e in pool]

    def _weighted_random(self, now: float, pool: Sequence[E]) -> E:
        if len(pool) == 1:
            return pool[0]
        if self._ramping(now):
            cum = list(accumulate(self._weights(now, pool)))
        elif pool is self._cum_for:
            cum = self._cum
        else:  # a new pool: its running sums once, then a pick is one bisect
            cum = self._cum = list(accumulate(self._weights(now, pool)))
            self._cum_for = pool
        i = bisect_right(cum, self._random() * cum[-1])
        return pool[min(i, len(pool) - 1)]

    # ---- requests ----------------------------------------------------------------------

    def seed(self, key: str, rtt: float) -> None:
        """Only peak_ewma uses latency; the others ignore the seed."""

    def start(self, key: str, now: float) -> None:
        self._out[key] = self._out.get(key, 0) + 1

    def finish(self, key: str, now: float, latency: float, ok: bool = True) -> None:
        n = self._out.get(key, 0)
        if n > 0:
            self._out[key] = n - 1

    def release(self, key: str) -> None:
        """The request ended in a way that says nothing of the instance (its sidecar's
        mesh-wide rate limit refused it): only the outstanding count comes down."""
        n = self._out.get(key, 0)
        if n > 0:
            self._out[key] = n - 1

    def _outstanding(self, key: str) -> int:
        return self._out.get(key, 0)

    def _tables(self) -> list[dict[str, Any]]:
        """Per-key dicts to drop on forget (subclasses add theirs)."""
        return [self._out, self._since]

    def _keys(self) -> set[str]:
        keys: set[str] = set()
        for t in self._tables():
            keys.update(t)
        return keys

    def forget(self, keys: Iterable[str]) -> None:
        tables = self._tables()
        for k in keys:
            for t in tables:
                t.pop(k, None)

    def forget_except(self, keys: Iterable[str]) -> None:
        keep = keys if isinstance(keys, AbstractSet | Mapping) else set(keys)
        self.forget([k for k in self._keys() if k not in keep and self._outstanding(k) == 0])

    def __contains__(self, key: object) -> bool:
        return any(key in t for t in self._tables())

    def snapshot(self, now: float) -> Snapshot:
        return {k: {"outstanding": self._outstanding(k), "slow_start": self._factor(k, now)}
                for k in sorted(self._keys())}


class PeakEwmaBalancer(_Base):
    """P2C over peak-EWMA × (outstanding + 1) / effective weight (module docstring)."""

    algorithm = "peak_ewma"

    def __init__(self, rng: random.Random, decay: float = DEFAULT_DECAY,
                 slow_start: SlowStart | None = None, *,
                 failure_penalty: float = FAILURE_PENALTY) -> None:
        if not decay > 0:
            raise ValueError(f"decay must be > 0 seconds, got {decay!r}")
        super().__init__(rng, slow_start)
        self.decay = decay
        self.failure_penalty = failure_penalty
        self._ewmas: dict[str, PeakEwma] = {}
        #: In grace an estimate read without new answers decays this much faster, so an
        #: endpoint that lost every comparison on cold answers is asked again soon.
        self._grace_decay = min(decay, self._window / GRACE_DECAY_DIVISOR) or decay
        #: Keys in their slow-start grace → (when it ends, their answers since it began,
        #: the last ``GRACE_SAMPLES``).
        self._grace: dict[str, tuple[float, list[float]]] = {}
        #: The first pick's keys (slow start on) → their answers so far, until they have
        #: ``GRACE_MIN``: judged by the median of those, not by the first alone.
        self._first: dict[str, list[float]] = {}

    def _tables(self) -> list[dict[str, Any]]:
        return [*super()._tables(), self._ewmas, self._grace, self._first]

    def _outstanding(self, key: str) -> int:
        e = self._ewmas.get(key)
        return 0 if e is None else e.outstanding

    def _ewma(self, key: str) -> PeakEwma:
        e = self._ewmas.get(key)
        if e is None:
            e = self._ewmas[key] = PeakEwma(self.decay)
        return e

    def _first_seen(self, key: str) -> None:
        self._first[key] = []

    def _begin_ramp(self, key: str, now: float) -> None:
        super()._begin_ramp(key, now)
        self._first.pop(key, None)
        self._grace[key] = (now + self._window, [])


    def readmitted(self, key: str, now: float) -> None:
        """A fresh start: the failures that got it ejected are already paid for, so its
        estimate is forgotten (``seed`` it again) and its slow start begins."""
        e = self._ewmas.get(key)
        if e is not None:
            e.value = None
            e.stamp = None
        super().readmitted(key, now)

    def _in_grace(self, key: str, now: float) -> bool:
        g = self._grace.get(key)
        return g is not None and now < g[0]

    def _judged(self, key: str, now: float) -> bool:
        """False while ``key`` is in its grace with fewer than ``GRACE_MIN`` answers: it
        then counts as not measured (no slower than its rival)."""
        f = self._first.get(key)
        if f is not None:
            return len(f) >= GRACE_MIN
        g = self._grace.get(key)
        return g is None or now >= g[0] or len(g[1]) >= GRACE_MIN

    def seed(self, key: str, rtt: float) -> None:
        """As ``Balancer.seed``: ignored once the endpoint has been observed."""
        e = self._ewmas.get(key)
        if e is None:
            self._ewmas[key] = PeakEwma(self.decay, rtt)
        elif e.stamp is None:
            e.value = max(rtt, 0.0)

    def start(self, key: str, now: float) -> None:
        self._ewma(key).outstanding += 1

    def release(self, key: str) -> None:
        e = self._ewmas.get(key)
        if e is not None and e.outstanding > 0:
            e.outstanding -= 1

    def finish(self, key: str, now: float, latency: float, ok: bool = True) -> None:
        e = self._ewma(key)
        # A first-pick endpoint's first GRACE_MIN answers, or an endpoint in its window
        # of grace: judged by the median of its answers, so one slow answer (a cold
        # cache, a first connection behind the instance) is outvoted, not latched, while
        # one slow every time is judged slow after three. A failure is judged at once.
        answers: list[float] | None = None
        first = self._first.get(key) if self._first else None
        if first is not None:
            if not ok or len(first) + 1 >= GRACE_MIN:
                del self._first[key]  # judged: the median carries on as its peak EWMA
            answers = first
        else:
            g = self._grace.get(key)
            if g is not None and (not ok or now >= g[0]):
                del self._grace[key]  # over (its median carries on), or failed
            elif g is not None:
                answers = g[1]
        if answers is None or not ok:
            e.finish(now, latency, ok, self.failure_penalty)
            return
        if e.outstanding > 0:
            e.outstanding -= 1
        answers.append(max(latency, 0.0))
        if len(answers) > GRACE_SAMPLES:
            del answers[0]
        e.value = statistics.median(answers)
        if e.stamp is None or now > e.stamp:
            e.stamp = now

    def pick(self, now: float, candidates: Sequence[E], hash_key: bytes | None = None,
             exclude: Collection[str] = ()) -> E | None:
        pair = self._pair(now, candidates, exclude)
        if not isinstance(pair, tuple):
            return pair
        a, b = pair
        r = self._random
        ka = a.key
        kb = b.key
        xa, ma, measured_a = self._read(now, ka)
        xb, mb, measured_b = self._read(now, kb)
        if self._grace or self._first:
            measured_a = measured_a and self._judged(ka, now)
            measured_b = measured_b and self._judged(kb, now)
        # An endpoint not measured yet is assumed no slower than its rival when the
        # rival has been measured (or nothing is known of it); see balancer.py.
        ya = xa
        if not measured_a and xb is not None and (xa is None or (measured_b and xb < xa)):
            xa = xb
        if not measured_b and ya is not None and (xb is None or (measured_a and ya < xb)):
            xb = ya
        wa = float(a.weight)
        wb = float(b.weight)
        if self._ramping(now):
            wa *= self._factor(ka, now)
            wb *= self._factor(kb, now)
        ca = (MIN_ESTIMATE if xa is None or xa < MIN_ESTIMATE else xa) * ma
        cb = (MIN_ESTIMATE if xb is None or xb < MIN_ESTIMATE else xb) * mb
        if wa != wb:  # equal weights leave the comparison (and its bits) as it is
            ca /= wa
            cb /= wb
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
            tau = e.decay
            if self._grace:
                g = self._grace.get(key)
                if g is not None and now < g[0]:
                    tau = self._grace_decay
            v *= math.exp((s - now) / tau)
        return v, e.outstanding + 1, True

    def snapshot(self, now: float) -> Snapshot:
        """The peak-EWMA fields (``cost`` before weights) plus
        ``slow_start`` (the weight multiplier, 1 when warm)."""
        out: Snapshot = {}
        for k in sorted(self._keys()):
            e = self._ewmas.get(k)
            x = None if e is None else e.estimate(now)
            ms = None if x is None else x * 1000.0
            o = 0 if e is None else e.outstanding
            out[k] = {"estimate_ms": ms, "outstanding": o,
                      "cost": None if ms is None else ms * (o + 1),
                      "observed": e is not None and e.stamp is not None,
                      "slow_start": self._factor(k, now)}
        return out


class LeastRequestBalancer(_Base):
    """Envoy's P2C: the higher ``weight / (outstanding + 1) ** bias`` of two wins."""

    algorithm = "least_request"

    def __init__(self, rng: random.Random, slow_start: SlowStart | None = None, *,
                 bias: float = 1.0) -> None:
        if not bias >= 0:
            raise ValueError(f"bias must be >= 0, got {bias!r}")
        super().__init__(rng, slow_start)
        self.bias = bias

    def pick(self, now: float, candidates: Sequence[E], hash_key: bytes | None = None,
             exclude: Collection[str] = ()) -> E | None:
        pair = self._pair(now, candidates, exclude)
        if not isinstance(pair, tuple):
            return pair
        a, b = pair
        r = self._random
        out = self._out
        da = out.get(a.key, 0) + 1.0
        db = out.get(b.key, 0) + 1.0
        if self.bias != 1.0:
            da **= self.bias
            db **= self.bias
        wa = a.weight / da
        wb = b.weight / db
        if self._ramping(now):
            wa *= self._factor(a.key, now)
            wb *= self._factor(b.key, now)
        if wa > wb:
            return a
        if wb > wa:
            return b
        return a if r() < 0.5 else b


class RoundRobinBalancer(_Base):
    """Smooth weighted round robin (nginx): each pick adds every candidate's weight to
    its running total, takes the highest total and takes the sum of weights off it."""

    algorithm = "round_robin"

    def __init__(self, rng: random.Random, slow_start: SlowStart | None = None) -> None:
        super().__init__(rng, slow_start)
        self._current: dict[str, float] = {}

    def _tables(self) -> list[dict[str, Any]]:
        return [*super()._tables(), self._current]

    def pick(self, now: float, candidates: Sequence[E], hash_key: bytes | None = None,
             exclude: Collection[str] = ()) -> E | None:
        pool = self._pool(now, candidates, exclude)
        if len(pool) < 2:
            return pool[0] if pool else None
        current = self._current
        total = 0.0
        best = pool[0]
        top = -math.inf
        for e, w in zip(pool, self._weights(now, pool), strict=True):
            k = e.key
            c = current.get(k, 0.0) + w
            current[k] = c
            total += w
            if c > top:
                best, top = e, c
        current[best.key] = top - total
        return best


class RandomBalancer(_Base):
    """Weighted random."""

    algorithm = "random"

    def pick(self, now: float, candidates: Sequence[E], hash_key: bytes | None = None,
             exclude: Collection[str] = ()) -> E | None:
        pool = self._pool(now, candidates, exclude)
        return self._weighted_random(now, pool) if pool else None


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


#: Maglev table sizes (primes), smallest first: a service takes the first that is at
#: least 100 × its endpoints, so adding or removing one keeps the size (and moves ~1/N
#: of the keys) except when crossing a tier.
TABLE_TIERS = (5003, 50021, 500009)


def table_size_for(endpoints: int, minimum: int = DEFAULT_TABLE_SIZE) -> int:
    """The Maglev table size for ``endpoints``: the first tier ≥ ``minimum`` (a prime)
    and ≥ 100 × ``endpoints``; past the tiers, the smallest prime ≥ 100 × endpoints."""
    need = 100 * endpoints
    for size in (minimum, *TABLE_TIERS):
        if size >= minimum and size >= need:
            return size
    n = need
    while not _is_prime(n):
        n += 1
    return n


def maglev_table(keys: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016) with Envoy's weighting: entry
    ``t`` is the index into ``keys`` owning slot ``t``. ``size`` must be a prime larger
    than ``len(keys)``, every weight > 0."""
    n = len(keys)
    if n == 0:
        return []
    pos: list[int] = []
    skip: list[int] = []
    for k in keys:
        d = hashlib.blake2b(k.encode(), digest_size=16, person=_PERSON).digest()
        pos.append(int.from_bytes(d[:8], "big") % size)
        skip.append(int.from_bytes(d[8:], "big") % (size - 1) + 1)
    top = max(weights)
    target = [0] * n
    table = [-1] * size
    filled = 0
    rnd = 0
    while filled < size:
        for i in range(n):
            # An endpoint of weight top takes a turn every round, one of top / 3 every
            # third round, and so on.
            if rnd * weights[i] < target[i]:
                continue
            target[i] += top
            c = pos[i]
            s = skip[i]
            while table[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            table[c] = i
            c += s
            pos[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                break
        rnd += 1
    return table


class _Table:
    __slots__ = ("keys", "table")

    def __init__(self, keys: tuple[str, ...], table: list[int]) -> None:
        self.keys = keys
        self.table = table


class HashBalancer(_Base):
    """Consistent hashing on ``hash_key`` with a Maglev table (module docstring)."""

    algorithm = "hash"

    def __init__(self, rng: random.Random, slow_start: SlowStart | None = None, *,
                 table_size: int = DEFAULT_TABLE_SIZE) -> None:
        if not _is_prime(table_size):
            raise ValueError(f"table size must be a prime, got {table_size!r}")
        super().__init__(rng, slow_start)
        self.table_size = table_size
        self._cache: OrderedDict[frozenset[tuple[str, int]], _Table] = OrderedDict()
        self.builds = 0  # tables built, for tests and metrics
        #: The last candidate list and its (pool, endpoint by key, table): the shell
        #: passes the same list object until the catalog changes.
        self._for: Sequence[Any] | None = None
        self._pool_keys_table: tuple[list[Any], dict[str, Any], _Table | None] = ([], {}, None)

    def _table(self, pool: Sequence[Candidate]) -> _Table:
        ident = frozenset((e.key, e.weight) for e in pool)
        t = self._cache.get(ident)
        if t is not None:
            self._cache.move_to_end(ident)
            return t
        entries = sorted(ident)
        keys = tuple(k for k, _ in entries)
        size = table_size_for(len(keys), self.table_size)
        t = _Table(keys, maglev_table(keys, [w for _, w in entries], size))
        self.builds += 1
        self._cache[ident] = t
        while len(self._cache) > TABLE_CACHE:
            self._cache.popitem(last=False)
        return t

    def pick(self, now: float, candidates: Sequence[E], hash_key: bytes | None = None,
             exclude: Collection[str] = ()) -> E | None:
        pool: list[E]
        by_key: dict[str, E]
        if candidates is self._for:
            pool, by_key, t = self._pool_keys_table
        else:  # a new candidate list: its pool, index and table once, then lookups
            if self._window > 0:
                self._note(now, candidates)
            pool = [e for e in candidates if e.weight > 0]
            by_key = {e.key: e for e in pool}
            t = self._table(pool) if len(pool) > 1 else None
            self._for, self._pool_keys_table = candidates, (pool, by_key, t)
        if not pool:
            return None
        if hash_key is None:
            if exclude:
                pool = [e for e in pool if e.key not in exclude] or pool
            return self._weighted_random(now, pool)
        if t is None:
            return pool[0]
        if exclude and all(k in exclude for k in by_key):
            exclude = ()
        table = t.table
        keys = t.keys
        size = len(table)
        d = hashlib.blake2b(hash_key, digest_size=16).digest()
        slot = int.from_bytes(d[:8], "big") % size
        primary = keys[table[slot]]
        if primary not in exclude:
            if not self._ramping(now):
                return by_key[primary]
            u = int.from_bytes(d[8:], "big") / 2.0**64
            if u < self._factor(primary, now):
                return by_key[primary]
        # The next distinct endpoint in the table, not excluded, other than the primary.
        for step in range(1, size):
            k = keys[table[(slot + step) % size]]
            if k != primary and k not in exclude:
                return by_key[k]
        return by_key[primary]


def make_balancer(spec: BalancerSpec, rng: random.Random,
                  decay: float = DEFAULT_DECAY) -> LoadBalancer:
    """The balancer a resilience document's ``balancer`` section asks for; ``decay`` is
    peak_ewma's time constant (``--balancer-decay``)."""
    ss = spec.slow_start
    alg = spec.algorithm
    if alg == "peak_ewma":
        return PeakEwmaBalancer(rng, decay, ss)
    if alg == "least_request":
        return LeastRequestBalancer(rng, ss)
    if alg == "round_robin":
        return RoundRobinBalancer(rng, ss)
    if alg == "random":
        return RandomBalancer(rng, ss)
    if alg == "hash":
        return HashBalancer(rng, ss)
    raise ValueError(f"unknown balancer {alg!r} (expected one of {', '.join(BALANCERS)})")
