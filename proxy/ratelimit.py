"""A mesh-wide rate limit with no rate-limit service (sans-IO).

A ``ratelimit`` document says: at most ``rate`` requests/s to a service across the
whole mesh (``RateLimitSpec``), and per caller as its ``sources`` say. Nothing counts
requests centrally: each instance's **inbound** sidecar enforces its share of the rate,

    share = R · w / W,

where ``w`` is this instance's weight and ``W`` the sum of the weights of the service's
*live* instances as this agent's gossip catalog knows them (a draining instance, weight
0, counts 0; this instance's own weight is the one it announces, added when the catalog
does not list it yet). A source limit ``rate_s`` is shared the same way: ``rate_s · w /
W``. Each share is a token bucket of capacity ``share × burst`` (at least one token, so
that a small share still admits something) refilled at ``share`` tokens/s; a request
takes a token from the total bucket and, if its caller is named in the spec, from that
source's bucket, and only when both have one. Callers the spec does not name share
the total only, so memory is bounded by the document, never by the traffic.

Accuracy, with N instances whose catalogs agree and every bucket ≥ one token
(``share_i × burst ≥ 1``):

- **Never more than R.** Over any t seconds the mesh admits at most
  ``Σ_i (share_i·t + share_i·burst) = R·(t + burst)``, whatever the load imbalance: each
  instance admits at most its bucket's fill plus its refill. (With buckets floored at
  one token the burst term is ``Σ_i max(share_i·burst, 1)``.)
- **Less than R when the load is uneven.** The shares follow the weights, not the load:
  an instance offered ``load_i`` admits ``min(load_i, share_i)`` per second in the long
  run, so the mesh admits ``Σ_i min(load_i, share_i)`` per second (plus the bursts), which
  is R only when every instance gets at least its share. With 3 equal instances offered
  2R split 70/20/10 %, that is R/3 + R/3 + 0.2·R ≈ 0.87·R. Balancers spread load by
  weight, so sustained imbalance means few callers or sticky connections.
- **Membership changes.** ``resize`` keeps each bucket's fill as a fraction of its
  capacity, so a resize neither grants a fresh burst nor zeroes one; a joining instance
  starts full, which adds at most its own ``share × burst`` once. Catalogs converge by
  gossip: while they disagree, shares can sum to a little more (an instance that does
  not see a new peer yet) or less than R, for the seconds the news takes to spread.

``now`` is passed in (the shell's monotonic clock); nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..policy.documents import RateLimitSpec

#: Token deficits smaller than this count as a full token (float rounding of refills).
_EPSILON = 1e-9
#: What ``Admission.retry_after`` says when a bucket never refills (share 0: this
#: instance is draining, or the spec allows nothing): ask again after the catalog
#: has had time to change.
NO_SHARE_RETRY_AFTER = 60.0
#: The largest Retry-After the header says, in seconds.
MAX_RETRY_AFTER = 3600


def local_share(rate: float, own_weight: float, live_weights: Mapping[str, float], *,
                own: str) -> float:
    """This instance's share of a mesh-wide ``rate``: ``rate · w / W``, where
    ``live_weights`` maps the service's live instances (as the catalog knows them) to
    their weights and ``own`` is this instance's key in it. ``W`` counts this instance
    with ``own_weight`` whether or not the catalog lists it yet (not listed: ``W + w``);
    a weight of 0 (draining) counts 0, so a draining instance's share is 0."""
    if own_weight <= 0 or rate <= 0:
        return 0.0
    total = own_weight
    for key, weight in live_weights.items():
        if key != own and weight > 0:
            total += weight
    return rate * own_weight / total


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a request may go in. Refused: ``limit`` names the bucket that refused
    (``total`` or ``source:NAME``, the longer wait when both did) and ``retry_after``
    is the seconds until it holds a token again (``retry_after_header`` rounds it up)."""

    ok: bool
    retry_after: float
    limit: str


ADMITTED = Admission(True, 0.0, "")
TOTAL = "total"


def retry_after_header(seconds: float) -> bytes:
    """A ``Retry-After`` value: ``seconds`` rounded up to whole seconds, 0 to
    ``MAX_RETRY_AFTER`` (a NaN or infinite wait says the maximum)."""
    if not math.isfinite(seconds) or seconds > MAX_RETRY_AFTER:
        return b"%d" % MAX_RETRY_AFTER
    return b"%d" % max(0, math.ceil(seconds))


class _Bucket:
    """A token bucket: ``tokens`` as of ``stamp``, refilled at ``rate``/s up to
    ``capacity``."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, stamp: float | None) -> None:
        self.rate = rate
        self.capacity = _capacity(rate, burst)
        self.tokens = self.capacity  # a new bucket starts full
        self.stamp = stamp

    def refill(self, now: float) -> None:
        stamp = self.stamp
        if stamp is None:
            self.stamp = now
        elif now > stamp:
            self.tokens = min(self.capacity, self.tokens + (now - stamp) * self.rate)
            self.stamp = now
        # A ``now`` before the stamp (never, with a monotonic clock) refills nothing.

    def wait(self) -> float:
        """Seconds until one token is there (after ``refill``); 0 if it is now."""
        deficit = 1.0 - self.tokens
        if deficit <= _EPSILON:
            return 0.0
        if self.rate <= 0:
            return NO_SHARE_RETRY_AFTER
        return deficit / self.rate

    def resize(self, rate: float, burst: float, now: float | None) -> None:
        if now is not None:
            self.refill(now)  # what accrued until now accrued at the old rate
        fraction = self.tokens / self.capacity if self.capacity > 0 else 1.0
        self.rate = rate
        self.capacity = _capacity(rate, burst)
        self.tokens = fraction * self.capacity


