"""Spans: one per proxied request on each sidecar, encoded as OTLP (sans-IO).

The outbound listener records a *client* span, the inbound listener a *server* span.
Both are this hop's own span in the ``traceparent`` the sidecar already writes
(``headers.continue_trace``): the outbound span's id is the parent the inbound sidecar
reads, and the inbound span's id is the parent the application sees. So the two
sidecars' spans join into one trace with no state shared between them.

Recording is one observer call at the end of a request: an unsampled request costs one
test; a sampled one appends its ``Exchange`` to a bounded queue (``MAX_QUEUED``; past it
spans are dropped and counted, never waited for). The exporter (``otlp.py``) takes
batches and has them encoded here, off the request path.

Encoding uses the OpenTelemetry project's own protobuf messages. Building each span's
attributes is most of the cost (about 20 µs a span), so the attributes that repeat —
everything but the ids, the times and the path — are built once per kind of request
(``_Prototypes``: listener, method, service, route rule, instance, status, ...) and
merged into each span (``bench/span_cost.py``: about 5 µs a span against 25 µs).

Attributes follow OpenTelemetry's HTTP semantic conventions where one fits
(``http.request.method``, ``http.response.status_code``, ``server.address``,
``url.path``, ``http.request.resend_count``, ``error.type``, ``peer.service``) and are
``rumor.*`` where the mesh decided something (instance, tries, route rule, fault, mutual
TLS). ``http.route`` is not set: a sidecar does not know the application's route
templates, and a rumor route rule is not one. Query strings are never exported (they
may hold secrets).
"""

from __future__ import annotations

import random
from binascii import unhexlify
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, Status

from .headers import SAMPLE_ALL, continue_trace
from .observe import Exchange, NullObserver

#: Spans held for export at most; past it new spans are dropped and counted.
MAX_QUEUED = 4096
#: Spans per export request (the exporter also sends what it has every interval).
BATCH = 256
#: Prototypes kept at most (their keys come from requests: bounded, then rebuilt).
MAX_PROTOTYPES = 1024
SCOPE = "rumor.proxy"

_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS",
                      b"TRACE", b"PATCH"})

#: A finished request as the queue holds it: the exchange, when it ended (the
#: listener's clock), and whether the response completed.
Ended = tuple[Exchange, float, bool]


class SpanRecorder(NullObserver):
    """Queues sampled requests for export. ``on_batch`` runs when a batch is ready
    (the exporter's wake-up); ``ids`` and ``threshold`` give a trace to a request the
    sidecar answered before it wrote a ``traceparent`` (a refusal)."""

    def __init__(self, ids: random.Random, *, threshold: int = SAMPLE_ALL,
                 capacity: int = MAX_QUEUED, batch: int = BATCH,
                 on_batch: Callable[[], None] | None = None) -> None:
        self.ids = ids
        self.threshold = threshold
        self.capacity = capacity
        self.batch = batch
        self.on_batch = on_batch
        self.pending: list[Ended] = []
        #: "recorded", "dropped_queue_full" (the exporter adds its own outcomes).
        self.stats: Counter[str] = Counter()

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        if not x.span:
            self._trace_refusal(x)
        if not x.sampled:
            return
        pending = self.pending
        if len(pending) >= self.capacity:
            self.stats["dropped_queue_full"] += 1
            return
        pending.append((x, now, complete))
        self.stats["recorded"] += 1
        if len(pending) == self.batch and self.on_batch is not None:
            self.on_batch()

    def take(self, n: int = BATCH) -> list[Ended]:
        """The oldest ``n`` queued spans, removed from the queue."""
        out, self.pending[:n] = self.pending[:n], []
        return out

    def _trace_refusal(self, x: Exchange) -> None:
        """A request answered before any ``traceparent`` was written still gets its
        span: in the caller's trace when it sent one, else in a new one."""
        hs = [(k, v) for k, v in x.headers or () if k == b"traceparent"]
        trace, x.parent_span, x.span, x.sampled = continue_trace(hs, self.ids, self.threshold)
        x.trace = trace.decode()


