"""Spans: parent-based sampling in the traceparent, the bounded queue, OTLP encoding
read back with the official messages, and the collector's answers as OTLP says."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from rumor.proxy.headers import SAMPLE_ALL, continue_trace, sample_threshold
from rumor.proxy.observe import Exchange
from rumor.proxy.otlp import ExportSettings, settings_from, traces_url
from rumor.proxy.spans import Backoff, SpanEncoder, SpanRecorder, read_answer

PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-"


def _flag(headers: list[tuple[bytes, bytes]]) -> bytes:
    return next(v for k, v in headers if k == b"traceparent")[-2:]


def test_new_traces_are_sampled_by_the_ratio_of_their_id() -> None:
    ids = random.Random(7)
    threshold = sample_threshold(0.25)
    decisions = []
    for _ in range(4000):
        hs: list[tuple[bytes, bytes]] = []
        trace, parent, span, sampled = continue_trace(hs, ids, threshold)
        assert parent == b"" and len(span) == 16
        assert _flag(hs) == (b"01" if sampled else b"00")
        # The same id decides alike wherever it is seen (TraceIdRatioBased).
        assert sampled == (int(trace[16:], 16) < threshold)
        decisions.append(sampled)
    assert 0.22 < sum(decisions) / len(decisions) < 0.28
    assert not continue_trace([], ids, sample_threshold(0.0))[3]
    assert continue_trace([], ids, SAMPLE_ALL)[3]


def test_a_continued_trace_keeps_its_callers_decision() -> None:
    ids = random.Random(1)
    unsampled = [(b"traceparent", PARENT + b"00")]
    trace, parent, span, sampled = continue_trace(unsampled, ids, SAMPLE_ALL)
    assert not sampled and _flag(unsampled) == b"00"
    assert (trace, parent) == (b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7")
    assert span in unsampled[0][1] and span != parent
    kept = [(b"traceparent", PARENT + b"01")]
    assert continue_trace(kept, ids, sample_threshold(0.0))[3]


def _x(listener: str = "outbound", *, status: int = 200, target: bytes = b"/a?secret=1",
       sampled: bool = True, tries: int = 1, **kw: object) -> Exchange:
    x = Exchange(listener, b"GET", target, "127.0.0.1:5", 10.0, service="web",
                 source="shop", trace="4bf92f3577b34da6a3ce929d0e0e4736",
                 span=b"00f067aa0ba902b7", parent_span=b"b7ad6b7169203331", sampled=sampled,
                 tries=tries, instance="n1/web-1", status=status,
                 **kw)  # type: ignore[arg-type]
    return x


def test_the_recorder_queues_only_sampled_requests_and_drops_past_its_bound() -> None:
    woke = []
    rec = SpanRecorder(random.Random(1), capacity=3, batch=2, on_batch=lambda: woke.append(1))
    rec.request_ended(_x(sampled=False), 11.0, 10, True)
    assert rec.pending == [] and rec.stats["recorded"] == 0
    for _ in range(5):
        rec.request_ended(_x(), 11.0, 10, True)
    assert len(rec.pending) == 3 and woke == [1]
    assert rec.stats == {"recorded": 3, "dropped_queue_full": 2}
    assert len(rec.take(2)) == 2 and len(rec.pending) == 1


def test_a_refusal_before_any_traceparent_gets_a_span_in_the_callers_trace() -> None:
    rec = SpanRecorder(random.Random(1))
    x = Exchange("outbound", b"GET", b"/", "c", 1.0, service="nope", status=503,
                 headers=[(b"traceparent", PARENT + b"01")])
    rec.request_ended(x, 1.5, 0, True)
    assert rec.pending[0][0] is x
    assert x.trace == "4bf92f3577b34da6a3ce929d0e0e4736" and x.parent_span == b"00f067aa0ba902b7"
    assert len(x.span) == 16 and x.sampled


def _decode(data: bytes) -> ExportTraceServiceRequest:
    msg = ExportTraceServiceRequest()
    msg.ParseFromString(data)
    return msg


def _attrs(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in span.attributes:
        which = kv.value.WhichOneof("value")
        assert kv.key not in out, f"attribute {kv.key} twice"
        out[kv.key] = getattr(kv.value, which)
    return out


def test_spans_encode_as_otlp_with_http_conventions_and_the_mesh_decisions() -> None:
    enc = SpanEncoder("node-1", "0.2.0", "shop")
    batch = enc.batch()
    out = _x(tries=2, route_rule="canary")
    inb = _x("inbound", target=b"/b", secured=True)
    failed = _x(status=503, target=b"http://web/c?x", code="no_healthy_instance",
                reason="no healthy instance of web")
    batch.add([(out, 10.25, True), (inb, 10.5, True), (failed, 10.75, True)], 1000.0)
    msg = _decode(batch.encode())
    by_service = {rs.resource.attributes[0].value.string_value: rs
                  for rs in msg.resource_spans}
    assert set(by_service) == {"shop", "web"}  # the caller's spans, the callee's spans
    client = by_service["shop"].scope_spans[0].spans
    server = by_service["web"].scope_spans[0].spans
    assert len(client) == 2 and len(server) == 1
    c = client[0]
    assert c.trace_id.hex() == out.trace and c.span_id.hex() == "00f067aa0ba902b7"
    assert c.parent_span_id.hex() == "b7ad6b7169203331"
    assert c.kind == Span.SPAN_KIND_CLIENT and server[0].kind == Span.SPAN_KIND_SERVER
    assert c.start_time_unix_nano == 1010 * 10**9
    assert c.end_time_unix_nano == 1010_250_000_000
    assert _attrs(c) == {"http.request.method": "GET", "http.response.status_code": 200,
                         "server.address": "web", "peer.service": "web",
                         "rumor.instance": "n1/web-1", "rumor.tries": 2,
                         "http.request.resend_count": 1, "rumor.route.rule": "canary",
                         "rumor.mtls": False, "url.path": "/a"}
    assert c.status.code == Status.STATUS_CODE_UNSET
    s = _attrs(server[0])
    assert s["peer.service"] == "shop" and s["rumor.mtls"] is True and s["url.path"] == "/b"
    f = client[1]
    assert _attrs(f)["error.type"] == "no_healthy_instance" and _attrs(f)["url.path"] == "/c"
    assert f.status.code == Status.STATUS_CODE_ERROR
    assert f.status.message == "no healthy instance of web"


def test_a_prototype_shared_by_many_spans_keeps_each_spans_own_fields() -> None:
    enc = SpanEncoder("node-1", "0.2.0", "shop")
    batch = enc.batch()
    xs = [_x(target=f"/p{i}".encode()) for i in range(3)]
    for i, x in enumerate(xs):
        x.span = b"%016x" % (i + 1)
    batch.add([(x, 11.0, True) for x in xs], 0.0)
    spans = _decode(batch.encode()).resource_spans[0].scope_spans[0].spans
    assert [_attrs(s)["url.path"] for s in spans] == ["/p0", "/p1", "/p2"]
    assert [s.span_id.hex() for s in spans] == ["%016x" % (i + 1) for i in range(3)]
    assert len(enc.prototypes._made) == 1


def test_collector_answers_are_read_as_otlp_http_says() -> None:
    ok = read_answer(200, b"", 10)
    assert (ok.accepted, ok.rejected, ok.retry) == (10, 0, False)
    partial = ExportTraceServiceResponse()
    partial.partial_success.rejected_spans = 3
    partial.partial_success.error_message = "too old"
    p = read_answer(200, partial.SerializeToString(), 10)
    assert (p.accepted, p.rejected, p.message) == (7, 3, "too old")
    busy = read_answer(503, b"", 10, retry_after="7")
    assert busy.retry and busy.retry_after == 7.0 and busy.rejected == 0
    assert read_answer(429, b"", 10, retry_after="Wed, 21 Oct 2015").retry_after is None
    # A google.rpc.Status body: its message is field 2 (any message with a string
    # field 2 encodes it the same way).
    status_body = InstrumentationScope(version="bad span").SerializeToString()
    bad = read_answer(400, status_body, 10)
    assert (bad.retry, bad.rejected, bad.message) == (False, 10, "bad span")
    assert read_answer(500, b"\xff\xff", 4) == read_answer(500, b"", 4)


@given(st.integers(100, 599), st.binary(max_size=300), st.integers(0, 5000),
       st.one_of(st.none(), st.text(max_size=20)))
def test_any_collector_answer_reads_without_raising(status: int, body: bytes, sent: int,
                                                    retry_after: str | None) -> None:
    out = read_answer(status, body, sent, retry_after)
    assert 0 <= out.accepted <= sent and 0 <= out.rejected <= sent
    assert out.accepted + out.rejected == (0 if out.retry else sent)


def test_backoff_grows_honours_retry_after_and_gives_up() -> None:
    b = Backoff(random.Random(3), first=1.0, most=8.0, give_up=20.0)
    waits = []
    elapsed = 0.0
    while (w := b.delay(elapsed)) is not None:
        waits.append(w)
        elapsed += w
    assert len(waits) >= 3 and elapsed < 20.0
    assert all(w <= 8.0 for w in waits) and waits[-1] > waits[0]
    assert Backoff(random.Random(1)).delay(0.0, asked=5.0) == 5.0
    assert Backoff(random.Random(1), give_up=3.0).delay(0.0, asked=5.0) is None


def test_the_batch_processors_environment_variables_apply_and_bad_ones_are_named() -> None:
    s = settings_from({"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "500",
                       "OTEL_BSP_SCHEDULE_DELAY": "250", "OTEL_EXPORTER_OTLP_TIMEOUT": "3000"})
    assert (s.queue, s.batch, s.interval, s.timeout) == (100, 100, 0.25, 3.0)
    assert settings_from({}) == ExportSettings()
    with pytest.raises(ValueError, match="OTEL_BSP_MAX_QUEUE_SIZE='lots'"):
        settings_from({"OTEL_BSP_MAX_QUEUE_SIZE": "lots"})
    with pytest.raises(ValueError, match="OTEL_BSP_SCHEDULE_DELAY"):
        settings_from({"OTEL_BSP_SCHEDULE_DELAY": "0"})
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
