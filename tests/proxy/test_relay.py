"""The data path in-process: a relay listener forwarding through an upstream pool to a
scripted backend — framing, streaming both ways, pipelining, 1xx, limits, hostile peers.

Real loopback sockets on a ``MockClock`` that jumps only once every task has waited
for real a little while: timeouts of seconds pass in milliseconds, data never waits
for the clock.
"""

from __future__ import annotations

import random
import resource
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from rumor.proxy.codec import RequestReader
from rumor.proxy.headers import (
    TargetError,
    continue_trace,
    end_to_end,
    forwarded_for,
    parse_target,
    response_headers,
)
from rumor.proxy.pool import TryFailed, UpstreamPool
from rumor.proxy.relay import (
    Forward,
    ProxyLimits,
    Reply,
    Request,
    request_head_start,
    serve_proxy,
    simple_reply,
)
from rumor.proxy.sockio import Watchdog

LIMITS = ProxyLimits(head_timeout=3.0, idle_timeout=5.0, body_idle_timeout=5.0)

Script = Callable[[trio.SocketStream], Awaitable[None]]


class Forwarder:
    """The least handler that relays: every request to the one backend."""

    def __init__(self, backend_port: int) -> None:
        self.port = backend_port
        self.watchdog = Watchdog()
        self.pool = UpstreamPool(self.watchdog)

    async def __call__(self, req: Request) -> Reply | Forward:
        body = await req.take_body(64 * 1024)
        hs = end_to_end(req.headers)
        framing = req.framing(body)
        if framing is not None:
            hs.append(framing)
        now = trio.current_time()
        try:
            resp = await self.pool.exchange(
                req.method, ("127.0.0.1", self.port),
                request_head_start(req.method, req.target, hs) + b"\r\n", body,
                connect_deadline=now + 2, deadline=now + 5,
                informational=req.informational)
        except TryFailed as f:
            if req.failure is not None:
                raise req.failure from None
            return simple_reply(f.status, str(f))
        return Forward(resp, response_headers(resp.head.headers), self.pool)


async def read_request(stream: trio.SocketStream, buf: bytearray) -> tuple[bytes, bytes]:
    """One whole request off a backend's connection: (head, body), via the codec."""
    reader = RequestReader()
    head = b""
    body = bytearray()
    pending = bytes(buf)
    buf.clear()
    while True:
        events = reader.feed(pending) if pending else []
        for ev in events:
            name = type(ev).__name__
            if name == "Head":
                head = ev.method + b" " + ev.target  # type: ignore[union-attr]
            elif name == "Data":
                body += ev.data  # type: ignore[union-attr]
            else:
                return head, bytes(body)
        pending = await stream.receive_some(65536)
        if not pending:
            raise EOFError


async def run_case(script: Script, client: Callable[[int], Awaitable[None]], *,
                   limits: ProxyLimits = LIMITS,
                   handler: Callable[[int], Callable[[Request], Awaitable[Reply | Forward]]]
                   | None = None) -> None:
    async with trio.open_nursery() as nursery:
        backend = (await nursery.start(trio.serve_tcp, script, 0, ))[0]
        bport = backend.socket.getsockname()[1]
        h = handler(bport) if handler else Forwarder(bport)
        wd = getattr(h, "watchdog", None) or Watchdog()
        port = await nursery.start(lambda task_status: serve_proxy(
            h, "127.0.0.1", 0, watchdog=wd, limits=limits, task_status=task_status))
        await client(port)
        nursery.cancel_scope.cancel()


def run(script: Script, client: Callable[[int], Awaitable[None]], **kw: object) -> None:
    trio.run(lambda: run_case(script, client, **kw),  # type: ignore[arg-type]
             clock=trio.testing.MockClock(autojump_threshold=0.2))


