"""HTTP/2 attacks against a real listener: ``serve_proxy`` on a loopback socket with
``serve_h2`` as its HTTP/2 handler (``AltProtocols(h2=...)``), as a sidecar runs it.

The attacker writes frames with hyperframe and HPACK blocks with hpack (so it can
break the rules h2 itself would not let it break) and reads the server's frames with
h2's own frame buffer. Each attack must end in the documented way (GOAWAY code,
RST_STREAM, 431), the handlers it started must be cancelled, what the server holds
must stay below ``H2Limits.bound_bytes()`` (measured with tracemalloc, or by the
core's own counters shown through ``serve_h2(observe=)``), and the listener must go on
serving a well-behaved client afterwards."""

from __future__ import annotations

import functools
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
import trio
import trio.testing
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from rumor.proxy.h2_server import H2Handler, H2Limits, H2Request, serve_h2
from rumor.proxy.h2_session import H2Session
from rumor.proxy.identity import Identity
from rumor.proxy.relay import (
    AltProtocols,
    ProxyLimits,
    Reply,
    Request,
    serve_proxy,
    simple_reply,
)
from rumor.proxy.sockio import SocketIO, Watchdog

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB
DEFAULT = H2Limits()
REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"),
       (b":path", b"/p")]


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run the async test under trio (the suite has no trio plugin)."""
    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))
    return run


def mock_clock_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Virtual time: the timeouts under test pass as soon as every task waits."""
    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> None:
        trio.run(functools.partial(fn, *args, **kwargs),
                 clock=trio.testing.MockClock(autojump_threshold=0.05))
    return run


@dataclass
class Sidecar:
    port: int
    sessions: list[H2Session] = field(default_factory=list)
    started: int = 0
    live: int = 0
    cancelled: int = 0
    stop: Callable[[], None] = lambda: None


async def _h1(req: Request) -> Reply:
    return simple_reply(404, "no HTTP/1.1 here")


@asynccontextmanager
async def sidecar(handler: H2Handler, limits: H2Limits = DEFAULT,
                  proxy_limits: ProxyLimits | None = None) -> AsyncIterator[Sidecar]:
    """serve_proxy with serve_h2 behind it; ``handler`` wrapped to count its tasks."""
    side = Sidecar(0)

    async def counted(req: H2Request) -> None:
        side.started += 1
        side.live += 1
        try:
            await handler(req)
        except trio.Cancelled:
            side.cancelled += 1
            raise
        finally:
            side.live -= 1

    async def h2(io: SocketIO, peer: Identity | None, first: bytes) -> None:
        await serve_h2(io, counted, first=first, peer=peer, client=io.peer_name(),
                       limits=limits, observe=side.sessions.append)

    async with trio.open_nursery() as nursery:
        side.port = await nursery.start(functools.partial(
            serve_proxy, _h1, "127.0.0.1", 0, watchdog=Watchdog(), limits=proxy_limits,
            alt=AltProtocols(h2=h2)))
        side.stop = nursery.cancel_scope.cancel
        yield side
        nursery.cancel_scope.cancel()


async def hang(req: H2Request) -> None:
    await trio.sleep_forever()


async def echo(req: H2Request) -> None:
    body = bytearray()
    while chunk := await req.receive():
        body += chunk
    await req.respond(200, [(b"x-len", b"%d" % len(body))])
    await req.send(bytes(body))
    await req.send_trailers([*(req.trailers or []), (b"grpc-status", b"0")])


