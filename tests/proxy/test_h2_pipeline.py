"""The HTTP/2 pipeline in process: real H2Outbound/H2Inbound over the real
OutboundProxy/InboundProxy, fake streams and upstreams, virtual time. Per-stream
spreading, retries on gRPC statuses, grpc-timeout and the deadline, hop-by-hop
stripping, refusals as gRPC answers, the gRPC metrics and golden failures."""

from __future__ import annotations

import random
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio
import trio.testing

from rumor.policy.evaluate import Evaluator
from rumor.policy.parser import parse_document
from rumor.proxy import grpc
from rumor.proxy.attempts import Endpoint, Retrying
from rumor.proxy.golden import GoldenMetrics, summarise
from rumor.proxy.h2_inbound import H2Inbound
from rumor.proxy.h2_outbound import H2Outbound
from rumor.proxy.inbound import InboundProxy
from rumor.proxy.mesh_view import LocalInstance
from rumor.proxy.metrics import ProxyMetrics
from rumor.proxy.observe import observers
from rumor.proxy.outbound import OutboundProxy
from rumor.proxy.pool import TryFailed

from .pipeline_fakes import FakeMesh, Recorder

Fields = list[tuple[bytes, bytes]]
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


@dataclass
class Answer:
    """What an instance does with a stream (the last of a script repeats)."""

    status: int = 200
    headers: Fields = field(default_factory=lambda: [(b"content-type", b"application/grpc")])
    trailers_only: bool = False
    body: list[bytes] = field(default_factory=lambda: [b"\0\0\0\0\x01x"])
    trailers: Fields | None = field(default_factory=lambda: [(b"grpc-status", b"0")])
    delay: float = 0.001
    fail: str | None = None


def unavailable() -> Answer:
    return Answer(headers=grpc.answer(grpc.UNAVAILABLE, "down"), trailers_only=True)


class FakeCall:
    def __init__(self, a: Answer) -> None:
        self.a = a
        self.connect_seconds = 0.0
        self.trailers: Fields | None = None
        self.sent: list[bytes] = []
        self.ended = False
        self.was_reset = False
        self._body = list(a.body)

    async def send(self, data: bytes, *, end_stream: bool = False) -> None:
        self.sent.append(data)
        self.ended = self.ended or end_stream

    async def end(self, trailers: Fields | None = None) -> None:
        self.ended = True

    async def response(self) -> tuple[int, Fields, bool]:
        await trio.sleep(self.a.delay)
        if self.a.fail:
            raise TryFailed(self.a.fail, "scripted")
        return self.a.status, self.a.headers, self.a.trailers_only

    async def receive(self) -> bytes:
        if self._body:
            return self._body.pop(0)
        self.trailers = self.a.trailers
        return b""

    def reset(self, code: int = 0x8) -> None:
        self.was_reset = True


class FakeUpstreams:
    """Instances by port, each with a script; every opened stream is kept."""

    def __init__(self) -> None:
        self.scripts: dict[int, list[Answer]] = {}
        self.opened: list[tuple[int, Fields, FakeCall]] = []

    def has_idle(self, host: str, port: int) -> bool:
        return True

    async def open(self, origin: tuple[str, int], *, method: bytes, scheme: bytes,
                   authority: bytes, path: bytes, headers: Fields, end_stream: bool,
                   connect_deadline: float, service: str | None = None) -> FakeCall:
        script = self.scripts.setdefault(origin[1], [Answer()])
        n = sum(1 for p, _, _ in self.opened if p == origin[1])
        c = FakeCall(script[min(n, len(script) - 1)])
        self.opened.append((origin[1], headers, c))
        return c

    def ports(self) -> list[int]:
        return [p for p, _, _ in self.opened]