async def talk(port: int, data: bytes, *, until: bytes | None = None,
               wait: float = 10.0) -> bytes:
    """Send ``data`` and read until the proxy closes (or ``until`` appears)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(wait):
            while until is None or until not in out:
                got = await stream.receive_some(65536)
                if not got:
                    break
                out += got
    return out


async def echo(stream: trio.SocketStream) -> None:
    """Answers each request with its method, target and body (Content-Length)."""
    buf = bytearray()
    try:
        while True:
            head, body = await read_request(stream, buf)
            text = head + b"|" + body
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n"
                                  b"x-test: 1\r\n\r\n%b" % (len(text), text))
    except (EOFError, trio.BrokenResourceError):
        pass


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async def client(port: int) -> None:
        reqs = b"".join(b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(20))
        out = await talk(port, reqs + b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close"
                         b"\r\n\r\n")
        assert out.count(b"HTTP/1.1 200") == 21
        positions = [out.index(b"GET /%d|" % i) for i in range(20)]
        assert positions == sorted(positions)
        assert out.rstrip().endswith(b"GET /last|")
        assert b"connection: close" in out.split(b"GET /19|")[1]
    run(echo, client)


def test_chunked_request_is_reframed_and_content_length_body_relayed() -> None:
    async def client(port: int) -> None:
        out = await talk(port, b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked"
                         b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                         b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
                         b"connection: close\r\n\r\nabc")
        assert b"POST /a|hello world" in out and b"POST /b|abc" in out
    run(echo, client)


def test_head_then_get_on_one_connection() -> None:
    async def script(stream: trio.SocketStream) -> None:
        buf = bytearray()
        head, _ = await read_request(stream, buf)
        assert head == b"HEAD /x"
        # A HEAD's answer states the GET's length and has no body.
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        head, _ = await read_request(stream, buf)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")

    async def client(port: int) -> None:
        out = await talk(port, b"HEAD /x HTTP/1.1\r\nhost: x\r\n\r\n"
                         b"GET /x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        first, second = out.split(b"HTTP/1.1 200 OK")[1:]
        assert b"content-length: 5" in first and first.endswith(b"\r\n\r\n")
        assert second.endswith(b"\r\n\r\nhello")
    run(script, client)


def test_chunked_and_close_delimited_responses_with_trailers() -> None:
    async def script(stream: trio.SocketStream) -> None:
        buf = bytearray()
        await read_request(stream, buf)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n")
        await read_request(stream, buf)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")  # close-delimited
        await stream.aclose()

    async def client(port: int) -> None:
        out = await talk(port, b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n"
                         b"GET /2 HTTP/1.1\r\nhost: x\r\n\r\n",
                         until=b"0\r\n\r\n", wait=5)
        one, two = out.split(b"HTTP/1.1 200 OK")[1:]
        assert one.endswith(b"3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n")
        # Re-framed as chunks for the HTTP/1.1 client, so its connection stays usable.
        assert b"transfer-encoding: chunked" in two
        assert two.endswith(b"d\r\nuntil the end\r\n0\r\n\r\n")
        # An HTTP/1.0 client gets it close-delimited.
    run(script, client)

    async def script10(stream: trio.SocketStream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"3\r\nabc\r\n0\r\n\r\n")

    async def client10(port: int) -> None:
        out = await talk(port, b"GET / HTTP/1.0\r\nhost: x\r\n\r\n")
        assert b"connection: close" in out and out.endswith(b"\r\n\r\nabc")
        assert b"transfer-encoding" not in out
    run(script10, client10)


def test_expect_100_continue_is_forwarded_and_the_upstream_1xx_relayed() -> None:
    async def script(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        assert b"expect: 100-continue" in data.lower()
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = data.split(b"\r\n\r\n", 1)[1]
        while len(body) < 4:
            body += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\n" + body)

    async def client(port: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"PUT /u HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
                                  b"expect: 100-continue\r\n\r\n")
            got = await stream.receive_some(65536)
            assert got == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any body byte
            await stream.send_all(b"data")
            out = b""
            while not out.endswith(b"data"):
                out += await stream.receive_some(65536)
            assert out.startswith(b"HTTP/1.1 201")
    run(script, client)


def test_an_early_response_to_an_unfinished_upload_does_not_deadlock() -> None:
    async def script(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)  # the head and a little body: then stop reading
        await stream.send_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n"
                              b"\r\nno!")
        await trio.sleep(30)

    async def client(port: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: "
                                  b"100000000\r\n\r\n")
            out = b""

            async def upload() -> None:
                chunk = b"x" * 65536
                try:
                    while True:
                        await stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as n:
                n.start_soon(upload)
                while not out.endswith(b"no!"):
                    got = await stream.receive_some(65536)
                    assert got
                    out += got
                n.cancel_scope.cancel()
            assert out.startswith(b"HTTP/1.1 413") and b"connection: close" in out
    run(script, client)


def test_an_upstream_closing_mid_body_truncates_and_closes_the_client() -> None:
    async def script(stream: trio.SocketStream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await stream.aclose()

    async def client(port: int) -> None:
        out = await talk(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"partial")  # then closed
    run(script, client)


def test_a_streamed_body_keeps_memory_flat() -> None:
    """256 MiB up and down through the relay (the cluster benchmark does 1 GB)."""
    size = 256 * 1024 * 1024

    async def script(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        got = len(data.split(b"\r\n\r\n", 1)[1])
        while got < size:
            got += len(await stream.receive_some(1 << 20))
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        chunk = b"y" * (1 << 20)
        for _ in range(size // len(chunk)):
            await stream.send_all(chunk)

    async def client(port: int) -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as n:
            async def upload() -> None:
                await stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding:"
                                      b" chunked\r\n\r\n")
                chunk = b"%x\r\n%b\r\n" % (1 << 20, b"x" * (1 << 20))
                for _ in range(size >> 20):
                    await stream.send_all(chunk)
                await stream.send_all(b"0\r\n\r\n")
            n.start_soon(upload)
            received = 0
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            received = len(head.split(b"\r\n\r\n", 1)[1])
            while received < size:
                got = await stream.receive_some(1 << 20)
                assert got
                received += len(got)
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
    run(script, client)


def test_protocol_errors_are_refused_and_the_listener_survives() -> None:
    async def client(port: int) -> None:
        bad = [
            (b"GARBAGE\r\n\r\n", b"400"),
            (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: "
             b"chunked\r\n\r\n0\r\n\r\n", b"400"),
            (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"
             b"abc", b"400"),
            (b"GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n", b"400"),
            (b"GET / HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
            (b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade"
             b"\r\n\r\n", b"501"),
            (b"CONNECT x:443 HTTP/1.1\r\nhost: x\r\n\r\n", b"501"),
            # Bad chunking after the head, once the handler is already streaming it.
            (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
             b"400"),
        ]
        for data, status in bad:
            out = await talk(port, data)
            assert out.startswith(b"HTTP/1.1 " + status), (data[:60], out[:80])
        ok = await talk(port, b"GET /fine HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
    run(echo, client)


def test_slowloris_gets_408_and_others_are_served() -> None:
    async def client(port: int) -> None:
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n")  # never finishes
        t0 = trio.current_time()
        ok = await talk(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
        out = b""
        with trio.move_on_after(10):
            while True:
                got = await slow.receive_some(4096)
                if not got:
                    break
                out += got
        assert out.startswith(b"HTTP/1.1 408")
        assert LIMITS.head_timeout <= trio.current_time() - t0 < LIMITS.head_timeout + 1
        await slow.aclose()
    run(echo, client)


def test_an_idle_keep_alive_connection_is_closed() -> None:
    async def client(port: int) -> None:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        t0 = trio.current_time()
        with trio.move_on_after(20):
            assert await s.receive_some(10) == b""
        assert LIMITS.idle_timeout <= trio.current_time() - t0 < LIMITS.idle_timeout + 1.5
        await s.aclose()
    run(echo, client)


def test_an_upstream_that_never_answers_times_out() -> None:
    async def script(stream: trio.SocketStream) -> None:
        await trio.sleep(60)

    async def client(port: int) -> None:
        t0 = trio.current_time()
        out = await talk(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                         wait=30)
        assert out.startswith(b"HTTP/1.1 504")
        assert 5 <= trio.current_time() - t0 < 6.5
    run(script, client)


def test_handler_crash_is_500_internal_error_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def boom(_port: int) -> Callable[[Request], Awaitable[Reply | Forward]]:
        async def handle(req: Request) -> Reply | Forward:
            raise RuntimeError("bug")
        return handle

    async def client(port: int) -> None:
        out = await talk(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 500")
        assert b"x-rumor-error-code: internal_error" in out
    run(echo, client, handler=boom)
    assert "proxy handler failed" in caplog.text


def test_headers_helpers() -> None:
    hs = [(b"connection", b"close, x-secret"), (b"x-secret", b"1"), (b"keep-alive", b"5"),
          (b"transfer-encoding", b"chunked"), (b"content-length", b"3"), (b"accept", b"*/*")]
    assert end_to_end(hs) == [(b"accept", b"*/*")]
    forwarded_for(hs, "10.0.0.1")
    forwarded_for(hs, "127.0.0.1")
    assert (b"x-forwarded-for", b"10.0.0.1, 127.0.0.1") in hs
    t = [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    assert continue_trace(t, random.Random(1))[0] == b"4bf92f3577b34da6a3ce929d0e0e4736"
    assert t[0][1] != b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    bad = [(b"traceparent", b"garbage"), (b"tracestate", b"a=b")]
    trace = continue_trace(bad, random.Random(1))[0]
    assert len(trace) == 32 and all(k != b"tracestate" for k, _ in bad)
    assert parse_target(b"/x", b"web:8080").service == "web"
    assert parse_target(b"http://web.service.rumor/a?b", None).path == b"/a?b"
    assert parse_target(b"http://web?q=1", None).path == b"/?q=1"
    for target, host in [(b"/", None), (b"*", b"web"), (b"https://web/", None),
                         (b"http://u:p@web/", None), (b"/", b"we b")]:
        with pytest.raises(TargetError):
            parse_target(target, host)