class Raw:
    """A client that writes whatever frames it likes and reads the server's frames
    (h2's FrameBuffer parses them; no client state machine to object)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.frames = FrameBuffer(server=False)
        self.frames.max_frame_size = 2**24 - 1
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.closed = False
        self.goaway: int | None = None
        self.resets: dict[int, int] = {}
        self.statuses: dict[int, bytes] = {}
        self.sent = 0
        self.next_sid = 1

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int, *, preface: bool = True) -> AsyncIterator[Raw]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        raw = cls(stream)
        try:
            if preface:
                await raw.send(PREFACE + SettingsFrame(0).serialize())
            yield raw
        finally:
            await stream.aclose()

    async def send(self, data: bytes) -> bool:
        """False once the server closed (the write failed)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True
            return False
        self.sent += len(data)
        return True

    def headers(self, sid: int, headers: list[tuple[bytes, bytes]], *,
                end_stream: bool = False, end_headers: bool = True) -> bytes:
        """A header block, split into HEADERS + CONTINUATION at 16 KiB as a client
        must; ``end_headers=False`` leaves it unfinished."""
        block = self.enc.encode(headers)
        parts = [block[i:i + 16384] for i in range(0, len(block), 16384)] or [b""]
        out = b""
        for i, part in enumerate(parts):
            f: HeadersFrame | ContinuationFrame = HeadersFrame(sid) if i == 0 \
                else ContinuationFrame(sid)
            f.data = part
            if end_headers and i == len(parts) - 1:
                f.flags.add("END_HEADERS")
            if end_stream and i == 0:
                f.flags.add("END_STREAM")
            out += f.serialize()
        return out

    def new_sid(self) -> int:
        sid = self.next_sid
        self.next_sid += 2
        return sid

    async def pump(self) -> bool:
        """Read once and note what came; False at EOF or reset."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.frames.add_data(data)
        for f in self.frames:
            self._note(f)
        return True

    def _note(self, f: Frame) -> None:
        if isinstance(f, GoAwayFrame):
            self.goaway = f.error_code
        elif isinstance(f, RstStreamFrame):
            self.resets[f.stream_id] = f.error_code
        elif isinstance(f, HeadersFrame):
            hs = dict(self.dec.decode(f.data, raw=True))
            if b":status" in hs:
                self.statuses[f.stream_id] = hs[b":status"]

    async def until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while not done() and await self.pump():
                pass

    async def until_closed(self, timeout: float = 10.0) -> None:
        await self.until(lambda: False, timeout)


async def well_behaved(port: int) -> int:
    """One plain request on a fresh connection, through a real h2 client: its status."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, REQ, end_stream=True)
    try:
        await stream.send_all(conn.data_to_send())
        with trio.fail_after(10):
            while True:
                data = await stream.receive_some(65536)
                assert data, "the server closed a well-behaved connection"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        return int(dict(ev.headers or [])[b":status"])
                out = conn.data_to_send()
                if out:
                    await stream.send_all(out)
    finally:
        await stream.aclose()


async def ok(req: H2Request) -> None:
    await req.respond(200, [], end_stream=True)


async def hang_or_ok(req: H2Request) -> None:
    if req.path == b"/p" and req.method == b"POST" and not req.end_stream:
        await trio.sleep_forever()
    await ok(req)


# --- rapid reset -------------------------------------------------------------------

@trio_test
async def test_rapid_reset_gets_goaway_and_cancels_every_handler() -> None:
    lim = H2Limits(max_resets=200, reset_window=10.0)
    async with sidecar(hang_or_ok, lim) as side:
        async with Raw.connect(side.port) as raw:
            for _ in range(50):  # 5000 streams opened and reset, 100 per write
                batch = b""
                for _ in range(100):
                    sid = raw.new_sid()
                    batch += raw.headers(sid, REQ)
                    rst = RstStreamFrame(sid)
                    rst.error_code = CANCEL
                    batch += rst.serialize()
                if not await raw.send(batch):
                    break
            await raw.until_closed()
            assert raw.goaway == ENHANCE_YOUR_CALM
        session = side.sessions[0]
        assert session.error is not None and session.error.code == ENHANCE_YOUR_CALM
        assert session.stats["resets_received"] <= lim.max_resets + 1
        await trio.testing.wait_all_tasks_blocked()
        assert side.live == 0  # every handler the flood started was cancelled
        assert side.started <= lim.max_resets + lim.max_concurrent_streams
        assert await well_behaved(side.port) == 200


# --- CONTINUATION flood --------------------------------------------------------------

@pytest.mark.parametrize("size", [16384, 0])
@trio_test
async def test_continuation_flood_closes_the_connection_with_memory_bounded(size: int) -> None:
    lim = H2Limits()
    async with sidecar(ok, lim) as side:
        frame = ContinuationFrame(1)
        frame.data = b"\x00" * size
        flood = frame.serialize() * (64 if size else 4096)  # 1 MiB or 36 KiB per write
        tracemalloc.start()
        try:
            async with Raw.connect(side.port) as raw:
                await raw.send(raw.headers(1, REQ, end_headers=False))
                for _ in range(64):  # up to 64 MiB of CONTINUATION, never END_HEADERS
                    if not await raw.send(flood):
                        break
                await raw.until_closed()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert raw.closed
        assert raw.goaway in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR, None)
        session = side.sessions[0]
        assert session.error is not None
        assert side.started == 0
        # Everything the process allocated meanwhile, the attacker's 1 MiB write included.
        assert peak < lim.bound_bytes() + len(flood)
        assert await well_behaved(side.port) == 200