class FakeStream:
    """What a handler reads of a request stream, and what it was answered."""

    def __init__(self, headers: Fields | None = None, *, authority: bytes = b"greet",
                 path: bytes = b"/greet.Greeter/Hello", body: list[bytes] | None = None,
                 peer: Any = None) -> None:
        self.method, self.scheme, self.authority, self.path = b"POST", b"http", authority, path
        self.headers = GRPC + (headers or [])
        self.client = "127.0.0.1:5555"
        self.peer = peer
        self.stream_id = 1
        self._body = list(body or [])
        self.end_stream = not self._body
        self.trailers: Fields | None = None
        self.headers_sent = False
        self.status: int | None = None
        self.head: Fields = []
        self.data: list[bytes] = []
        self.sent_trailers: Fields | None = None
        self.done = False
        self.was_reset = False

    async def receive(self) -> bytes:
        return self._body.pop(0) if self._body else b""

    async def respond(self, status: int, headers: Fields, *, end_stream: bool = False) -> None:
        assert not self.headers_sent
        self.status, self.head, self.headers_sent = status, headers, True
        self.done = end_stream

    async def send(self, data: bytes, *, end_stream: bool = False) -> None:
        self.data.append(data)
        self.done = self.done or end_stream

    async def send_trailers(self, trailers: Fields) -> None:
        self.sent_trailers, self.done = trailers, True

    def reset(self, code: int = 0x8) -> None:
        self.was_reset = True

    def field(self, name: bytes, where: str = "head") -> bytes | None:
        fields = self.head if where == "head" else (self.sent_trailers or [])
        return next((v for k, v in fields if k == name), None)


def grpc_endpoints(mesh: FakeMesh, service: str, n: int, *, carries: bool = True,
                   protocol: str = "grpc") -> list[Endpoint]:
    eps = mesh.services.setdefault(service, [])
    for k in range(len(eps), len(eps) + n):
        eps.append(Endpoint(f"node{k}/{service}-{k}", f"node{k}", f"{service}-{k}", "v1", (),
                            "127.0.0.1", 20000 + k, 0.001, protocol=protocol,
                            carries=frozenset({"h2"}) if carries else frozenset()))
    mesh.version += 1
    return eps


def run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def _ev(body: str = "") -> Evaluator:
    if not body:
        return Evaluator([])
    return Evaluator([parse_document(textwrap.dedent(
        'kind = "resilience"\nname = "g"\nversion = 1\nservice = "greet"\n' + body),
        source="test")])


def setup(n: int = 3, ev: Evaluator | None = None, **kw: Any,
          ) -> tuple[FakeMesh, FakeUpstreams, Recorder, H2Outbound]:
    mesh, ups, rec = FakeMesh(), FakeUpstreams(), Recorder()
    grpc_endpoints(mesh, "greet", n, **kw)
    evaluator = ev or _ev()
    proxy = OutboundProxy(mesh, lambda: evaluator, identity="caller", observer=rec,
                          rng=random.Random(1), agent="test-agent")
    return mesh, ups, rec, H2Outbound(proxy, cast(Any, ups))


async def stream(handler: Any, s: FakeStream) -> FakeStream:
    await handler(s)
    return s


# ---- balancing and retries -------------------------------------------------------------


def test_streams_of_one_client_spread_over_every_instance() -> None:
    async def main() -> None:
        _, ups, rec, h = setup(3)
        for _ in range(60):
            s = await stream(h, FakeStream())
            assert s.status == 200 and s.field(b"grpc-status", "trailers") == b"0"
        counts = {p: ups.ports().count(p) for p in set(ups.ports())}
        assert sorted(counts) == [20000, 20001, 20002] and min(counts.values()) >= 5
        assert len(rec.ended) == 60 and all(x.grpc_status == 0 for x, _, _ in rec.ended)
    run(main)


def test_unavailable_trailers_only_is_retried_on_another_instance() -> None:
    async def main() -> None:
        _, ups, rec, h = setup(2)
        # One instance answers UNAVAILABLE: whoever goes there first is retried.
        ups.scripts[20000] = [unavailable()]
        ups.scripts[20001] = [Answer()]
        oks = 0
        for _ in range(10):
            s = await stream(h, FakeStream())
            oks += s.field(b"grpc-status", "trailers") == b"0"
        assert oks == 10
        assert any(isinstance(e, Retrying) for e in rec.decisions)
        assert ("node0/greet-0", "200") in rec.tries  # a trailers-only answer is a 200 try
    run(main)


