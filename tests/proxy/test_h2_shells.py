"""serve_h2 and H2Upstreams end to end on loopback: a request and response with
bodies larger than the windows both ways, trailers both ways, many concurrent streams
on one connection, a handler cancelled by the caller's reset."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest
import trio
import trio.testing

from rumor.proxy.h2_client import H2Upstreams
from rumor.proxy.h2_server import H2Handler, H2Limits, H2Request, StreamGone, serve_h2
from rumor.proxy.identity import Identity
from rumor.proxy.pool import TryFailed
from rumor.proxy.relay import AltProtocols, Reply, Request, serve_proxy, simple_reply
from rumor.proxy.sockio import SocketIO, Watchdog, adopt
from rumor.proxy.tls import MeshTls

from .tls_files import tls_files


def trio_test(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run the async test under trio (the suite has no trio plugin)."""
    @functools.wraps(fn)
    def run() -> None:
        trio.run(fn)
    return run


SMALL = H2Limits(stream_window=64 * 1024, connection_window=128 * 1024)


@asynccontextmanager
async def h2_server(handler: H2Handler, limits: H2Limits = SMALL
                    ) -> AsyncIterator[tuple[int, Watchdog, trio.Nursery]]:
    watchdog = Watchdog()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def on(stream: trio.SocketStream) -> None:
            io = SocketIO(adopt(stream), watchdog)
            try:
                await serve_h2(io, handler, first=b"", peer=None, client=io.peer_name(),
                               limits=limits)
            finally:
                io.close()

        nursery.start_soon(trio.serve_listeners, on, listeners)
        yield port, watchdog, nursery
        nursery.cancel_scope.cancel()


async def echo(req: H2Request) -> None:
    """Echo the body back with the request's trailers and one of its own."""
    body = bytearray()
    while True:
        chunk = await req.receive()
        if not chunk:
            break
        body += chunk
    await req.respond(200, [(b"x-method", req.method), (b"x-path", req.path)])
    await req.send(bytes(body))
    await req.send_trailers([*(req.trailers or []), (b"x-len", str(len(body)).encode())])


async def call(ups: H2Upstreams, port: int, body: bytes,
               trailers: list[tuple[bytes, bytes]] | None = None,
               ) -> tuple[int, list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]:
    c = await ups.open(("127.0.0.1", port), method=b"POST", scheme=b"http",
                       authority=b"svc", path=b"/x", headers=[(b"te", b"trailers")],
                       end_stream=False, connect_deadline=trio.current_time() + 5)

    async def upload() -> None:
        await c.send(body)
        await c.end(trailers)

    got = bytearray()
    async with trio.open_nursery() as n:
        n.start_soon(upload)
        status, headers, ended = await c.response()
        assert not ended
        while True:
            chunk = await c.receive()
            if not chunk:
                break
            got += chunk
    return status, headers, bytes(got), c.trailers or []


@trio_test
async def test_body_and_trailers_both_ways_larger_than_windows() -> None:
    async with h2_server(echo) as (port, watchdog, _):
        ups = H2Upstreams(watchdog, limits=SMALL)
        body = bytes(range(256)) * 4096  # 1 MiB: 16 stream windows, 8 connection windows
        with trio.fail_after(20):
            status, headers, got, trailers = await call(ups, port, body,
                                                        [(b"grpc-status", b"0")])
        ups.close()
    assert status == 200
    assert (b"x-path", b"/x") in headers
    assert got == body
    assert trailers == [(b"grpc-status", b"0"), (b"x-len", str(len(body)).encode())]


@trio_test
async def test_many_concurrent_streams_share_one_connection() -> None:
    async with h2_server(echo) as (port, watchdog, _):
        ups = H2Upstreams(watchdog, limits=SMALL)
        results: list[bytes] = []

        async def one(i: int) -> None:
            _, _, got, _ = await call(ups, port, b"%d" % i * 1000)
            results.append(got)

        with trio.fail_after(20):
            await call(ups, port, b"warm")  # one connection first
            async with trio.open_nursery() as n:
                for i in range(80):
                    n.start_soon(one, i)
        assert ups.stats["connections_opened"] == 1
        ups.close()
    assert sorted(results) == sorted(b"%d" % i * 1000 for i in range(80))