# ---- encoding ------------------------------------------------------------------------------

def _attr(key: str, value: str | int | bool) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _error_type(x: Exchange, complete: bool) -> str | None:
    """``error.type`` as the HTTP conventions define it: a client span fails at 4xx and
    up, a server span at 5xx; the sidecar's own reason code says more than a status."""
    if x.code is not None:
        return str(x.code)
    if x.status >= (400 if x.listener == "outbound" else 500):
        return str(x.status)
    if not complete:
        return "response_incomplete"
    return None


class _Prototypes:
    """One prototype span per kind of request: what every span of that kind shares."""

    def __init__(self) -> None:
        self._made: dict[tuple[object, ...], Span] = {}

    def of(self, x: Exchange, complete: bool) -> Span:
        key = (x.listener, x.method, x.service, x.source, x.secured, x.route_rule, x.fault,
               x.instance, x.tries, x.status, x.code, complete)
        proto = self._made.get(key)
        if proto is None:
            if len(self._made) >= MAX_PROTOTYPES:
                self._made.clear()
            proto = self._made[key] = self._build(x, complete)
        return proto

    @staticmethod
    def _build(x: Exchange, complete: bool) -> Span:
        outbound = x.listener == "outbound"
        method = x.method.decode("latin-1") if x.method in _METHODS else "_OTHER"
        attrs = [_attr("http.request.method", method)]
        if method == "_OTHER":
            attrs.append(_attr("http.request.method_original", x.method.decode("latin-1")))
        if x.status:
            attrs.append(_attr("http.response.status_code", x.status))
        if x.service:
            attrs.append(_attr("server.address", x.service))
        peer = x.service if outbound else x.source
        if peer:
            attrs.append(_attr("peer.service", peer))
        if x.instance:
            attrs.append(_attr("rumor.instance", x.instance))
        if outbound:
            attrs.append(_attr("rumor.tries", x.tries))
            if x.tries > 1:
                attrs.append(_attr("http.request.resend_count", x.tries - 1))
        if x.route_rule is not None:
            attrs.append(_attr("rumor.route.rule", x.route_rule))
        if x.fault is not None:
            attrs.append(_attr("rumor.fault.rule", x.fault))
        attrs.append(_attr("rumor.mtls", x.secured))
        error = _error_type(x, complete)
        if error is not None:
            attrs.append(_attr("error.type", error))
        return Span(name=method, kind=Span.SPAN_KIND_CLIENT if outbound
                    else Span.SPAN_KIND_SERVER, attributes=attrs,
                    status=Status(code=Status.STATUS_CODE_ERROR if error is not None
                                  else Status.STATUS_CODE_UNSET))


@dataclass
class ExportBatch:
    """One export request being built, a few spans at a time (so the exporter can let
    requests run between chunks), grouped by the service each span speaks for."""

    encoder: SpanEncoder
    message: ExportTraceServiceRequest
    scopes: dict[str, ScopeSpans]
    count: int = 0

    def add(self, spans: Sequence[Ended], wall_offset: float) -> None:
        """Add spans; ``wall_offset`` turns the listener's clock into Unix time."""
        protos = self.encoder.prototypes
        for x, ended, complete in spans:
            scope = self._scope(self.encoder.service_of(x))
            s = scope.spans.add(
                trace_id=unhexlify(x.trace), span_id=unhexlify(x.span),
                parent_span_id=unhexlify(x.parent_span),
                start_time_unix_nano=int((x.started + wall_offset) * 1e9),
                end_time_unix_nano=int((ended + wall_offset) * 1e9))
            s.MergeFrom(protos.of(x, complete))
            path = x.target.split(b"?", 1)[0]
            if path.startswith((b"http://", b"HTTP://")):
                slash = path.find(b"/", 7)
                path = path[slash:] if slash >= 0 else b"/"
            kv = s.attributes.add()
            kv.key = "url.path"
            kv.value.string_value = path.decode("latin-1")
            if x.reason is not None:
                s.status.message = x.reason
        self.count += len(spans)

    def encode(self) -> bytes:
        data: bytes = self.message.SerializeToString()
        return data

    def _scope(self, service: str) -> ScopeSpans:
        scope = self.scopes.get(service)
        if scope is None:
            rs = self.message.resource_spans.add()
            rs.resource.attributes.extend([_attr("service.name", service),
                                           _attr("service.instance.id", self.encoder.agent)])
            scope = self.scopes[service] = rs.scope_spans.add()
            scope.scope.name = SCOPE
            scope.scope.version = self.encoder.version
        return scope