def _capacity(rate: float, burst: float) -> float:
    if rate <= 0:
        return 0.0
    return max(rate * burst, 1.0)


class MeshRateLimit:
    """One instance's share of a ``RateLimitSpec`` (see the module's docstring).

    Built from the spec, this instance's key and weight, and the catalog's live
    instances; ``resize`` when the catalog changes; ``admit`` per request."""

    __slots__ = ("_rates", "_sources", "_total", "instance", "own_weight", "spec")

    def __init__(self, spec: RateLimitSpec, *, instance: str, own_weight: float,
                 live_weights: Mapping[str, float]) -> None:
        self.spec = spec
        self.instance = instance
        self.own_weight = own_weight
        self._total: _Bucket | None = None
        if spec.rate is not None:
            self._total = _Bucket(self._share(spec.rate, live_weights), spec.burst, None)
        #: Each named source's mesh-wide rate (the first limit of a source named twice).
        self._rates: dict[str, float] = {}
        for limit in spec.sources:
            self._rates.setdefault(limit.source, limit.rate)
        self._sources = {source: _Bucket(self._share(rate, live_weights), spec.burst, None)
                         for source, rate in self._rates.items()}

    def _share(self, rate: float, live_weights: Mapping[str, float]) -> float:
        return local_share(rate, self.own_weight, live_weights, own=self.instance)

    @property
    def share(self) -> float | None:
        """This instance's share of the total rate, requests/s (None: no total)."""
        return self._total.rate if self._total is not None else None

    @property
    def capacity(self) -> float | None:
        """The total bucket's capacity, requests (None: no total)."""
        return self._total.capacity if self._total is not None else None

    def source_share(self, source: str) -> float | None:
        """This instance's share of ``source``'s limit (None: the spec names no such
        source)."""
        bucket = self._sources.get(source)
        return bucket.rate if bucket is not None else None

    def resize(self, own_weight: float, live_weights: Mapping[str, float], *,
               now: float | None = None) -> None:
        """The catalog changed: recompute the shares, keeping each bucket's fill as a
        fraction of its capacity. With ``now``, the buckets first refill up to it at
        the old rate (exact); without, the fraction is the one of their last update and
        the time since refills at the new rate."""
        self.own_weight = own_weight
        spec = self.spec
        if self._total is not None and spec.rate is not None:
            self._total.resize(self._share(spec.rate, live_weights), spec.burst, now)
        for source, rate in self._rates.items():
            self._sources[source].resize(self._share(rate, live_weights), spec.burst, now)

    def admit(self, now: float, source: str | None) -> Admission:
        """Admit one request from ``source`` (None: an unknown caller) at ``now``,
        taking a token from every bucket it must fit, or none if one refuses."""
        total = self._total
        bucket = self._sources.get(source) if source is not None and self._sources else None
        wait_total = wait_source = 0.0
        if total is not None:
            total.refill(now)
            wait_total = total.wait()
        if bucket is not None:
            bucket.refill(now)
            wait_source = bucket.wait()
        if wait_total == 0.0 and wait_source == 0.0:
            if total is not None:
                total.tokens = max(0.0, total.tokens - 1.0)
            if bucket is not None:
                bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return ADMITTED
        if wait_source > wait_total:
            return Admission(False, wait_source, f"source:{source}")
        return Admission(False, wait_total, TOTAL)


__all__ = ["ADMITTED", "Admission", "MeshRateLimit", "local_share", "retry_after_header"]
