"""The data plane's request metrics, updated on the request path (``ProxyMetrics``).

The agent's other metrics are read from the cores only when Prometheus scrapes; that
exposition, and the `/metrics` route, belong to the control surface
(``proxy/api/metrics.py``). Both share one registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

#: Latency buckets in seconds: sub-millisecond resolution for the mesh's own overhead,
#: up to the default overall timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 15.0)


#: The one label value for a service name the catalog and the policies do not know.
UNKNOWN = "unknown"


class ProxyMetrics:
    """The data plane's own metrics (updated per request, so kept lean).

    Label values are service names, instance keys and status codes, and only ones the
    agent knows: a service name counts only if the catalog or a policy names it, else it
    is ``unknown`` (and so is its caller). Request heads are the network's to choose; a
    label per Host a scanner sends would grow the registry, and every scrape, forever.
    """

    def __init__(self, registry: CollectorRegistry,
                 known: Callable[[str], bool] = lambda name: True) -> None:
        self._known = known
        self.requests = Counter(
            "rumor_proxy_requests", "requests answered, by listener, service, instance "
            "and status", ["listener", "service", "instance", "status"], registry=registry)
        self.latency = Histogram(
            "rumor_proxy_request_duration_seconds", "time to response headers, by listener "
            "and service", ["listener", "service"], buckets=LATENCY_BUCKETS,
            registry=registry)
        self.retries = Counter("rumor_proxy_retries", "retries sent, by service",
                               ["service"], registry=registry)
        self.budget_exhausted = Counter(
            "rumor_proxy_retry_budget_exhausted", "retries not sent because the retry "
            "budget was spent, by service", ["service"], registry=registry)
        self.breaker_rejections = Counter(
            "rumor_proxy_circuit_breaker_rejections", "requests failed fast by the circuit "
            "breaker, by service", ["service"], registry=registry)
        self.ejections = Counter(
            "rumor_proxy_ejections", "outlier ejections, by service and instance",
            ["service", "instance"], registry=registry)
        self.denied = Counter(
            "rumor_proxy_access_denied", "inbound calls refused by access policy, by "
            "destination and source", ["service", "source"], registry=registry)
        self.protocol_errors = Counter(
            "rumor_proxy_client_errors", "requests refused before routing (malformed, "
            "too slow, too large), by listener and status", ["listener", "status"],
            registry=registry)
        self._req_children: dict[tuple[str, str, str, int], Any] = {}
        self._lat_children: dict[tuple[str, str], Any] = {}

    def service(self, name: str) -> str:
        """``name`` as a label value: itself if known, else ``unknown``."""
        return name if self._known(name) else UNKNOWN

    def caller(self, name: str | None) -> str:
        """A calling service as a label value (a header anyone can set)."""
        return "" if not name else self.service(name)

    # The request path calls these; labels() validates and locks on every call, so
    # the children are looked up once per label set.

    def request_done(self, listener: str, service: str, instance: str, status: int) -> None:
        if not self._known(service):
            service, instance = UNKNOWN, ""
        status = status if 100 <= status <= 599 else 0
        key = (listener, service, instance, status)
        child = self._req_children.get(key)
        if child is None:
            if len(self._req_children) > 65536:
                self._req_children.clear()
            child = self._req_children[key] = self.requests.labels(
                listener, service, instance, str(status))
        child.inc()

    def observe_latency(self, listener: str, service: str, seconds: float) -> None:
        key = (listener, self.service(service))
        child = self._lat_children.get(key)
        if child is None:
            child = self._lat_children[key] = self.latency.labels(*key)
        child.observe(seconds)