class SpanEncoder:
    """Encodes queued spans as OTLP export requests. A span speaks for the service
    whose traffic it is: an outbound span for the caller (the sidecar's identity), an
    inbound span for the service called, so a tracing backend shows the application's
    names, with the agent as ``service.instance.id``."""

    def __init__(self, agent: str, version: str, identity: str | None) -> None:
        self.agent = agent
        self.version = version
        self.identity = identity or agent
        self.prototypes = _Prototypes()

    def service_of(self, x: Exchange) -> str:
        if x.listener == "outbound":
            return self.identity
        return x.service or self.identity

    def batch(self) -> ExportBatch:
        return ExportBatch(self, ExportTraceServiceRequest(), {})


# ---- answers -------------------------------------------------------------------------------

#: Statuses after which the same request may be sent again (OTLP/HTTP "retryable").
RETRYABLE = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class ExportOutcome:
    """What the collector's answer means: ``accepted`` spans, ``rejected`` ones (a
    partial success, or an answer that must not be retried), and whether to ``retry``
    the whole request (after ``retry_after`` seconds when the collector said)."""

    accepted: int
    rejected: int
    retry: bool
    message: str = ""
    retry_after: float | None = None


def read_answer(status: int, body: bytes, sent: int,
                retry_after: str | None = None) -> ExportOutcome:
    """The OTLP/HTTP answer to an export of ``sent`` spans (specification, "OTLP/HTTP
    Response"): 200 with an optional partial success; 429/502/503/504 retryable, with
    ``Retry-After`` honoured; any other status rejects the batch for good. Error
    bodies are a ``google.rpc.Status``, whose message (field 2) is read with the
    protobuf runtime's own decoder."""
    if status == 200:
        answer = ExportTraceServiceResponse()
        try:
            answer.ParseFromString(body)
        except DecodeError:
            return ExportOutcome(sent, 0, False, "undecodable success answer (ignored)")
        rejected = min(sent, max(0, answer.partial_success.rejected_spans))
        return ExportOutcome(sent - rejected, rejected, False,
                             answer.partial_success.error_message[:500])
    message = _status_message(body) or f"HTTP {status}"
    if status in RETRYABLE:
        return ExportOutcome(0, 0, True, message, _retry_after(retry_after))
    return ExportOutcome(0, sent, False, message)


def _status_message(body: bytes) -> str:
    holder = Empty()
    try:
        holder.ParseFromString(body)
    except DecodeError:
        return ""
    for f in UnknownFieldSet(holder):
        if f.field_number == 2 and isinstance(f.data, bytes):
            return f.data.decode("utf-8", "replace")[:500]
    return ""


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (an HTTP date is ignored: the backoff applies)."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), 300.0)


@dataclass
class Backoff:
    """Exponential backoff with jitter between tries of one export (OTLP asks for it),
    given up after ``give_up`` seconds: the batch is then dropped and counted."""

    rng: random.Random
    first: float = 1.0
    most: float = 30.0
    give_up: float = 60.0
    _next: float = 0.0

    def delay(self, elapsed: float, asked: float | None = None) -> float | None:
        """Seconds to wait before the next try (None: give up)."""
        if elapsed >= self.give_up:
            return None
        self._next = min(self.most, max(self.first, self._next * 2))
        wait = asked if asked is not None else self._next * (0.5 + self.rng.random() / 2)
        return wait if elapsed + wait < self.give_up else None


__all__ = ["BATCH", "MAX_QUEUED", "Backoff", "Ended", "ExportBatch", "ExportOutcome",
           "SpanEncoder", "SpanRecorder", "read_answer"]