@trio_test
async def test_past_the_peers_stream_limit_a_second_connection_opens() -> None:
    release = trio.Event()

    async def slow(req: H2Request) -> None:
        await release.wait()
        await echo(req)

    lim = H2Limits(max_concurrent_streams=4)
    async with h2_server(slow, lim) as (port, watchdog, _):
        ups = H2Upstreams(watchdog)
        with trio.fail_after(20):
            await trio.sleep(0)
            async with trio.open_nursery() as n:
                n.start_soon(call, ups, port, b"first")
                await trio.sleep(0.2)  # SETTINGS seen: the peer allows 4
                for _ in range(7):
                    n.start_soon(call, ups, port, b"x")
                await trio.sleep(0.2)
                release.set()
        assert ups.stats["connections_opened"] == 2
        ups.close()


@trio_test
async def test_a_cancelled_caller_resets_its_stream_and_the_handler_is_cancelled() -> None:
    cancelled = trio.Event()
    started = trio.Event()

    async def hang(req: H2Request) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with h2_server(hang) as (port, watchdog, _):
        ups = H2Upstreams(watchdog)
        with trio.fail_after(10):
            c = await ups.open(("127.0.0.1", port), method=b"GET", scheme=b"http",
                               authority=b"svc", path=b"/", headers=[], end_stream=True,
                               connect_deadline=trio.current_time() + 5)
            with trio.move_on_after(0.2):
                await c.response()
            await started.wait()
            await cancelled.wait()
        ups.close()


@trio_test
async def test_a_handler_that_raises_answers_500() -> None:
    async def boom(req: H2Request) -> None:
        raise RuntimeError("boom")

    async with h2_server(boom) as (port, watchdog, _):
        ups = H2Upstreams(watchdog)
        with trio.fail_after(10):
            c = await ups.open(("127.0.0.1", port), method=b"GET", scheme=b"http",
                               authority=b"svc", path=b"/", headers=[], end_stream=True,
                               connect_deadline=trio.current_time() + 5)
            status, _, ended = await c.response()
        ups.close()
    assert (status, ended) == (500, True)


@trio_test
async def test_connect_failure_is_a_try_failed() -> None:
    watchdog = Watchdog()
    ups = H2Upstreams(watchdog)
    with pytest.raises(TryFailed) as e:
        await ups.open(("127.0.0.1", 1), method=b"GET", scheme=b"http", authority=b"x",
                       path=b"/", headers=[], end_stream=True,
                       connect_deadline=trio.current_time() + 5)
    assert e.value.condition == "connect-failure"


async def raw_exchange(port: int, frames: Callable[[h2.connection.H2Connection], None]
                       ) -> list[h2.events.Event]:
    """A bare h2 client: ``frames`` queues what to send, all in one write after the
    preface; the events until the server ends every stream or the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    frames(c)
    await stream.send_all(c.data_to_send())
    seen: list[h2.events.Event] = []
    open_ = set(c.streams)
    while open_:
        data = await stream.receive_some(65536)
        if not data:
            break
        for ev in c.receive_data(data):
            seen.append(ev)
            if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                open_.discard(ev.stream_id)
            if isinstance(ev, h2.events.DataReceived):
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        await stream.send_all(c.data_to_send())
    await stream.aclose()
    return seen


@trio_test
async def test_a_body_in_the_same_read_as_its_head_reaches_the_handler() -> None:
    def frames(c: h2.connection.H2Connection) -> None:
        for sid in (1, 3, 5):
            c.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                 (b":authority", b"svc"), (b":path", b"/%d" % sid)])
            c.send_data(sid, b"body-%d" % sid, end_stream=True)

    async with h2_server(echo) as (port, _, _):
        with trio.fail_after(10):
            seen = await raw_exchange(port, frames)
    bodies = {ev.stream_id: ev.data for ev in seen if isinstance(ev, h2.events.DataReceived)}
    assert bodies == {1: b"body-1", 3: b"body-3", 5: b"body-5"}


def mock_trio_test(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Under a MockClock that jumps while every task waits (real sockets: 0.1 s)."""
    @functools.wraps(fn)
    def run() -> None:
        trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0.1))
    return run


