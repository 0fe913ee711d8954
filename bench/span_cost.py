#!/usr/bin/env python3
"""CPU per span of each part of tracing, in microseconds (median of rounds):

- ``record``: the observer call on a sampled request (``SpanRecorder.request_ended``),
  and on an unsampled one (what every request pays once a ratio applies);
- ``encode``: rumor's OTLP encoding (``spans.ExportBatch``: a copy of the cached
  prototype plus ids, times, path), with a mix of 4 services x 3 instances x 50 paths;
- ``build``: the same spans built attribute by attribute with the same messages (what
  the prototype saves);
- ``sdk``: the OpenTelemetry Python SDK making the same spans (start, 10 attributes,
  end) and its OTLP encoder (``encode_spans``), when ``opentelemetry-sdk`` and
  ``opentelemetry-exporter-otlp-proto-common`` are installed (they are not rumor
  dependencies: ``pip install`` them to compare).

    python3 bench/span_cost.py [--spans 512] [--rounds 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span

from rumor.proxy.headers import new_id
from rumor.proxy.observe import Exchange
from rumor.proxy.spans import SpanEncoder, SpanRecorder


def exchanges(n: int, rng: random.Random, sampled: bool = True) -> list[Exchange]:
    out = []
    for i in range(n):
        svc = f"svc-{i % 4}"
        out.append(Exchange("outbound", b"GET", f"/api/items/{i % 50}?page=2".encode(),
                            "127.0.0.1:40000", 100.0 + i * 1e-4, service=svc, source="shop",
                            trace=new_id(rng, 16).decode(), span=new_id(rng, 8),
                            parent_span=new_id(rng, 8), sampled=sampled, tries=1,
                            instance=f"node-{i % 3}/{svc}-{i % 3}", status=200,
                            headers_at=100.0 + i * 1e-4 + 0.001))
    return out


def per_span(fn: Callable[[], object], n: int, rounds: int) -> tuple[float, float, float]:
    fn()  # warm: prototypes built, imports done
    times = []
    for _ in range(rounds):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) / n * 1e6)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spans", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    n, rng = a.spans, random.Random(1)
    xs = exchanges(n, rng)
    unsampled = exchanges(n, rng, sampled=False)
    ended = [(x, x.started + 0.002, True) for x in xs]

    def record(batch: list[Exchange]) -> Callable[[], object]:
        def go() -> None:
            rec = SpanRecorder(rng, capacity=n + 1, batch=n + 1)
            for x in batch:
                rec.request_ended(x, x.started + 0.002, 100, True)
        return go

    enc = SpanEncoder("node-1", "0.2.0", "shop")

    def encode() -> bytes:
        b = enc.batch()
        b.add(ended, 1.7e9)
        return b.encode()

    def build() -> bytes:
        ss = ScopeSpans()
        for x, end, _ in ended:
            s = ss.spans.add(name="GET", kind=Span.SPAN_KIND_CLIENT,
                             trace_id=bytes.fromhex(x.trace), span_id=bytes.fromhex(
                                 x.span.decode()), parent_span_id=bytes.fromhex(
                                 x.parent_span.decode()),
                             start_time_unix_nano=int((x.started + 1.7e9) * 1e9),
                             end_time_unix_nano=int((end + 1.7e9) * 1e9))
            for k, v in (("http.request.method", "GET"), ("server.address", x.service),
                         ("peer.service", x.service), ("rumor.instance", x.instance),
                         ("url.path", x.target.split(b"?")[0].decode())):
                s.attributes.append(KeyValue(key=k, value=AnyValue(string_value=v)))
            for k, i in (("http.response.status_code", 200), ("rumor.tries", 1)):
                s.attributes.append(KeyValue(key=k, value=AnyValue(int_value=i)))
            s.attributes.append(KeyValue(key="rumor.mtls", value=AnyValue(bool_value=False)))
        data: bytes = ss.SerializeToString()
        return data

    rows = [("record, sampled", per_span(record(xs), n, a.rounds)),
            ("record, unsampled", per_span(record(unsampled), n, a.rounds)),
            ("encode (prototype)", per_span(encode, n, a.rounds)),
            ("build per span", per_span(build, n, a.rounds))]
    sdk = sdk_cost(xs, n, a.rounds)
    if sdk is not None:
        rows.append(("OpenTelemetry SDK + encode_spans", sdk))
    size = len(encode()) / n
    print(f"{n} spans a batch, {a.rounds} rounds; encoded size {size:.0f} bytes a span")
    for name, (med, lo, hi) in rows:
        print(f"  {name:34s} {med:7.2f} µs/span  (range {lo:.2f}-{hi:.2f})")


def sdk_cost(xs: list[Exchange], n: int, rounds: int) -> tuple[float, float, float] | None:
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
    except ImportError:
        print("(the OpenTelemetry SDK is not installed: its row is left out)")
        return None

    class Keep(SpanExporter):
        def __init__(self) -> None:
            self.spans: list[object] = []

        def export(self, spans):  # type: ignore[no-untyped-def]
            self.spans.extend(spans)

    def go() -> None:
        keep = Keep()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(keep))
        tracer = provider.get_tracer("rumor.proxy")
        for x in xs:
            s = tracer.start_span("GET", start_time=int(x.started * 1e9))
            s.set_attributes({"http.request.method": "GET", "server.address": x.service,
                              "peer.service": x.service, "rumor.instance": x.instance,
                              "url.path": x.target.split(b"?")[0].decode(),
                              "http.response.status_code": 200, "rumor.tries": 1,
                              "rumor.mtls": False, "rumor.route.rule": "",
                              "error.type": ""})
            s.end(end_time=int((x.started + 0.002) * 1e9))
        encode_spans(keep.spans).SerializeToString()  # type: ignore[arg-type]

    return per_span(go, n, rounds)


if __name__ == "__main__":
    main()
