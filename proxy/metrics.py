"""The data plane's request metrics, updated in place on the request path (``ProxyMetrics``).

A request adds one to an int in a dict and, for its latency, one to a bucket count: no
lock, no label validation, no client-library object per series. The Prometheus text is
built only when `/metrics` is scraped: ``ProxyMetrics`` is itself a collector on the
agent's registry, and the exposition (``proxy/api/metrics.py``) copies what it yields on
the event loop and formats it in a worker thread, like the cores' counters.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .attempts import (
    BreakerRejected,
    BudgetExhausted,
    Ejected,
    Retrying,
    StaleRetry,
)
from .grpc import name as grpc_name
from .observe import Event, Exchange, FaultInjected, NullObserver, RateLimited

#: Latency buckets in seconds: sub-millisecond resolution for the mesh's own overhead,
#: up to the default overall timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 15.0)

#: The one label value for a service name the catalog and the policies do not know.
UNKNOWN = "unknown"

#: Series per family beyond which new label sets are counted under ``unknown`` labels.
#: Known names bound the label sets already; this bounds a catalog that churns names.
MAX_SERIES = 10_000

#: Label values; ints (status codes) are spelled out only at scrape time.
Labels = tuple[str | int, ...]


class CounterFamily:
    """One counter family: a plain dict from label values to a count."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: dict[Labels, int] = {}

    def inc(self, key: Labels) -> None:
        values = self.values
        if key in values:
            values[key] += 1
        elif len(values) < MAX_SERIES:
            values[key] = 1
        else:
            overflow = (UNKNOWN,) * len(self.labels)
            values[overflow] = values.get(overflow, 0) + 1

    def add(self, key: Labels, n: int) -> None:
        """Count ``n`` at once (bytes), within the same series cap as ``inc``."""
        if n <= 0:
            return
        values = self.values
        if key not in values and len(values) >= MAX_SERIES:
            key = (UNKNOWN,) * len(self.labels)
        values[key] = values.get(key, 0) + n

    def family(self) -> CounterMetricFamily:
        f = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, n in sorted(self.values.items()):
            f.add_metric([str(v) for v in key], float(n))
        return f