# --- oversized header lists -----------------------------------------------------------

@trio_test
async def test_oversized_header_list_is_refused_431_and_the_connection_goes_on() -> None:
    async with sidecar(ok) as side:
        async with Raw.connect(side.port) as raw:
            big = [(b"x-big-%d" % i, b"v" * 1000) for i in range(20)]  # ~20 KiB
            await raw.send(raw.headers(1, REQ + big, end_stream=True))
            await raw.send(raw.headers(3, REQ, end_stream=True))
            await raw.until(lambda: 1 in raw.statuses and 3 in raw.statuses)
            assert raw.statuses == {1: b"431", 3: b"200"}
            assert raw.goaway is None
        assert side.started == 1


@trio_test
async def test_hpack_bomb_ends_the_connection_with_enhance_your_calm() -> None:
    async with sidecar(ok) as side:
        async with Raw.connect(side.port) as raw:
            bomb = REQ + [(b"x-bomb", b"b" * 3900)] * 40  # ~160 KiB decoded, ~4 KiB sent
            await raw.send(raw.headers(1, bomb, end_stream=True))
            await raw.until_closed()
            assert raw.goaway == ENHANCE_YOUR_CALM
        assert side.started == 0
        assert await well_behaved(side.port) == 200


# --- flow control abuse ---------------------------------------------------------------