def test_a_status_outside_grpc_on_is_delivered_not_retried() -> None:
    async def main() -> None:
        _, ups, _, h = setup(2, _ev('[retries]\ngrpc_on = ["resource-exhausted"]\n'))
        for port in (20000, 20001):
            ups.scripts[port] = [Answer(headers=grpc.answer(grpc.UNAVAILABLE, "down"),
                                        trailers_only=True)]
        s = await stream(h, FakeStream())
        assert s.status == 200 and s.done and s.field(b"grpc-status") == b"14"
        assert s.field(b"grpc-message") == b"down" and len(ups.opened) == 1
    run(main)


def test_no_retry_once_the_response_began() -> None:
    async def main() -> None:
        _, ups, _, h = setup(2)
        for port in (20000, 20001):
            ups.scripts[port] = [Answer(trailers=[(b"grpc-status", b"14")])]
        s = await stream(h, FakeStream())
        assert s.field(b"grpc-status", "trailers") == b"14" and len(ups.opened) == 1
    run(main)


def test_a_large_streamed_body_is_sent_once_and_whole() -> None:
    async def main() -> None:
        _, ups, _, h = setup(2)
        for port in (20000, 20001):
            ups.scripts[port] = [unavailable()]
        chunks = [b"x" * 30_000] * 4  # beyond the 64 KiB retry buffer
        await stream(h, FakeStream(body=chunks))
        assert len(ups.opened) == 1
        assert b"".join(ups.opened[0][2].sent) == b"".join(chunks)
    run(main)


# ---- grpc-timeout ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "seconds"), [(b"1S", 1.0), (b"250m", 0.25), (b"3M", 180.0),
                                              (b"1H", 3600.0), (b"500u", 5e-4),
                                              (b"99999999n", 0.099999999)])
def test_grpc_timeout_units(raw: bytes, seconds: float) -> None:
    assert grpc.parse_timeout(raw) == pytest.approx(seconds)
    assert grpc.parse_timeout(grpc.format_timeout(seconds)) == pytest.approx(seconds, rel=1e-6)


@pytest.mark.parametrize("raw", [b"", b"S", b"1s", b"123456789S", b"-1S", b"1.5S", b"1 S"])
def test_a_bad_grpc_timeout_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="grpc-timeout"):
        grpc.parse_timeout(raw)

    async def main() -> None:
        _, ups, _, h = setup(1)
        s = await stream(h, FakeStream([(b"grpc-timeout", raw)]))
        assert s.field(b"grpc-status") == b"13" and not ups.opened
        assert s.field(b"x-rumor-error-code") == b"bad_request"
    run(main)


def test_the_deadline_ends_the_call_with_deadline_exceeded_and_resets_upstream() -> None:
    async def main() -> None:
        _, ups, rec, h = setup(1)
        ups.scripts[20000] = [Answer(delay=5.0)]
        t0 = trio.current_time()
        s = await stream(h, FakeStream([(b"grpc-timeout", b"200m")]))
        assert trio.current_time() - t0 == pytest.approx(0.2)
        assert s.status == 200 and s.done and s.field(b"grpc-status") == b"4"
        assert ups.opened[0][2].was_reset
        sent = dict(ups.opened[0][1])
        assert grpc.parse_timeout(sent[b"grpc-timeout"]) <= 0.2
        x = rec.ended[0][0]
        assert x.grpc_status == 4 and x.code == "overall_timeout" and len(rec.ended) == 1
    run(main)


def test_the_deadline_after_the_head_ends_with_trailers() -> None:
    async def main() -> None:
        _, ups, _, h = setup(1)

        class Slow(FakeCall):
            async def receive(self) -> bytes:
                await trio.sleep(10)
                return b""
        ups.open = _opener(ups, Slow)  # type: ignore[method-assign]
        s = await stream(h, FakeStream([(b"grpc-timeout", b"1S")]))
        assert s.status == 200 and s.field(b"grpc-status", "trailers") == b"4"
    run(main)


def _opener(ups: FakeUpstreams, kind: type[FakeCall]) -> Any:
    async def open_(origin: tuple[str, int], **kw: Any) -> FakeCall:
        c = kind(Answer())
        ups.opened.append((origin[1], kw["headers"], c))
        return c
    return open_


