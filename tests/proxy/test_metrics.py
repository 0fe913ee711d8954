"""Prometheus metrics stay bounded whatever the network sends, and `/metrics` renders off
the event loop."""

from __future__ import annotations

import trio
from prometheus_client import CollectorRegistry, generate_latest

from rumor.proxy.api.metrics import add_metrics_route
from rumor.proxy.api.router import Router
from rumor.proxy.api.server import Request
from rumor.proxy.metrics import UNKNOWN, ProxyMetrics

KNOWN = {"web", "api"}


def test_100k_distinct_host_names_leave_the_exposition_flat() -> None:
    registry = CollectorRegistry()
    m = ProxyMetrics(registry, known=KNOWN.__contains__)
    for i in range(1000):
        m.request_done("inbound", f"scan-{i}.example", "", 404)
    size = len(generate_latest(registry))
    for i in range(1000, 100_000):
        m.request_done("inbound", f"scan-{i}.example", "", 404)
        m.observe_latency("inbound", f"scan-{i}.example", 0.001)
        m.denied.inc((m.service(f"x{i}"), m.caller(f"caller-{i}")))
    text = generate_latest(registry)
    assert len(text) < size + 4096  # one "unknown" series per family, not 100k
    assert b"scan-" not in text and b"caller-" not in text
    assert f'service="{UNKNOWN}"'.encode() in text


def test_known_services_keep_their_labels_and_odd_statuses_fold() -> None:
    registry = CollectorRegistry()
    m = ProxyMetrics(registry, known=KNOWN.__contains__)
    m.request_done("outbound", "web", "n1/web-1", 200)
    m.request_done("outbound", "web", "n1/web-1", 999)
    m.request_done("outbound", "nope", "n1/web-1", 200)
    text = generate_latest(registry).decode()
    assert 'service="web",status="200"' in text and 'status="0"' in text
    assert 'instance="",listener="outbound",service="unknown"' in text


def test_metrics_are_rendered_in_a_worker_thread() -> None:
    registry = CollectorRegistry()
    ProxyMetrics(registry).request_done("inbound", "web", "", 200)
    router = Router()
    add_metrics_route(router, registry)
    threads: list[str] = []
    original = trio.to_thread.run_sync

    async def spy(fn, *args, **kw):  # type: ignore[no-untyped-def]
        threads.append(getattr(fn, "__name__", "?"))
        return await original(fn, *args, **kw)

    async def main() -> bytes:
        trio.to_thread.run_sync = spy  # type: ignore[assignment]
        try:
            resp = await router(Request("GET", "/metrics"))
        finally:
            trio.to_thread.run_sync = original
        return resp.body

    body = trio.run(main)
    assert b"rumor_proxy_requests_total" in body and threads == ["generate_latest"]


def test_in_place_histogram_renders_what_the_client_library_would() -> None:
    """The request path keeps plain bucket counts; the scrape must still say exactly what
    a prometheus_client Histogram fed the same observations says."""
    from prometheus_client import Histogram

    from rumor.proxy.metrics import LATENCY_BUCKETS

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    m = ProxyMetrics(ours, known=KNOWN.__contains__)
    h = Histogram("rumor_proxy_request_duration_seconds", "time to response headers, by "
                  "listener and service", ["listener", "service"], buckets=LATENCY_BUCKETS,
                  registry=theirs)
    values = [0.0, 0.0005, 0.00051, 0.001, 0.003, 0.2, 15.0, 16.0, 1e-9, 0.0024999]
    for v in values:
        m.observe_latency("outbound", "web", v)
        h.labels("outbound", "web").observe(v)
    ours_text = generate_latest(ours).decode().splitlines()
    theirs_text = generate_latest(theirs).decode().splitlines()

    def series(lines: list[str]) -> list[str]:
        return [x for x in lines if x.startswith("rumor_proxy_request_duration_seconds_")
                and "_created" not in x]
    assert series(ours_text) == series(theirs_text)
    assert any('le="0.0005",listener="outbound",service="web"} 3.0' in x
               for x in ours_text)  # le is inclusive


def test_counters_count_in_place_and_render_sorted() -> None:
    registry = CollectorRegistry()
    m = ProxyMetrics(registry, known=KNOWN.__contains__)
    for _ in range(3):
        m.retries.inc(("web",))
    m.protocol_errors.inc(("outbound", 431))
    text = generate_latest(registry).decode()
    assert 'rumor_proxy_retries_total{service="web"} 3.0' in text
    assert 'rumor_proxy_client_errors_total{listener="outbound",status="431"} 1.0' in text


def test_a_counter_adds_amounts_within_the_same_series_cap() -> None:
    from rumor.proxy.metrics import MAX_SERIES, CounterFamily
    f = CounterFamily("rumor_test_bytes", "bytes", ("service",))
    f.add(("db",), 100)
    f.add(("db",), 28)
    f.add(("db",), 0)  # nothing moved: no change, and no series made for it
    f.add(("idle",), 0)
    assert f.values == {("db",): 128}
    for i in range(MAX_SERIES - 1):  # with db: the cap is full
        f.add((f"s{i}",), 1)
    f.add(("one-too-many",), 5)
    assert ("one-too-many",) not in f.values and f.values[(UNKNOWN,)] == 5