@trio_test
async def test_a_body_past_the_window_is_a_flow_control_error_and_nothing_more_is_held(
        ) -> None:
    lim = H2Limits()
    async with sidecar(hang, lim) as side:
        async with Raw.connect(side.port) as raw:
            await raw.send(raw.headers(1, REQ))
            chunk = DataFrame(1)
            chunk.data = b"z" * lim.max_frame_size
            data = chunk.serialize()
            for _ in range(4 * lim.connection_window // lim.max_frame_size):
                if not await raw.send(data):  # never waits for a WINDOW_UPDATE
                    break
            await raw.until_closed()
            assert raw.goaway == FLOW_CONTROL_ERROR
        session = side.sessions[0]
        assert 0 < session.peak_buffered <= lim.stream_window
        await trio.testing.wait_all_tasks_blocked()
        assert side.live == 0


@trio_test
async def test_unread_bodies_on_many_streams_hold_at_most_the_connection_window() -> None:
    """A client within the rules: 20 streams each with 1 MiB to upload to a handler
    that reads nothing. Each stream fills its window, the connection's caps them all."""
    lim = H2Limits()
    async with sidecar(hang, lim) as side:
        stream = await trio.open_tcp_stream("127.0.0.1", side.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        with trio.move_on_after(2):  # until the windows are shut and stay shut
            sids: list[int] = []
            while True:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not sids and conn.remote_settings.initial_window_size == lim.stream_window:
                    for _ in range(20):
                        sid = conn.get_next_available_stream_id()
                        conn.send_headers(sid, REQ)
                        sids.append(sid)
                for sid in sids:
                    while (n := min(conn.local_flow_control_window(sid),
                                    conn.max_outbound_frame_size)) > 0:
                        conn.send_data(sid, b"u" * n)
                await stream.send_all(conn.data_to_send())
        await stream.aclose()
        session = side.sessions[0]
        assert session.peak_buffered == lim.connection_window  # filled, never past
        assert side.started == 20


@mock_clock_test
async def test_a_client_that_never_reads_responses_bounds_what_we_hold() -> None:
    """Huge windows advertised, the socket never read: the server's sends stop at the
    kernel's buffers, what the process holds stays below the bound, and the stalled
    sends end (send_timeout) instead of waiting for ever."""
    lim = H2Limits()
    payload = b"r" * (8 * 1024 * 1024)
    failures: list[str] = []

    async def big(req: H2Request) -> None:
        await req.respond(200, [])
        try:
            for _ in range(4):
                await req.send(payload)
        except Exception as e:  # the stream or connection given up
            failures.append(type(e).__name__)
            raise

    async with sidecar(big, lim) as side:
        tracemalloc.start()
        try:
            async with Raw.connect(side.port, preface=False) as raw:
                settings = SettingsFrame(0)
                settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1}
                grow = WindowUpdateFrame(0)
                grow.window_increment = 2**31 - 1 - 65535
                batch = PREFACE + settings.serialize() + grow.serialize()
                for _ in range(lim.max_concurrent_streams):
                    batch += raw.headers(raw.new_sid(), REQ, end_stream=True)
                await raw.send(batch)
                # Never read: let the server fill the socket and stall.
                await trio.sleep(lim.send_timeout * 3)
                _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert side.started == lim.max_concurrent_streams
        assert side.live == 0, "stalled sends were not given up"
        assert peak < lim.bound_bytes()


@mock_clock_test
async def test_a_peer_that_never_opens_its_window_makes_sends_give_up() -> None:
    lim = H2Limits()
    gave_up: list[float] = []

    async def big(req: H2Request) -> None:
        await req.respond(200, [])
        start = trio.current_time()
        try:
            await req.send(b"w" * (1024 * 1024))
        except Exception:
            gave_up.append(trio.current_time() - start)
            raise

    async with sidecar(big, lim) as side:
        async with Raw.connect(side.port) as raw:  # default 64 KiB windows, never grown
            await raw.send(raw.headers(1, REQ, end_stream=True))
            with trio.move_on_after(lim.send_timeout * 3):
                await raw.until_closed(timeout=lim.send_timeout * 3)
        assert gave_up and gave_up[0] == pytest.approx(lim.send_timeout, abs=1.0)
        assert side.sessions[0].buffered == 0


# --- concurrency --------------------------------------------------------------------

@trio_test
async def test_streams_past_max_concurrent_are_refused_alone() -> None:
    lim = H2Limits(max_concurrent_streams=100)
    async with sidecar(hang_or_ok, lim) as side, Raw.connect(side.port) as raw:
        batch = b"".join(raw.headers(raw.new_sid(), REQ) for _ in range(150))
        await raw.send(batch)
        await raw.until(lambda: len(raw.resets) >= 50)
        assert set(raw.resets.values()) == {REFUSED_STREAM}
        assert sorted(raw.resets) == list(range(201, 300, 2))  # the newest 50
        assert raw.goaway is None
        assert side.live == 100
        # One ends; once its handler is gone the connection takes a new stream.
        accepted = sorted(set(range(1, 300, 2)) - set(raw.resets))
        rst = RstStreamFrame(accepted[0])
        rst.error_code = CANCEL
        await raw.send(rst.serialize())
        with trio.fail_after(5):
            while side.live > 99:
                await trio.sleep(0.01)
        sid = raw.new_sid()
        await raw.send(raw.headers(sid, [*REQ[:3], (b":path", b"/x")], end_stream=True))
        await raw.until(lambda: sid in raw.statuses or sid in raw.resets)
        assert raw.statuses.get(sid) == b"200"


@trio_test
async def test_a_client_that_vanishes_with_a_reset_leaves_the_listener_serving() -> None:
    async with sidecar(hang_or_ok) as side:
        async with Raw.connect(side.port) as raw:
            await raw.send(b"".join(raw.headers(raw.new_sid(), REQ) for _ in range(10)))
            with trio.fail_after(5):
                while side.live < 10:
                    await trio.sleep(0.01)
            sock = raw.stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with trio.fail_after(5):
            while side.live:
                await trio.sleep(0.01)
        assert side.cancelled == 10
        assert await well_behaved(side.port) == 200


# --- garbage and silence --------------------------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"\xff" * 64,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"\x00" * 8,  # PING on stream 1
])
@trio_test
async def test_garbage_after_the_preface_ends_that_connection_only(garbage: bytes) -> None:
    async with sidecar(ok) as side:
        async with Raw.connect(side.port) as raw:
            await raw.send(garbage)
            await raw.until_closed()
            assert raw.goaway in (PROTOCOL_ERROR, FRAME_SIZE_ERROR)
        assert side.sessions[0].error is not None
        assert await well_behaved(side.port) == 200


