"""The mesh TCP metrics: per upstream service on the caller, per service on the callee.

Counted in place like the HTTP metrics (``metrics.py``: plain dicts, the Prometheus
families built at scrape time). Label values are bounded: an upstream service is one the
operator declared; a service named by a caller's preamble counts under its name only if
the catalog or a policy knows it, else under ``unknown``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from .metrics import UNKNOWN, CounterFamily, HistogramFamily

#: Connection durations, in seconds: a short query to the default idle timeout.
DURATION_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0)


class TcpMetrics(Collector):
    def __init__(self, registry: CollectorRegistry | None = None,
                 known: Callable[[str], bool] = lambda name: True) -> None:
        self._known = known
        self.connections = CounterFamily(
            "rumor_tcp_upstream_connections", "connections accepted on an upstream port, by "
            "service and outcome (relayed, or why not: no_instance, connect_failed, "
            "access_denied, ...)", ("service", "outcome"))
        self.bytes = CounterFamily(
            "rumor_tcp_upstream_bytes", "bytes relayed through upstream ports, by service "
            "and direction (sent: from the application, received: to it)",
            ("service", "direction"))
        self.connect_failures = CounterFamily(
            "rumor_tcp_upstream_connect_failures", "tries to open a mesh connection that "
            "failed, by service and reason", ("service", "reason"))
        self.duration = HistogramFamily(
            "rumor_tcp_upstream_connection_duration_seconds", "how long relayed connections "
            "lasted, by service", ("service",), DURATION_BUCKETS)
        self.inbound = CounterFamily(
            "rumor_tcp_inbound_connections", "mesh TCP connections at the inbound listener, "
            "by service, outcome (accepted or the refusal code) and whether the caller's "
            "identity was verified (mutual TLS) or only claimed", ("service", "outcome",
                                                                  "source"))
        self._families = (self.connections, self.bytes, self.connect_failures, self.duration,
                          self.inbound)
        if registry is not None:
            registry.register(self)

    def service(self, name: str) -> str:
        return name if name and self._known(name) else UNKNOWN

    def collect(self) -> Iterator[Any]:
        for family in self._families:
            yield family.family()


__all__ = ["DURATION_BUCKETS", "TcpMetrics"]
