"""Issue 27's data-plane findings, in process: separate pools with per-client caps, the
first-byte timeout, requests abandoned by their client, the loop mark, trailers, a
Content-Length trailer and a flood of 1xx. Relay cases run on real loopback sockets
under ``MockClock`` (``test_relay.py``'s harness): a timeout passes in milliseconds, so
a case that would wait for one fails on the elapsed virtual time."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from rumor.proxy.headers import MAX_HOPS, add_hop, check_hops, hop_mark, trailer_fields
from rumor.proxy.limits import SidecarLimits, check_limits, plan_pools
from rumor.proxy.pool import MAX_INFORMATIONAL
from rumor.proxy.relay import Forward, ProxyLimits, Reply, Request

from .test_relay import LIMITS, Forwarder, echo, read_request, run, talk

# ---- pools (sans-IO) -------------------------------------------------------------------


def test_each_listener_has_its_own_pool_and_one_client_cannot_fill_it() -> None:
    plan = plan_pools(1000, SidecarLimits())
    assert plan.inbound.connections == plan.outbound.connections == 250
    assert plan.inbound.fds + plan.outbound.fds <= 1000
    assert 0 < plan.inbound.per_client < plan.inbound.connections
    assert 0 < plan.outbound.per_client < plan.outbound.connections
    alone = plan_pools(1000, SidecarLimits(), outbound=False)
    assert alone.inbound.connections == 500
    # A large budget: the inbound cap stays at what a calling sidecar pools.
    big = plan_pools(2_000_000, SidecarLimits())
    assert big.inbound.per_client == 1024
    assert plan_pools(math.inf, SidecarLimits()).inbound.per_client == 1024


def test_explicit_limits_are_kept_or_cut_to_the_budget() -> None:
    plan = plan_pools(1000, SidecarLimits(inbound_connections=100, inbound_per_client=10))
    assert (plan.inbound.connections, plan.inbound.per_client) == (100, 10)
    cut = plan_pools(100, SidecarLimits(inbound_connections=1000, inbound_per_client=900))
    assert cut.inbound.connections == 25 and cut.inbound.per_client < 25 and cut.notes
    assert check_limits(SidecarLimits(inbound_connections=10, inbound_per_client=10))
    assert check_limits(SidecarLimits(outbound_connections=5, outbound_per_client=9))
    assert check_limits(SidecarLimits(inbound_connections=10, inbound_per_client=9)) is None


# ---- the loop mark (sans-IO) --------------------------------------------------------------


def test_a_request_carrying_our_own_mark_is_a_loop() -> None:
    ours, theirs = hop_mark(random.Random(1)), hop_mark(random.Random(2))
    assert ours != theirs and ours.startswith(b"rumor-")
    hs: list[tuple[bytes, bytes]] = [(b"via", b"1.1 squid, 1.0 gw")]
    assert check_hops(hs, ours) is None
    add_hop(hs, theirs)
    assert check_hops(hs, ours) is None
    add_hop(hs, ours)
    reason = check_hops(hs, ours)
    assert reason is not None and "loop detected" in reason
    # Combined into one field line by someone on the way: still found.
    assert check_hops([(b"via", b"1.1 " + theirs + b", 1.1 " + ours)], ours)


def test_too_many_hops_is_a_loop_even_without_our_mark() -> None:
    ids = random.Random(3)
    hs: list[tuple[bytes, bytes]] = []
    for _ in range(MAX_HOPS - 1):
        add_hop(hs, hop_mark(ids))
    assert check_hops(hs, b"rumor-me") is None
    add_hop(hs, hop_mark(ids))
    reason = check_hops(hs, b"rumor-me")
    assert reason is not None and str(MAX_HOPS) in reason


def test_trailer_fields_drop_framing_routing_and_mesh_fields() -> None:
    trailers = [(b"host", b"evil"), (b"x-rumor-source", b"admin"), (b"content-length", b"5"),
                (b"transfer-encoding", b"chunked"), (b"authorization", b"x"),
                (b"x-rumor-anything", b"1"), (b"via", b"1.1 rumor-1"), (b"x-sum", b"9"),
                (b"server-timing", b"db;dur=3")]
    assert trailer_fields(trailers) == [(b"x-sum", b"9"), (b"server-timing", b"db;dur=3")]


# ---- the relay ---------------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_first_byte_timeout() -> None:
    limits = ProxyLimits(first_byte_timeout=1.0, head_timeout=3.0, idle_timeout=5.0,
                         body_idle_timeout=5.0)

    async def client(port: int) -> None:
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        t0 = trio.current_time()
        with trio.move_on_after(20):
            assert await silent.receive_some(10) == b""
        assert 1.0 <= trio.current_time() - t0 < 2.0
        await silent.aclose()
        # After a request, a kept-alive connection may idle for idle_timeout.
        kept = await trio.open_tcp_stream("127.0.0.1", port)
        await kept.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        got = b""
        while b"GET /|" not in got:
            got += await kept.receive_some(65536)
        t1 = trio.current_time()
        with trio.move_on_after(20):
            assert await kept.receive_some(10) == b""
        assert 5.0 <= trio.current_time() - t1 < 6.5
        await kept.aclose()

    run(echo, client, limits=limits)


def _abandoned(uploads: int, size: int) -> tuple[list[float], Forwarder, float]:
    """``uploads`` clients each send a ``size``-byte POST and leave at once; the backend
    reads and never answers. Returns when it saw each upstream connection close."""
    closed: list[float] = []
    handlers: list[Forwarder] = []
    started = [0.0]

    async def script(stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        closed.append(trio.current_time())

    def handler(port: int) -> Callable[[Request], Awaitable[Reply | Forward]]:
        handlers.append(Forwarder(port))
        return handlers[0]

    async def client(port: int) -> None:
        started[0] = trio.current_time()
        body = b"x" * size
        for _ in range(uploads):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                             % len(body) + body)
            await s.aclose()
        with trio.move_on_after(10):
            while len(closed) < uploads:
                await trio.sleep(0.01)
        await trio.sleep(0.1)  # the relay's own tasks wind down

    run(script, client, handler=handler)
    return closed, handlers[0], started[0]


def test_a_client_that_leaves_abandons_the_upstream_exchange_at_once() -> None:
    # 20 uploads of 64 KiB (buffered by the handler) and 20 of 1 MiB (streamed).
    for size in (64 * 1024, 1 << 20):
        closed, fw, t0 = _abandoned(20, size)
        assert len(closed) == 20
        # The forwarder's deadline is 5 s: a relay that waits for it holds them all.
        assert max(closed) - t0 < 1.0, [round(c - t0, 2) for c in closed]
        # Closed, not pooled; every socket of the relay is gone from its watchdog.
        assert not any(fw.pool._idle.values())
        assert not fw.watchdog._ios


def test_request_trailers_are_filtered_both_ways() -> None:
    seen: list[bytes] = []

    async def script(stream: trio.SocketStream) -> None:
        data = b""
        while not data.endswith(b"\r\n\r\n") or data.count(b"\r\n\r\n") < 2:
            data += await stream.receive_some(65536)
        seen.append(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"2\r\nok\r\n0\r\nx-rumor-instance: forged\r\nset-cookie: a=b"
                              b"\r\nx-sum: 2\r\n\r\n")

    async def client(port: int) -> None:
        out = await talk(port, b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked"
                         b"\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\nhost: evil\r\n"
                         b"x-rumor-source: admin\r\nx-check: 1\r\n\r\n")
        assert out.endswith(b"2\r\nok\r\n0\r\nx-sum: 2\r\n\r\n"), out
    run(script, client)
    body = seen[0].split(b"\r\n\r\n", 1)[1]
    assert body == b"3\r\nabc\r\n0\r\nx-check: 1\r\n\r\n", body


def test_a_content_length_trailer_ends_the_response_at_once() -> None:
    async def script(stream: trio.SocketStream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"3\r\nabc\r\n0\r\ncontent-length: 5\r\n\r\n")
        await trio.sleep(60)  # keeps the connection open: no EOF to end it

    async def client(port: int) -> None:
        t0 = trio.current_time()
        out = await talk(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", wait=30)
        elapsed = trio.current_time() - t0
        # Cut short (no last chunk) and closed, well before the 5 s body idle limit.
        assert out.startswith(b"HTTP/1.1 200") and b"3\r\nabc\r\n" in out
        assert not out.endswith(b"0\r\n\r\n")
        assert elapsed < LIMITS.body_idle_timeout / 5, elapsed
    run(script, client)


def test_a_flood_of_1xx_responses_fails_the_exchange_with_502() -> None:
    async def script(stream: trio.SocketStream) -> None:
        await read_request(stream, bytearray())
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for _ in range(1000):
                await stream.send_all(b"HTTP/1.1 102 Processing\r\n\r\n")
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    async def client(port: int) -> None:
        out = await talk(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                         wait=10)
        assert out.count(b"HTTP/1.1 102") == MAX_INFORMATIONAL
        final = out.split(b"HTTP/1.1 102 Processing\r\n\r\n")[-1]
        assert final.startswith(b"HTTP/1.1 502"), final[:200]
        assert b"informational (1xx)" in final
    run(script, client)