@mock_clock_test
async def test_a_preface_without_settings_is_closed_after_preface_timeout() -> None:
    lim = H2Limits(preface_timeout=5.0)
    async with sidecar(ok, lim) as side:
        async with Raw.connect(side.port, preface=False) as raw:
            start = trio.current_time()
            await raw.send(PREFACE)  # and never its SETTINGS
            await raw.until_closed(timeout=60)
            took = trio.current_time() - start
        assert lim.preface_timeout <= took <= lim.preface_timeout + 1.5
        assert await well_behaved(side.port) == 200


@mock_clock_test
async def test_a_slow_partial_preface_is_closed_by_the_listeners_first_byte_limit() -> None:
    plim = ProxyLimits(first_byte_timeout=5.0)
    async with sidecar(ok, proxy_limits=plim) as side:
        async with Raw.connect(side.port, preface=False) as raw:
            start = trio.current_time()
            await raw.send(PREFACE[:10])
            await raw.until_closed(timeout=60)
            took = trio.current_time() - start
        assert plim.first_byte_timeout <= took <= plim.first_byte_timeout + 1.5
        assert not side.sessions  # never got as far as HTTP/2


@mock_clock_test
async def test_an_idle_connection_is_closed_after_idle_timeout() -> None:
    lim = H2Limits(idle_timeout=20.0)
    async with sidecar(ok, lim) as side:
        async with Raw.connect(side.port) as raw:
            start = trio.current_time()
            await raw.send(raw.headers(1, REQ, end_stream=True))
            await raw.until_closed(timeout=120)
            took = trio.current_time() - start
            assert raw.statuses == {1: b"200"}
            assert raw.goaway == 0  # a graceful GOAWAY
        assert lim.idle_timeout <= took <= lim.idle_timeout + 1.5


@trio_test
async def test_shutdown_sends_a_graceful_goaway() -> None:
    async with sidecar(hang_or_ok) as side, Raw.connect(side.port) as raw:
        await raw.send(raw.headers(1, REQ))
        with trio.fail_after(5):
            while side.live < 1:
                await trio.sleep(0.01)
        side.stop()  # the listener shuts down (the agent stopping)
        await raw.until_closed()
        assert raw.goaway == 0  # NO_ERROR
        assert side.cancelled == 1


@trio_test
async def test_a_ping_flood_gets_enhance_your_calm() -> None:
    async with sidecar(ok) as side:
        async with Raw.connect(side.port) as raw:
            ping = PingFrame(0)
            ping.opaque_data = b"12345678"
            flood = ping.serialize() * 500
            for _ in range(10):
                if not await raw.send(flood):
                    break
            await raw.until_closed()
            assert raw.goaway == ENHANCE_YOUR_CALM
        assert await well_behaved(side.port) == 200


# --- and the plain case ---------------------------------------------------------------

@trio_test
async def test_many_streams_with_bodies_past_the_windows_and_trailers_both_ways() -> None:
    lim = H2Limits(stream_window=64 * 1024, connection_window=128 * 1024)
    n_streams, size = 30, 300 * 1024
    async with sidecar(echo, lim) as side:
        stream = await trio.open_tcp_stream("127.0.0.1", side.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                    header_encoding=None))
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        bodies = {}
        to_send: dict[int, memoryview] = {}
        got: dict[int, bytearray] = {}
        trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        with trio.fail_after(30):
            while conn.remote_settings.initial_window_size != lim.stream_window:
                conn.receive_data(await stream.receive_some(65536))
            for i in range(n_streams):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, [*REQ, (b"te", b"trailers")])
                bodies[sid] = bytes([i]) * size
                to_send[sid] = memoryview(bodies[sid])
                got[sid] = bytearray()
            while len(trailers) < n_streams:
                for sid, left in list(to_send.items()):
                    n = min(len(left), conn.local_flow_control_window(sid),
                            conn.max_outbound_frame_size)
                    if n:
                        conn.send_data(sid, left[:n].tobytes())
                        to_send[sid] = left = left[n:]
                    if not left:
                        conn.send_headers(sid, [(b"x-sum", b"%d" % sid)], end_stream=True)
                        del to_send[sid]
                await stream.send_all(conn.data_to_send())
                data = await stream.receive_some(65536)
                assert data
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        got[ev.stream_id] += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length,
                                                       ev.stream_id)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        trailers[ev.stream_id] = list(ev.headers or [])
                    elif isinstance(ev, h2.events.StreamReset):
                        raise AssertionError(f"stream {ev.stream_id} reset")
                await stream.send_all(conn.data_to_send())
        await stream.aclose()
        assert {sid: bytes(b) for sid, b in got.items()} == bodies
        assert all(t == [(b"x-sum", b"%d" % sid), (b"grpc-status", b"0")]
                   for sid, t in trailers.items())
        assert side.sessions[0].peak_buffered <= lim.connection_window