class HistogramFamily:
    """One histogram family: per label set, a count per bucket (not cumulative; the
    scrape sums them) and the sum of observations."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...],
                 buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.bounds = buckets
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, key: Labels, value: float) -> None:
        counts = self.counts.get(key)
        if counts is None:
            if len(self.counts) >= MAX_SERIES:
                key = (UNKNOWN,) * len(self.labels)
                counts = self.counts.get(key)
            if counts is None:
                counts = self.counts[key] = [0] * (len(self.bounds) + 1)
                self.sums[key] = 0.0
        # bisect_left: a value equal to a bound belongs to that bucket (le is inclusive).
        counts[bisect_left(self.bounds, value)] += 1
        self.sums[key] += value

    def family(self) -> HistogramMetricFamily:
        f = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, counts in sorted(self.counts.items()):
            buckets, total = [], 0
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound),
                                float(total)))
            f.add_metric([str(v) for v in key], buckets, self.sums[key])
        return f


class ProxyMetrics(NullObserver, Collector):
    """The data plane's own metrics.

    Label values are service names, instance keys and status codes, and only ones the
    agent knows: a service name counts only if the catalog or a policy names it, else it
    is ``unknown`` (and so is its caller). Request heads are the network's to choose; a
    label per Host a scanner sends would grow the exposition, and every scrape, forever.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 known: Callable[[str], bool] = lambda name: True) -> None:
        self._known = known
        self.requests = CounterFamily(
            "rumor_proxy_requests", "requests answered, by listener, service, instance "
            "and status", ("listener", "service", "instance", "status"))
        self.latency = HistogramFamily(
            "rumor_proxy_request_duration_seconds", "time to response headers, by listener "
            "and service", ("listener", "service"), LATENCY_BUCKETS)
        self.retries = CounterFamily("rumor_proxy_retries", "retries sent, by service",
                                     ("service",))
        self.budget_exhausted = CounterFamily(
            "rumor_proxy_retry_budget_exhausted", "retries not sent because the retry "
            "budget was spent, by service", ("service",))
        self.breaker_rejections = CounterFamily(
            "rumor_proxy_circuit_breaker_rejections", "requests failed fast by the circuit "
            "breaker, by service", ("service",))
        self.ejections = CounterFamily(
            "rumor_proxy_ejections", "outlier ejections, by service and instance",
            ("service", "instance"))
        self.denied = CounterFamily(
            "rumor_proxy_access_denied", "inbound calls refused by access policy, by "
            "destination and source", ("service", "source"))
        self.protocol_errors = CounterFamily(
            "rumor_proxy_client_errors", "requests refused before routing (malformed, "
            "too slow, too large), by listener and status", ("listener", "status"))
        self.stale_retries = CounterFamily(
            "rumor_proxy_stale_connection_retries", "tries sent again on a new connection "
            "because the pooled one had been closed by the upstream, by service",
            ("service",))
        self.errors = CounterFamily(
            "rumor_proxy_errors", "answers the sidecar made itself, by listener, service "
            "and reason code (docs/proxy.md lists the codes)", ("listener", "service", "code"))
        self.faults = CounterFamily(
            "rumor_proxy_faults_injected", "requests a fault policy delayed, aborted or "
            "reset, by service, fault rule and what was done", ("service", "rule", "fault"))
        self.rate_limited = CounterFamily(
            "rumor_proxy_rate_limited", "inbound requests refused for the mesh-wide rate "
            "limit, by service and the limit that refused (total or source:NAME)",
            ("service", "limit"))
        self.grpc = CounterFamily(
            "rumor_proxy_grpc_requests", "gRPC calls answered, by listener, service and "
            "grpc-status (its name in the gRPC spec)", ("listener", "service", "grpc_status"))
        self._families = (self.requests, self.latency, self.retries, self.budget_exhausted,
                          self.breaker_rejections, self.ejections, self.denied,
                          self.protocol_errors, self.stale_retries, self.errors, self.faults,
                          self.rate_limited, self.grpc)
        if registry is not None:
            registry.register(self)

    def service(self, name: str) -> str:
        """``name`` as a label value: itself if known, else ``unknown``."""
        return name if self._known(name) else UNKNOWN

    def caller(self, name: str | None) -> str:
        """A calling service as a label value (a header anyone can set)."""
        return "" if not name else self.service(name)

    # ---- the request path --------------------------------------------------------------

    def request_done(self, listener: str, service: str, instance: str, status: int) -> None:
        if not self._known(service):
            service, instance = UNKNOWN, ""
        # The status stays an int here; the scrape spells it.
        self.requests.inc((listener, service, instance, status if 100 <= status <= 599 else 0))

    def observe_latency(self, listener: str, service: str, seconds: float) -> None:
        self.latency.observe((listener, self.service(service)), seconds)

    # ---- the observer (observe.py) ------------------------------------------------------

    def decided(self, x: Exchange, event: Event) -> None:
        label = self.service(x.service)
        if isinstance(event, Retrying):
            self.retries.inc((label,))
        elif isinstance(event, BudgetExhausted):
            self.budget_exhausted.inc((label,))
        elif isinstance(event, BreakerRejected):
            self.breaker_rejections.inc((label,))
        elif isinstance(event, Ejected):
            self.ejections.inc((label, event.key))
        elif isinstance(event, StaleRetry):
            self.stale_retries.inc((label,))
        elif isinstance(event, FaultInjected):
            # Rule names come from signed policy (bounded), not from requests.
            self.faults.inc((label, event.rule, event.what))
        elif isinstance(event, RateLimited):
            self.rate_limited.inc((label, event.limit))

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        self.request_done(x.listener, x.service, x.instance, x.status)
        if x.grpc_status is not None:
            self.grpc.inc((x.listener, self.service(x.service), grpc_name(x.grpc_status)))
        if x.headers_at is not None:
            self.observe_latency(x.listener, x.service, x.headers_at - x.started)
        if x.code is not None:
            self.errors.inc((x.listener, self.service(x.service), x.code))
            if x.code == "access_denied":
                self.denied.inc((self.service(x.service), self.caller(x.source)))

    # ---- the scrape ---------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        for family in self._families:
            yield family.family()