@mock_trio_test
async def test_an_idle_connection_ends_with_goaway_and_the_next_call_reconnects() -> None:
    lim = H2Limits(idle_timeout=5.0)
    async with h2_server(echo, lim) as (port, watchdog, _):
        ups = H2Upstreams(watchdog, limits=H2Limits(idle_timeout=1000.0))
        assert (await call(ups, port, b"one"))[2] == b"one"
        assert ups.has_idle("127.0.0.1", port)
        start = trio.current_time()
        while ups.has_idle("127.0.0.1", port):
            await trio.sleep(1)
        assert 4 <= trio.current_time() - start < 7  # the server's idle timeout
        assert (await call(ups, port, b"two"))[2] == b"two"
        assert ups.stats["connections_opened"] == 2
        ups.close()


@mock_trio_test
async def test_a_long_call_is_not_cut_by_the_idle_timeout() -> None:
    async def slow(req: H2Request) -> None:
        await trio.sleep(12)
        await echo(req)

    lim = H2Limits(idle_timeout=5.0)
    async with h2_server(slow, lim) as (port, watchdog, _):
        ups = H2Upstreams(watchdog, limits=lim)
        status, _, got, _ = await call(ups, port, b"late")
        ups.close()
    assert (status, got) == (200, b"late")


@mock_trio_test
async def test_a_peer_that_keeps_its_window_shut_gets_the_stream_reset() -> None:
    """A client that never credits the response body back: the handler's send gives
    up after send_timeout (the stream is reset), the server holds no more than a
    window of it and goes on serving."""
    gone: list[str] = []

    async def big(req: H2Request) -> None:
        await req.respond(200, [])
        try:
            await req.send(b"x" * (1 << 20), end_stream=True)
        except StreamGone as e:
            gone.append(e.reason)
            raise

    lim = H2Limits(send_timeout=5.0)
    async with h2_server(big, lim) as (port, _, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        c.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                           (b":authority", b"svc"), (b":path", b"/")], end_stream=True)
        await stream.send_all(c.data_to_send())
        received = 0
        reset = None
        start = trio.current_time()
        while reset is None:
            data = await stream.receive_some(65536)
            assert data
            for ev in c.receive_data(data):  # never acknowledged: the window stays shut
                if isinstance(ev, h2.events.DataReceived):
                    received += len(ev.data)
                elif isinstance(ev, h2.events.StreamReset):
                    reset = ev
            await stream.send_all(c.data_to_send())
        await stream.aclose()
    assert received == 65535  # the default initial window, no more
    assert 5 <= trio.current_time() - start < 7
    assert gone and "window" in gone[0]



def test_over_mutual_tls_alpn_h2_the_callee_identity_checked_the_caller_known(
        tmp_path: Path) -> None:
    """serve_proxy hands an ALPN-h2 connection to serve_h2 (first=b""), which sees the
    caller's verified identity; H2Upstreams refuses a callee whose certificate does not
    name the service before any stream is sent."""
    server_tls = MeshTls(tls_files(tmp_path, "a", ["web"]))
    client_tls = MeshTls(tls_files(tmp_path, "b", ["api"]))
    callers: list[str] = []

    async def who(req: H2Request) -> None:
        callers.append(req.peer.node if req.peer is not None else "?")
        await echo(req)

    async def h2(io: SocketIO, peer: Identity | None, first: bytes) -> None:
        await serve_h2(io, who, first=first, peer=peer, client=io.peer_name())

    async def never(req: Request) -> Reply:
        return simple_reply(500, b"not here")

    async def main() -> None:
        wd = Watchdog()
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: serve_proxy(
                never, "127.0.0.1", 0, watchdog=wd, tls=server_tls,
                task_status=task_status, alt=AltProtocols(h2=h2)))
            ups = H2Upstreams(wd, tls=client_tls)
            c = await ups.open(("127.0.0.1", port), method=b"POST", scheme=b"https",
                               authority=b"web", path=b"/x", headers=[],
                               end_stream=False, connect_deadline=trio.current_time() + 5,
                               service="web")
            await c.end([(b"grpc-status", b"0")])
            status, _, _ = await c.response()
            assert status == 200
            assert await c.receive() == b""
            assert c.trailers is not None and (b"grpc-status", b"0") in c.trailers
            with pytest.raises(TryFailed) as e:
                await ups.open(("127.0.0.1", port), method=b"GET", scheme=b"https",
                               authority=b"db", path=b"/", headers=[], end_stream=True,
                               connect_deadline=trio.current_time() + 5, service="db")
            assert e.value.condition == "connect-failure" and "'db'" in e.value.detail
            ups.close()
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.5))
    assert callers == ["b"]