# --- a hostile callee: the client side (H2Upstreams) under the same attacks ------------

Attack = Callable[[h2.connection.H2Connection, int], list[bytes]]


async def hostile_server(attack: Attack,
                         task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    """A bare h2 server that answers each request with ``attack``'s raw bytes (written
    piece by piece, so the attacker's own copies do not count in what we measure)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def on(stream: trio.SocketStream) -> None:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                 header_encoding=None))
        c.initiate_connection()
        try:
            await stream.send_all(c.data_to_send())
            while data := await stream.receive_some(65536):
                pieces: list[bytes] = []
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        pieces += [c.data_to_send(), *attack(c, int(ev.stream_id or 0))]
                for piece in [*pieces, c.data_to_send()]:
                    await stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(on, listeners)


@functools.cache
def _frames(kind: str) -> bytes:
    """The attacks' big pieces, built before memory is measured."""
    f: Frame
    if kind == "continuation":
        f = ContinuationFrame(1)
        f.data = b"\x00" * 16384
        return f.serialize() * 200  # 3.2 MiB, never END_HEADERS
    if kind == "ping":
        f = PingFrame(0)
        f.opaque_data = b"pingpong"
        return f.serialize() * 3000
    f = DataFrame(1)
    f.data = b"d" * 16384
    return f.serialize() * 80  # 1.25 MiB, past every window


def _bomb(c: h2.connection.H2Connection, sid: int) -> list[bytes]:
    f = HeadersFrame(sid)
    f.data = hpack.Encoder().encode([(b":status", b"200")] + [(b"x-bomb", b"b" * 3900)] * 40)
    f.flags.add("END_HEADERS")
    return [f.serialize()]


def _continuations(c: h2.connection.H2Connection, sid: int) -> list[bytes]:
    head = HeadersFrame(sid)
    head.data = hpack.Encoder().encode([(b":status", b"200")])
    return [head.serialize(), _frames("continuation")]


def _pings(c: h2.connection.H2Connection, sid: int) -> list[bytes]:
    return [_frames("ping")]


def _overrun(c: h2.connection.H2Connection, sid: int) -> list[bytes]:
    c.send_headers(sid, [(b":status", b"200")])
    return [c.data_to_send(), _frames("data")]


@pytest.mark.parametrize("attack", [_bomb, _continuations, _pings, _overrun])
@trio_test
async def test_a_hostile_callee_fails_the_call_as_502_and_no_more(attack: Attack) -> None:
    from rumor.proxy.h2_client import H2Upstreams
    from rumor.proxy.pool import TryFailed

    for kind in ("continuation", "ping", "data"):
        _frames(kind)
    async with trio.open_nursery() as n:
        port = await n.start(hostile_server, attack)
        wd = Watchdog()
        n.start_soon(wd.run)
        ups = H2Upstreams(wd)
        tracemalloc.start()
        try:
            with trio.fail_after(10):
                call = await ups.open(("127.0.0.1", port), method=b"GET", scheme=b"http",
                                      authority=b"x", path=b"/", headers=[],
                                      end_stream=True,
                                      connect_deadline=trio.current_time() + 5)
                with pytest.raises(TryFailed) as e:
                    await call.response()
                    # Take nothing for a while: the data pushed past our windows must
                    # end the connection (taking it would credit the windows back).
                    await trio.sleep(0.5)
                    while await call.receive():
                        pass
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert e.value.condition == "502"
        assert not ups.has_idle("127.0.0.1", port)  # that connection is not reused
        assert peak < DEFAULT.bound_bytes()
        ups.close()
        n.cancel_scope.cancel()
