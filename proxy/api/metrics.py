# layer: shell — serves /metrics (trio)
"""Prometheus exposition of the agent: `GET /metrics` on the local API.

Gossip and policy keep plain counters in their sans-IO cores (``Membership.stats``,
``PolicyStore.counts``/``rejections``); copying them into Prometheus objects on every
change would put the client library in the protocol's hot path. Instead a collector
reads them when Prometheus scrapes. The data plane registers its own request metrics
(counters and histograms it updates itself) on the same registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .router import Router
from .server import Request, Response

#: Membership.stats keys exported as counters, with their help text.
GOSSIP_COUNTERS = {
    "packets_in": "UDP packets received",
    "packets_out": "UDP packets sent",
    "bytes_in": "UDP bytes received",
    "bytes_out": "UDP bytes sent",
    "packets_malformed": "packets dropped because they did not decode",
    "packets_unauthenticated": "packets dropped because they did not authenticate",
    "streams_in": "stream exchanges accepted",
    "streams_malformed": "streams dropped because they did not decode",
    "streams_unauthenticated": "streams dropped because they did not authenticate",
    "probes": "failure-detector probes started",
    "probes_failed": "probes that got no ack, directly or indirectly",
    "probes_rescued_by_tcp": "probes answered only over TCP",
    "suspicions_raised": "members this agent suspected after its own probe of them failed",
    "suspicions_heard": "suspicions of other members this agent took from others (gossip, "
                        "push-pull, a failure heard before its own suspicion's minimum)",
    "refutations": "times this agent refuted a suspicion of itself",
    "failures_declared": "members this agent declared failed",
    "user_messages_in": "application (catalog, policy) messages received",
    "user_messages_out": "application (catalog, policy) messages sent",
}


#: MeshTls.stats keys exported as counters (the sidecar hop's mutual TLS).
TLS_COUNTERS = {
    "handshakes": "verified mutual TLS handshakes, both directions",
    "handshake_failures": "handshakes refused: no or a stranger's certificate, another "
                          "cluster, plaintext, too slow",
    "reloads": "renewed certificate files loaded",
    "reload_failures": "renewed certificate files that did not load (old ones kept)",
}


class AgentCollector(Collector):
    """Reads the cores' counters at scrape time."""

    def __init__(self, gossip: Callable[[], dict[str, Any]] | None = None,
                 policy: Callable[[], dict[str, Any]] | None = None,
                 tls: Callable[[], dict[str, int]] | None = None,
                 spans: Callable[[], Mapping[str, int]] | None = None) -> None:
        self._gossip = gossip
        self._policy = policy
        self._tls = tls
        self._spans = spans

    def collect(self) -> Iterator[Any]:
        if self._gossip is not None:
            yield from _gossip_families(self._gossip())
        if self._policy is not None:
            yield from _policy_families(self._policy())
        if self._tls is not None:
            for key, n in sorted(self._tls().items()):
                c = CounterMetricFamily(f"rumor_tls_{key}", TLS_COUNTERS.get(key, key))
                c.add_metric([], float(n))
                yield c
        if self._spans is not None:
            yield from _span_families(self._spans())


def _span_families(stats: Mapping[str, int]) -> Iterator[Any]:
    rec = CounterMetricFamily("rumor_trace_spans_recorded", "spans queued for export")
    rec.add_metric([], float(stats.get("recorded", 0)))
    yield rec
    out = CounterMetricFamily("rumor_trace_spans_exported",
                              "spans the OTLP collector accepted")
    out.add_metric([], float(stats.get("exported", 0)))
    yield out
    lost = CounterMetricFamily(
        "rumor_trace_spans_dropped", "spans not exported, by reason (queue_full: the "
        "collector was slow or down; export_failed: retries ran out; rejected: the "
        "collector refused them)", labels=["reason"])
    for reason, key in (("queue_full", "dropped_queue_full"),
                        ("export_failed", "dropped_export_failed"), ("rejected", "rejected")):
        lost.add_metric([reason], float(stats.get(key, 0)))
    yield lost


def _gossip_families(health: dict[str, Any]) -> Iterator[Any]:
    stats = health.get("stats", {})
    for key, text in GOSSIP_COUNTERS.items():
        c = CounterMetricFamily(f"rumor_gossip_{key}", text)
        c.add_metric([], float(stats.get(key, 0)))
        yield c
    members = GaugeMetricFamily("rumor_gossip_members", "members by status",
                                labels=["status"])
    for status, n in sorted(health.get("members", {}).items()):
        members.add_metric([status], float(n))
    yield members
    aw = GaugeMetricFamily("rumor_gossip_awareness",
                           "Lifeguard local health score (0 = healthy)")
    aw.add_metric([], float(health.get("awareness", 0)))
    yield aw
    enc = health.get("encryption")
    if enc is not None:
        keys = GaugeMetricFamily("rumor_gossip_keys", "gossip keys installed")
        keys.add_metric([], float(enc.get("keys", 0)))
        yield keys
        refused = CounterMetricFamily(
            "rumor_gossip_refused", "packets and streams that did not open, by reason "
            "(plaintext, unknown_key, stale, replayed, malformed)", labels=["reason"])
        for reason, n in sorted(enc.get("refused", {}).items()):
            refused.add_metric([reason], float(n))
        yield refused


def _policy_families(status: dict[str, Any]) -> Iterator[Any]:
    stats = status.get("stats", {})
    held = GaugeMetricFamily("rumor_policy_documents", "policy documents held")
    held.add_metric([], float(stats.get("held", 0)))
    yield held
    acc = CounterMetricFamily("rumor_policy_accepted", "policy documents accepted")
    acc.add_metric([], float(stats.get("accepted", 0)))
    yield acc
    rej = CounterMetricFamily("rumor_policy_rejected", "policy documents rejected, by reason",
                              labels=["reason"])
    for reason, n in sorted(stats.get("rejected", {}).items()):
        rej.add_metric([reason], float(n))
    yield rej
    for key, text in (("conflicts", "equivocations seen (same name and version, "
                       "different documents)"),
                      ("revoked", "documents dropped because a key rotation revoked "
                       "their signers"),
                      ("expired", "documents dropped at their expiry")):
        c = CounterMetricFamily(f"rumor_policy_{key}", text)
        c.add_metric([], float(stats.get(key, 0)))
        yield c
    tv = GaugeMetricFamily("rumor_policy_trust_version", "version of the trusted key set")
    tv.add_metric([], float(status.get("trust", {}).get("version", 0)))
    yield tv


class _Snapshot:
    """Metric families collected on the event loop, for rendering off it."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families


def add_metrics_route(router: Router, registry: CollectorRegistry) -> None:
    async def metrics(request: Request) -> Response:
        # Collecting reads the cores' state, so it happens here, on the loop, and is
        # quick (copies of counters); formatting the text is the slow part and runs in
        # a worker thread, so a large scrape never stalls gossip.
        families = list(registry.collect())
        text = await trio.to_thread.run_sync(generate_latest, _Snapshot(families))
        return Response(200, [("content-type", CONTENT_TYPE_LATEST)], text)

    router.add("GET", "/metrics", metrics)