async def raw_server(on_request: Callable[[h2.connection.H2Connection, int], bytes | None],
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A bare h2 server: ``on_request(conn, stream_id)`` queues the answer (and may
    return raw frames to write before it)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def on(stream: trio.SocketStream) -> None:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                 header_encoding=None))
        c.initiate_connection()
        await stream.send_all(c.data_to_send())
        while data := await stream.receive_some(65536):
            raw = b""
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    raw += on_request(c, ev.stream_id) or b""
            await stream.send_all(raw + c.data_to_send())

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(on, listeners)


@trio_test
async def test_a_graceful_goaway_lets_streams_up_to_its_last_id_finish() -> None:
    """GOAWAY(NO_ERROR, last=1) arriving before the answer to stream 1: stream 1 still
    completes (h2 alone would drop the connection); stream 3, above it, is stale
    (safe to send again); the next call opens a new connection."""
    def answer(c: h2.connection.H2Connection, sid: int) -> bytes | None:
        if sid == 1:
            return None  # answered once stream 3 arrives, after the GOAWAY
        c.send_headers(1, [(b":status", b"200")])
        c.send_data(1, b"done")
        c.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
        # h2 sends nothing after its own GOAWAY, so it goes first as a raw frame.
        return hyperframe.frame.GoAwayFrame(0, last_stream_id=1, error_code=0).serialize()

    async with trio.open_nursery() as n:
        port = await n.start(raw_server, answer)
        wd = Watchdog()
        n.start_soon(wd.run)
        ups = H2Upstreams(wd)
        with trio.fail_after(10):
            kw: dict[str, Any] = dict(method=b"GET", scheme=b"http", authority=b"x",
                                      path=b"/", headers=[], end_stream=True,
                                      connect_deadline=trio.current_time() + 5)
            first = await ups.open(("127.0.0.1", port), **kw)
            second = await ups.open(("127.0.0.1", port), **kw)
            with pytest.raises(TryFailed) as e:
                await second.response()
            assert e.value.condition == "stale-connection"
            status, _, ended = await first.response()
            assert (status, ended) == (200, False)
            assert await first.receive() == b"done"
            assert await first.receive() == b""
            assert first.trailers == [(b"grpc-status", b"0")]
            assert not ups.has_idle("127.0.0.1", port)
            third = await ups.open(("127.0.0.1", port), **kw)
            assert third.connect_seconds > 0
        ups.close()
        n.cancel_scope.cancel()


@trio_test
async def test_a_refused_stream_is_stale_and_a_reset_one_a_502() -> None:
    def answer(c: h2.connection.H2Connection, sid: int) -> bytes | None:
        c.reset_stream(sid, 0x7 if sid == 1 else 0x2)  # REFUSED_STREAM, INTERNAL_ERROR
        return None

    async with trio.open_nursery() as n:
        port = await n.start(raw_server, answer)
        wd = Watchdog()
        n.start_soon(wd.run)
        ups = H2Upstreams(wd)
        conditions = []
        with trio.fail_after(10):
            for _ in range(2):
                c = await ups.open(("127.0.0.1", port), method=b"GET", scheme=b"http",
                                   authority=b"x", path=b"/", headers=[], end_stream=True,
                                   connect_deadline=trio.current_time() + 5)
                with pytest.raises(TryFailed) as e:
                    await c.response()
                conditions.append(e.value.condition)
        ups.close()
        n.cancel_scope.cancel()
    assert conditions == ["stale-connection", "502"]