# ---- headers -----------------------------------------------------------------------------


def test_hop_by_hop_fields_are_dropped_and_mesh_fields_set() -> None:
    async def main() -> None:
        _, ups, _, h = setup(1)
        await stream(h, FakeStream([(b"connection", b"x-secret"), (b"x-secret", b"1"),
                                    (b"keep-alive", b"5"), (b"upgrade", b"h2c"),
                                    (b"x-rumor-source", b"forged"), (b"x-app", b"kept"),
                                    (b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16
                                     + b"-01")]))
        sent = ups.opened[0][1]
        names = [k for k, _ in sent]
        for gone in (b"connection", b"x-secret", b"keep-alive", b"upgrade", b"host"):
            assert gone not in names
        d = dict(sent)
        assert d[b"te"] == b"trailers" and d[b"x-app"] == b"kept"
        assert d[b"x-rumor-source"] == b"caller" and d[b"x-rumor-instance"] == b"greet-0"
        assert d[b"via"].startswith(b"1.1 rumor-") and d[b"x-forwarded-for"] == b"127.0.0.1"
        assert d[b"traceparent"].startswith(b"00-" + b"a" * 32) and b"b" * 16 not in d[
            b"traceparent"]
    run(main)


# ---- refusals ----------------------------------------------------------------------------


def test_refusals_are_grpc_answers_that_say_why() -> None:
    async def main() -> None:
        _, ups, _, h = setup(1)
        s = await stream(h, FakeStream(authority=b"nothere"))
        assert (s.status, s.done) == (200, True)
        assert s.field(b"grpc-status") == b"14" and s.field(b"x-rumor-error-code") == \
            b"unknown_service"
        assert b"nothere" in (s.field(b"grpc-message") or b"")
        assert not ups.opened
    run(main)


def test_without_an_h2_carrying_agent_the_refusal_says_so() -> None:
    async def main() -> None:
        _, ups, _, h = setup(2, carries=False)
        s = await stream(h, FakeStream())
        assert s.field(b"x-rumor-error-code") == b"protocol_mismatch"
        assert b"carries HTTP/2" in (s.field(b"grpc-message") or b"") and not ups.opened
    run(main)


def test_a_non_grpc_h2_request_gets_the_json_error_body() -> None:
    async def main() -> None:
        _, _, _, h = setup(1)
        s = FakeStream(authority=b"nothere")
        s.headers = []
        await h(s)
        assert s.status == 503 and b'"error":"unknown_service"' in b"".join(s.data)
    run(main)


def test_all_tries_unavailable_delivers_the_last_answer() -> None:
    async def main() -> None:
        _, ups, rec, h = setup(3)
        for p in (20000, 20001, 20002):
            ups.scripts[p] = [unavailable()]
        s = await stream(h, FakeStream())
        assert s.field(b"grpc-status") == b"14" and len(ups.opened) == 3
        assert rec.ended[0][0].grpc_status == 14
    run(main)


# ---- inbound -----------------------------------------------------------------------------


def _inbound(protocol: str = "grpc") -> tuple[FakeUpstreams, Recorder, H2Inbound]:
    mesh, ups, rec = FakeMesh(), FakeUpstreams(), Recorder()
    mesh.local["greet"] = [LocalInstance("greet-0", "127.0.0.1", 30000, 1,
                                         key="me/greet-0", protocol=protocol)]
    ev = Evaluator([])
    proxy = InboundProxy(mesh, lambda: ev, observer=rec, agent="test-agent")
    return ups, rec, H2Inbound(proxy, cast(Any, ups))


def test_inbound_forwards_to_the_local_instance_without_mesh_fields() -> None:
    async def main() -> None:
        ups, rec, h = _inbound()
        s = await stream(h, FakeStream([(b"x-rumor-source", b"caller"),
                                        (b"x-rumor-instance", b"greet-0")]))
        assert s.field(b"grpc-status", "trailers") == b"0"
        port, sent, _ = ups.opened[0]
        assert port == 30000 and not any(k.startswith(b"x-rumor-") for k, _ in sent)
        assert rec.ended[0][0].source == "caller" and rec.ended[0][0].grpc_status == 0
    run(main)


