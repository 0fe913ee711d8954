"""Resilience decisions for one destination service: retry budget, circuit breaker,
outlier ejection, and retry backoff.

Each class turns one setting of a ``resilience`` policy document into yes/no answers
for the data plane. None of them does I/O or reads a clock: time is a ``now``
argument and randomness an injected ``random.Random``, so the behaviour can be tested
exactly and simulated at scale. They are called on every request, so each answer is
O(1), apart from the outlier detector's pass over its ejected instances. That set is
capped by ``max_ejected_percent``, so it stays small.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ..policy.documents import CircuitBreaker as BreakerSpec
from ..policy.documents import OutlierEjection, RetryBudget, RetryPolicy

__all__ = ["CircuitBreaker", "OutlierDetector", "RetryBudgetTracker", "backoff"]


def backoff(rng: random.Random, policy: RetryPolicy, retry: int) -> float:
    """Seconds to wait before the ``retry``-th retry (1 for the first). The wait is
    uniform between 0 and ``policy.backoff_ceiling(retry)`` ("full jitter"), so that
    clients that failed together spread their retries out instead of retrying in
    step."""
    return rng.random() * policy.backoff_ceiling(retry)


class RetryBudgetTracker:
    """Linkerd's retry budget: retries may add at most ``ratio`` to the load.

    Each request deposits and each retry withdraws. Over the sliding window a retry
    is allowed while ``retries + 1 <= ratio × requests + min_per_second × window``.
    The ratio caps the extra load of a full outage: every try fails and the retries
    themselves stay at ``ratio`` of the traffic instead of multiplying it by
    ``attempts``. The floor lets a quiet service retry at all.

    The window is kept as ``SLICES`` counters per kind in a ring, each covering
    ``window / SLICES`` seconds. Memory is constant, and moving the window clears
    each slice once as time passes it, so the cost is O(1) amortised. The window
    covers the current slice and the ``SLICES - 1`` before it: between 90% and 100%
    of ``window`` seconds of history.
    """

    SLICES = 10

    __slots__ = ("_requests", "_retries", "_slice", "_sum_requests", "_sum_retries",
                 "_width", "budget", "exhausted", "requests", "retries")

    def __init__(self, budget: RetryBudget) -> None:
        if not budget.window > 0:
            raise ValueError(f"retry budget window must be > 0 seconds, got {budget.window!r}")
        self.budget = budget
        self._width = budget.window / self.SLICES
        self._requests = [0] * self.SLICES
        self._retries = [0] * self.SLICES
        self._slice: int | None = None  # index of the slice that holds "now"
        self._sum_requests = 0
        self._sum_retries = 0
        #: Totals since creation, for metrics.
        self.requests = 0
        self.retries = 0
        self.exhausted = 0  # retries refused for lack of budget

    def _advance(self, now: float) -> int:
        """Move the window to ``now`` and return the ring position of its slice."""
        s = math.floor(now / self._width)
        cur = self._slice
        if cur is None:
            cur = self._slice = s
        elif s - cur >= self.SLICES:  # the whole window has passed
            self._requests[:] = [0] * self.SLICES
            self._retries[:] = [0] * self.SLICES
            self._sum_requests = self._sum_retries = 0
            cur = self._slice = s
        elif s > cur:
            for k in range(cur + 1, s + 1):
                i = k % self.SLICES
                self._sum_requests -= self._requests[i]
                self._sum_retries -= self._retries[i]
                self._requests[i] = self._retries[i] = 0
            cur = self._slice = s
        # A time before the current slice (which a monotonic clock never gives) is
        # counted in the current slice.
        return cur % self.SLICES

    def allowance(self, now: float) -> float:
        """Retries the window allows in all (used or not)."""
        self._advance(now)
        b = self.budget
        return b.ratio * self._sum_requests + b.min_per_second * b.window

    def available(self, now: float) -> int:
        """Retries that ``try_retry`` would allow right now."""
        return max(0, math.floor(self.allowance(now) + 1e-9) - self._sum_retries)

    def record_request(self, now: float) -> None:
        """An original request (not a retry) arrived: a deposit."""
        i = self._advance(now)
        self._requests[i] += 1
        self._sum_requests += 1
        self.requests += 1

    def try_retry(self, now: float) -> bool:
        """Withdraw one retry if the budget allows it. On False the caller must not
        retry (and ``exhausted`` counts the refusal)."""
        i = self._advance(now)
        b = self.budget
        allowed = b.ratio * self._sum_requests + b.min_per_second * b.window
        if self._sum_retries + 1 > allowed + 1e-9:
            self.exhausted += 1
            return False
        self._retries[i] += 1
        self._sum_retries += 1
        self.retries += 1
        return True


class CircuitBreaker:
    """Envoy-style concurrency limits toward one service. Past ``max_requests`` in
    flight, or ``max_pending`` waiting for a connection, a request fails fast with a
    503. Queueing more work on an upstream that is already saturated would only turn
    its slowness into timeouts for every caller.

    Every successful ``try_acquire`` needs one ``release``, and every successful
    ``try_enqueue`` one ``dequeue``. An extra release is ignored, so a bug there
    cannot make the counts negative and the limit too lenient.
    """

    __slots__ = ("in_flight", "pending", "pending_rejected", "rejected", "spec")

    def __init__(self, spec: BreakerSpec) -> None:
        self.spec = spec
        self.in_flight = 0
        self.pending = 0
        #: Totals since creation (kept across ``inherit``), for metrics.
        self.rejected = 0
        self.pending_rejected = 0

    @property
    def open(self) -> bool:
        """True while new requests are being refused."""
        return self.in_flight >= self.spec.max_requests

    def try_acquire(self) -> bool:
        if self.in_flight >= self.spec.max_requests:
            self.rejected += 1
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1

    def try_enqueue(self) -> bool:
        """Start waiting for a connection. With ``max_pending`` 0 no request may wait."""
        if self.pending >= self.spec.max_pending:
            self.pending_rejected += 1
            return False
        self.pending += 1
        return True

    def dequeue(self) -> None:
        if self.pending > 0:
            self.pending -= 1

    def inherit(self, old: CircuitBreaker) -> None:
        """Take over the counts of the breaker this one replaces (a new policy). The
        requests admitted by the old one are still in flight and will be released
        here."""
        self.in_flight = old.in_flight
        self.pending = old.pending
        self.rejected = old.rejected
        self.pending_rejected = old.pending_rejected

    def to_json(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "pending": self.pending,
                "rejected": self.rejected, "pending_rejected": self.pending_rejected}


@dataclass(slots=True)
class _Host:
    failures: int = 0  # consecutive failures since the last success or ejection
    times: int = 0  # ejections in a row, which sets how long the next one lasts
    until: float = 0.0  # end of the current or last ejection; 0.0 if never ejected


class OutlierDetector:
    """Passive health checking: eject an instance after ``consecutive_failures``
    failures in a row, and readmit it when its ejection time is up.

    The caller decides what counts as a failure (5xx, connect error, timeout) and
    skips ejected instances when picking. Three rules keep this from doing harm:

    * Each ejection in a row lasts longer (``spec.ejection_time(n)``), so an
      instance that keeps failing spends most of its time out. The count starts over
      once an instance has stayed in for ``max_ejection_time`` after its last
      ejection, so an old incident doesn't lengthen the next one.
    * At most ``spec.max_ejected(total)`` instances are out at once. When the whole
      service is failing, ejecting everything would only turn errors into "no
      instance": the cap keeps most of the capacity in, and the balancer's latency
      penalty for failures steers around the bad ones. A failure that would eject
      past the cap is counted in ``capped``, and the instance is ejected on a later
      failure once there is room.
    * Results that arrive while an instance is ejected (tries sent before the
      ejection) neither extend the ejection nor count toward the next one.
    """

    __slots__ = ("_ejected", "_hosts", "_readmitted", "capped", "ejections",
                 "readmissions", "spec")

    def __init__(self, spec: OutlierEjection) -> None:
        self.spec = spec
        self._hosts: dict[str, _Host] = {}
        self._ejected: dict[str, float] = {}  # key -> ejected until
        self._readmitted: dict[str, float] = {}  # key -> readmitted at, not yet reported
        #: Totals since creation, for metrics.
        self.ejections = 0
        self.readmissions = 0
        self.capped = 0

    def record(self, now: float, key: str, ok: bool, total: int) -> bool:
        """Take the result of one try to ``key``. ``total`` is the number of
        instances of the service now, for the cap. Returns True when this result
        ejected the instance."""
        spec = self.spec
        if not spec.enabled:
            return False
        h = self._hosts.get(key)
        if h is None:
            if ok:
                return False  # nothing to reset: don't keep state for healthy hosts
            h = self._hosts[key] = _Host()
        until = self._ejected.get(key)
        if until is not None and now < until:
            return False
        if ok:
            h.failures = 0
            return False
        h.failures += 1
        if h.failures < spec.consecutive_failures:
            return False
        self._expire(now)
        if len(self._ejected) >= spec.max_ejected(total):
            self.capped += 1
            return False
        if h.times and now - h.until >= spec.max_ejection_time:
            h.times = 0  # a healthy stretch since the last ejection: start over
        h.times += 1
        h.failures = 0
        h.until = now + spec.ejection_time(h.times)
        self._ejected[key] = h.until
        self.ejections += 1
        return True

    def any_ejected(self, now: float) -> bool:
        """Whether some instance may be out at ``now`` (cheap: the common answer is no)."""
        return bool(self._ejected)

    def is_ejected(self, now: float, key: str) -> bool:
        until = self._ejected.get(key)
        return until is not None and now < until

    def ejected(self, now: float) -> set[str]:
        """The instances out at ``now``."""
        return {k for k, until in self._ejected.items() if now < until}

    def ejected_until(self, key: str) -> float:
        """When the current or last ejection of ``key`` ends (0.0 if never ejected)."""
        h = self._hosts.get(key)
        return 0.0 if h is None else h.until

    def times_ejected(self, key: str) -> int:
        """Ejections in a row of ``key``: the next one lasts ejection_time(this + 1)."""
        h = self._hosts.get(key)
        return 0 if h is None else h.times

    def next_deadline(self) -> float | None:
        """The earliest time an ejected instance is due back, for a caller that wants
        to wake up and report readmissions promptly."""
        return min(self._ejected.values(), default=None)

    def readmit(self, now: float) -> list[tuple[str, float]]:
        """``(key, when)`` for each ejection that ended since the last call, oldest
        first, for logs and metrics. Readmission itself needs no call: ``is_ejected``
        turns False at the deadline on its own. An instance ejected again since it
        came back is still reported, with its latest readmission if there were
        several; ``readmissions`` counts every one."""
        self._expire(now)
        if not self._readmitted:
            return []
        out = sorted(self._readmitted.items(), key=lambda kv: kv[1])
        self._readmitted.clear()
        return out

    def _expire(self, now: float) -> None:
        if not self._ejected:
            return
        done = [k for k, until in self._ejected.items() if until <= now]
        for k in done:
            self._readmitted[k] = self._ejected.pop(k)
            self.readmissions += 1

    def forget_except(self, keys: Iterable[str]) -> None:
        """Drop all state of instances not in ``keys`` (they left the catalog), so
        that memory follows the current instances, and a vanished ejected instance
        doesn't take up a place under the cap."""
        keep = keys if isinstance(keys, AbstractSet | Mapping) else set(keys)
        for table in (self._hosts, self._ejected, self._readmitted):
            for k in [k for k in table if k not in keep]:
                del table[k]

    def to_json(self, now: float) -> dict[str, object]:
        return {"ejected": {k: round(until - now, 3) for k, until in self._ejected.items()
                            if now < until},
                "ejections": self.ejections, "readmissions": self.readmissions,
                "capped": self.capped}
