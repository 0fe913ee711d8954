"""DNS over UDP and TCP on one port: the RFC 7766 framing (sans-IO, hypothesis), one
TCP connection's limits, and the real server on loopback sockets.

The trio tests run on a ``MockClock`` that jumps only once every task has waited for
real a little while: timeouts of seconds pass in milliseconds, data never waits for
the clock.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip.accept import FdPool
from rumor.gossip.catalog import Instance
from rumor.gossip.checks import PASSING
from rumor.gossip.node import bind_udp_and_tcp
from rumor.proxy.api import dns_server
from rumor.proxy.api.dns import DnsResponder
from rumor.proxy.api.dns_server import (
    TcpFraming,
    TcpLimits,
    frame,
    serve_dns,
    serve_tcp_connection,
)

LIMITS = TcpLimits(idle=5.0, write=3.0)


class _Source:
    def __init__(self, n: int = 3) -> None:
        self.fail = False
        self.instances = [Instance(f"w{i}", "web", f"node-{i}", f"10.0.0.{i + 1}", 8000 + i,
                                   (), "", 1, PASSING, (), None) for i in range(n)]

    def index(self) -> int:
        return 1

    def lookup(self, service: str, tag: str | None) -> list[Instance]:
        if self.fail:
            raise RuntimeError("a bug in the catalog")
        return self.instances if service == "web" else []

    def node_address(self, node: str) -> str | None:
        return None


def _query(name: str = "web.service.rumor", qtype: str = "A", qid: int = 1) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    packed: bytes = q.pack()
    return packed


def run(main: Callable[[], Awaitable[None]]) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.2))


async def _answers(stream: trio.abc.ReceiveStream, n: int) -> list[DNSRecord]:
    """Read ``n`` framed answers (the framing reads replies as well as queries)."""
    framing = TcpFraming(max_query=65535)
    out: list[bytes] = []
    while len(out) < n:
        data = await stream.receive_some(65536)
        assert data, f"connection closed after {len(out)} of {n} answers"
        out += framing.feed(data)
    return [DNSRecord.parse(a) for a in out]


async def _closed(stream: trio.abc.ReceiveStream) -> bool:
    """Whether the server closes the stream (EOF or reset) without sending more."""
    try:
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


async def _server(nursery: trio.Nursery, responder: DnsResponder, **kw: Any) -> int:
    port: int = await nursery.start(
        lambda task_status: serve_dns(responder, "127.0.0.1", 0, limits=LIMITS,
                                      task_status=task_status, **kw))
    return port


async def _udp(port: int, query: bytes) -> DNSRecord:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as s:
        await s.sendto(query, ("127.0.0.1", port))
        with trio.fail_after(1):
            data = await s.recv(4096)
    return DNSRecord.parse(data)


# ---- framing (sans-IO) -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8),
       st.lists(st.integers(1, 200), max_size=20))
def test_framing_yields_the_queries_however_the_bytes_arrive(
        queries: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame(q) for q in queries)
    framing = TcpFraming()
    got: list[bytes] = []
    at = 0
    for cut in [*cuts, len(wire)]:
        got += framing.feed(wire[at:at + cut])
        at += cut
    got += framing.feed(wire[at:])
    assert got == queries and not framing.partial


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_framing_of_random_bytes_gives_whole_queries_and_at_most_one_error(
        data: bytes) -> None:
    framing = TcpFraming(max_query=512)
    out = framing.feed(data)
    assert all(0 < len(q) <= 512 for q in out)
    assert sum(2 + len(q) for q in out) <= len(data)
    if framing.error is not None:
        assert framing.feed(frame(b"x" * 20)) == [] and not framing.partial


def test_framing_refuses_an_empty_or_oversized_query_after_the_ones_before() -> None:
    framing = TcpFraming(max_query=4096)
    assert framing.feed(b"\x00") == [] and framing.partial and framing.error is None
    assert framing.feed(b"\x03abc\x00\x00\x00\x01z") == [b"abc"]
    assert framing.error == "length prefix 0 (expected 1 to 4096)"
    oversized = TcpFraming(max_query=4096)
    assert oversized.feed(b"\x10\x01") == []
    assert oversized.error == "length prefix 4097 (expected 1 to 4096)"


# ---- the server on loopback sockets ------------------------------------------------------


def test_pipelined_queries_on_one_connection_are_answered_in_order() -> None:
    responder = DnsResponder(_Source())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _server(nursery, responder)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                # Three queries in one write, the third split across two writes.
                wire = b"".join(frame(_query(qid=i, qtype=t))
                                for i, t in ((1, "A"), (2, "SRV"), (3, "A")))
                await stream.send_all(wire[:-5])
                await stream.send_all(wire[-5:])
                one, two, three = await _answers(stream, 3)
                assert [one.header.id, two.header.id, three.header.id] == [1, 2, 3]
                assert [QTYPE.get(r.rtype) for r in two.rr] == ["SRV"] * 3
                # The connection stays open for the next query.
                await trio.sleep(1)
                await stream.send_all(frame(_query("nope.service.rumor", qid=4)))
                (four,) = await _answers(stream, 1)
                assert four.header.id == 4 and four.header.rcode == RCODE.NXDOMAIN
            nursery.cancel_scope.cancel()
        assert responder.stats["tcp_queries"] == 4

    run(main)


def test_a_bad_length_prefix_closes_the_connection_after_the_earlier_answers() -> None:
    responder = DnsResponder(_Source())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _server(nursery, responder)
            for bad in (b"\x00\x00", b"\xff\xff"):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(frame(_query(qid=9)) + bad + b"junk")
                    (ok,) = await _answers(stream, 1)
                    assert ok.header.id == 9
                    assert await _closed(stream)
            # Short or unparsable queries get FORMERR like over UDP, and the
            # connection goes on.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(frame(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00"
                                            b"\x00\x00\x07broken") + frame(_query(qid=5)))
                formerr, ok = await _answers(stream, 2)
                assert formerr.header.id == 0x1234 and formerr.header.rcode == RCODE.FORMERR
                assert ok.header.id == 5
            nursery.cancel_scope.cancel()
        assert responder.stats["tcp_bad_length"] == 2

    run(main)


def test_idle_and_dripping_clients_are_closed_after_the_idle_timeout() -> None:
    responder = DnsResponder(_Source())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _server(nursery, responder)
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            t0 = trio.current_time()
            assert await _closed(idle)
            assert trio.current_time() - t0 == pytest.approx(LIMITS.idle, abs=0.5)
            # One byte a second keeps no connection open: a whole query is due
            # within the idle time.
            drip = await trio.open_tcp_stream("127.0.0.1", port)
            t0 = trio.current_time()
            wire = frame(_query())
            closed = False
            for i in range(len(wire) - 1):
                try:
                    await drip.send_all(wire[i:i + 1])
                except trio.BrokenResourceError:
                    closed = True
                    break
                await trio.sleep(1)
            assert closed or await _closed(drip)
            assert trio.current_time() - t0 <= LIMITS.idle + 1.5
            # A client that sends a query within the idle time is answered again.
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            for i in range(3):
                await trio.sleep(LIMITS.idle - 1)
                await busy.send_all(frame(_query(qid=i)))
                assert [a.header.id for a in await _answers(busy, 1)] == [i]
            for s in (idle, drip, busy):
                await s.aclose()
            nursery.cancel_scope.cancel()
        assert responder.stats["tcp_idle_closed"] == 2

    run(main)


def test_udp_is_answered_while_tcp_clients_stall_and_the_cap_holds() -> None:
    responder = DnsResponder(_Source())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _server(nursery, responder, pool=FdPool("dns", 2),
                                 max_per_client=0)
            # Two clients take both connection slots: one sends half a length
            # prefix, one a query it never reads the answer of.
            stalled = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            await stalled[0].send_all(b"\x00")
            await stalled[1].send_all(frame(_query(qid=77)))
            await trio.sleep(0.5)
            t0 = trio.current_time()
            answer = await _udp(port, _query(qid=42))
            assert answer.header.id == 42 and len(answer.rr) == 3
            assert trio.current_time() - t0 < 0.5
            # A third TCP client waits in the backlog until a slot frees (the idle
            # timeout closes the stalled ones), then is answered on the same port.
            third = await trio.open_tcp_stream("127.0.0.1", port)
            await third.send_all(frame(_query(qid=3)))
            (late,) = await _answers(third, 1)
            assert late.header.id == 3 and trio.current_time() - t0 >= LIMITS.idle - 1
            for s in (*stalled, third):
                await s.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_one_host_cannot_take_every_tcp_connection() -> None:
    responder = DnsResponder(_Source())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _server(nursery, responder, pool=FdPool("dns", 8))
            # 20 silent connections from one host (more than the pool): a quarter of
            # the pool is theirs, the rest are closed as soon as they are accepted.
            flood = [await trio.open_tcp_stream("127.0.0.1", port,
                                                local_address="127.0.0.9")
                     for _ in range(20)]
            await trio.sleep(0.5)
            t0 = trio.current_time()
            other = await trio.open_tcp_stream("127.0.0.1", port)
            await other.send_all(frame(_query(qid=5)))
            (answer,) = await _answers(other, 1)
            assert answer.header.id == 5 and trio.current_time() - t0 < 1.0
            closed = 0
            for s in flood:
                with trio.move_on_after(0.1):
                    try:
                        closed += await s.receive_some(10) == b""
                    except trio.BrokenResourceError:
                        closed += 1
            assert closed == 20 - 2, closed
            for s in (*flood, other):
                await s.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_failing_responder_answers_servfail_and_the_connection_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    src = _Source()
    responder = DnsResponder(src)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _server(nursery, responder)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                src.fail = True
                await stream.send_all(frame(_query(qid=1)))
                (bad,) = await _answers(stream, 1)
                src.fail = False
                await stream.send_all(frame(_query(qid=2)))
                (good,) = await _answers(stream, 1)
            assert (bad.header.rcode, good.header.rcode) == (RCODE.SERVFAIL, RCODE.NOERROR)
            nursery.cancel_scope.cancel()

    run(main)
    assert "DNS query from 127.0.0.1:" in caplog.text and "a bug in the catalog" \
        in caplog.text


def test_a_client_that_does_not_read_its_answers_is_closed() -> None:
    responder = DnsResponder(_Source(200))

    async def main() -> None:
        client, server = trio.testing.lockstep_stream_pair()  # nothing buffered
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, frame(_query(qtype="SRV")))
            t0 = trio.current_time()
            with trio.fail_after(LIMITS.write + 1):
                await serve_tcp_connection(responder, server, "test", LIMITS)
            assert trio.current_time() - t0 >= LIMITS.write
        assert responder.stats["tcp_write_timeouts"] == responder.stats["tcp_queries"] == 1

    run(main)


def test_port_zero_gets_one_port_for_udp_and_tcp_retrying_when_tcp_is_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = trio.open_tcp_listeners
    calls: list[int] = []

    async def taken_once(port: int, **kw: Any) -> list[trio.SocketListener]:
        calls.append(port)
        if len(calls) == 1:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real(port, **kw)

    async def main() -> None:
        monkeypatch.setattr(dns_server.trio, "open_tcp_listeners", taken_once)
        udp, listeners = await bind_udp_and_tcp("127.0.0.1", 0)
        with udp:
            port = udp.getsockname()[1]
            assert [ln.socket.getsockname()[1] for ln in listeners] == [port]
            assert len(calls) == 2 and calls[1] == port != 0
            # A port given explicitly is never swapped for another.
            with pytest.raises(OSError):
                await bind_udp_and_tcp("127.0.0.1", port)
            for ln in listeners:
                await ln.aclose()

    run(main)