def test_inbound_refuses_a_stream_for_a_service_declared_http() -> None:
    async def main() -> None:
        ups, _, h = _inbound("http")
        s = await stream(h, FakeStream())
        assert s.field(b"x-rumor-error-code") == b"protocol_mismatch" and not ups.opened
        assert s.field(b"grpc-status") == b"12"
    run(main)


def test_a_dead_local_instance_answers_unavailable_so_the_caller_retries() -> None:
    async def main() -> None:
        ups, _, h = _inbound()
        ups.scripts[30000] = [Answer(fail="connect-failure")]
        s = await stream(h, FakeStream())
        assert s.field(b"grpc-status") == b"14"
        assert s.field(b"x-rumor-error-code") == b"local_connect_failed"
    run(main)


# ---- metrics -----------------------------------------------------------------------------


def test_grpc_statuses_are_counted_and_failures_are_golden_errors() -> None:
    async def main() -> None:
        mesh, ups = FakeMesh(), FakeUpstreams()
        grpc_endpoints(mesh, "greet", 1)
        metrics = ProxyMetrics()
        golden = GoldenMetrics(lambda: 1000.0, trio.current_time())
        ev = _ev()
        proxy = OutboundProxy(mesh, lambda: ev, identity="caller",
                              observer=observers(metrics, golden), rng=random.Random(1))
        h = H2Outbound(proxy, cast(Any, ups))
        ups.scripts[20000] = [Answer(), Answer(trailers=[(b"grpc-status", b"13")]),
                              Answer(trailers=[(b"grpc-status", b"5")])]
        for _ in range(3):
            await h(FakeStream())
        assert metrics.grpc.values == {("outbound", "greet", "ok"): 1,
                                       ("outbound", "greet", "internal"): 1,
                                       ("outbound", "greet", "not-found"): 1}
        assert metrics.requests.values[("outbound", "greet", "node0/greet-0", 200)] == 3
        row = summarise(golden.snapshot(trio.current_time(), 5, end=1005.0))[0]
        assert (row["requests"], row["successes"]) == (3, 2)  # INTERNAL failed, NOT_FOUND not
    run(main)


def test_status_mapping_follows_code_proto() -> None:
    assert [c for c in range(17) if grpc.failed(c)] == [2, 4, 12, 13, 14, 15]
    assert not grpc.failed(None) and grpc.failed(99)
    assert grpc.encode_message("50% é\n") == b"50%25 %C3%A9%0A"


# ---- HTTP/1.1 and declared protocols ----------------------------------------------------


@pytest.mark.parametrize(("protocol", "fragment"), [
    ("grpc", "declared grpc: call it over HTTP/2"),
    ("tcp", "declared tcp: connect through an upstream port (--upstream greet=HOST:PORT)")])
def test_http1_to_a_service_declared_otherwise_is_refused_clearly(protocol: str,
                                                                  fragment: str) -> None:
    from .pipeline_fakes import FakePool, FakeRequest, call, outbound

    async def main() -> None:
        mesh, pool = FakeMesh(), FakePool()
        grpc_endpoints(mesh, "greet", 2, protocol=protocol)
        ev = Evaluator([])
        status, _, body = await call(outbound(mesh, pool, lambda: ev),
                                      FakeRequest(host=b"greet"))
        assert status == 505 and body["error"] == "protocol_mismatch"
        assert fragment in body["message"] and not pool.upstreams
    run(main)


def test_http1_goes_only_to_instances_declared_http() -> None:
    from .pipeline_fakes import FakePool, FakeRequest, call, outbound

    async def main() -> None:
        mesh, pool = FakeMesh(), FakePool()
        mesh.add("greet", 2)  # http
        grpc_endpoints(mesh, "greet", 2)  # the same name declared grpc elsewhere
        ev = Evaluator([])
        proxy = outbound(mesh, pool, lambda: ev)
        for _ in range(20):
            status, _, _ = await call(proxy, FakeRequest(host=b"greet"))
            assert status == 200
        assert set(pool.upstreams) <= {20000, 20001}
    run(main)
