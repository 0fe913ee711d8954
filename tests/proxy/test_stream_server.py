"""The sidecar's streaming h11 server in-process: framing, limits, hostile clients."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from rumor.proxy.headers import (
    TargetError,
    continue_trace,
    end_to_end,
    forwarded_for,
    parse_target,
)
from rumor.proxy.stream_server import Incoming, Outgoing, ProxyLimits, serve_proxy

LIMITS = ProxyLimits(head_timeout=0.3, idle_timeout=0.5, body_idle_timeout=0.5)


async def echo(req: Incoming) -> Outgoing:
    """Streams the request body back (chunked) with the method and target."""
    async def body() -> AsyncIterator[bytes]:
        yield req.method + b" " + req.target + b"\n"
        async for chunk in req.body():
            yield chunk
    return Outgoing(200, [(b"x-test", b"1")], body())


async def with_server(handler: Callable[[Incoming], Awaitable[Outgoing]],
                      fn: Callable[[int], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_proxy(
            handler, "127.0.0.1", 0, limits=LIMITS, task_status=task_status))
        await fn(port)
        nursery.cancel_scope.cancel()


async def exchange(port: int, data: bytes, *, wait: float = 2.0) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(wait):
            while True:
                got = await stream.receive_some(65536)
                if not got:
                    break
                out += got
    return out


def run(fn: Callable[[int], Awaitable[None]],
        handler: Callable[[Incoming], Awaitable[Outgoing]] = echo) -> None:
    trio.run(with_server, handler, fn)


def test_streams_chunked_body_and_keeps_alive() -> None:
    async def fn(port: int) -> None:
        req = (b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
               b"GET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        out = await exchange(port, req)
        assert out.count(b"HTTP/1.1 200") == 2
        # Each request chunk is relayed as it arrives, re-chunked on the way out.
        assert b"8\r\nPOST /a\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" in out
        assert b"GET /b" in out
    run(fn)


def test_protocol_errors_are_400_and_server_survives() -> None:
    async def fn(port: int) -> None:
        bad = [
            b"GARBAGE\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: "
            b"chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabc",
            b"GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n",
        ]
        for data in bad:
            out = await exchange(port, data)
            assert out.startswith(b"HTTP/1.1 400"), (data, out[:80])
        out = await exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 20000
                             + b"\r\n\r\n")
        assert out[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400")
        # Bad chunking after the head: the handler was already streaming.
        out = await exchange(port, b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: "
                             b"chunked\r\n\r\nzz\r\n")
        assert b"HTTP/1.1 200" in out or out == b"" or out.startswith(b"HTTP/1.1 400")
        ok = await exchange(port, b"GET /fine HTTP/1.1\r\nhost: x\r\nconnection: close"
                            b"\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
    run(fn)


def test_slowloris_gets_408_and_others_are_served() -> None:
    async def fn(port: int) -> None:
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n")  # never finishes
        ok = await exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
        out = b""
        with trio.move_on_after(2):
            while True:
                got = await slow.receive_some(4096)
                if not got:
                    break
                out += got
        assert out.startswith(b"HTTP/1.1 408")
        await slow.aclose()
    run(fn)


def test_idle_keepalive_connection_is_closed() -> None:
    async def fn(port: int) -> None:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        t0 = trio.current_time()
        with trio.move_on_after(3):
            assert await s.receive_some(10) == b""
        assert 0.4 < trio.current_time() - t0 < 2
        await s.aclose()
    run(fn)


def test_handler_crash_is_502_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def boom(req: Incoming) -> Outgoing:
        raise RuntimeError("bug")

    async def fn(port: int) -> None:
        out = await exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 502")
    run(fn, boom)
    assert "proxy handler failed" in caplog.text


def test_headers_helpers() -> None:
    hs = [(b"connection", b"close, x-secret"), (b"x-secret", b"1"), (b"keep-alive", b"5"),
          (b"transfer-encoding", b"chunked"), (b"content-length", b"3"), (b"accept", b"*/*")]
    assert end_to_end(hs) == [(b"accept", b"*/*")]
    forwarded_for(hs, "10.0.0.1")
    forwarded_for(hs, "127.0.0.1")
    assert (b"x-forwarded-for", b"10.0.0.1, 127.0.0.1") in hs
    t = [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    assert continue_trace(t, random.Random(1)) == b"4bf92f3577b34da6a3ce929d0e0e4736"
    assert t[0][1] != b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    bad = [(b"traceparent", b"garbage"), (b"tracestate", b"a=b")]
    trace = continue_trace(bad, random.Random(1))
    assert len(trace) == 32 and all(k != b"tracestate" for k, _ in bad)
    assert parse_target(b"/x", b"web:8080").service == "web"
    assert parse_target(b"http://web.service.rumor/a?b", None).path == b"/a?b"
    assert parse_target(b"http://web?q=1", None).path == b"/?q=1"
    for target, host in [(b"/", None), (b"*", b"web"), (b"https://web/", None),
                         (b"http://u:p@web/", None), (b"/", b"we b")]:
        with pytest.raises(TargetError):
            parse_target(target, host)
