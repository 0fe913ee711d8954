"""The HTTP/2 core (proxy/h2_session.py) driven by an in-process h2 client, no sockets:
its SETTINGS, flow control that holds at most the windows, and every attack limit
(rapid reset, control-frame and CONTINUATION floods, oversized header lists, HPACK
bombs, over-long frames, window overruns) ending in its own error with the GOAWAY
queued; and fuzzing: random bytes and random frames never raise anything else."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rumor.proxy.h2_session import H2Limits, H2Session, SessionError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
FLOW_CONTROL_ERROR = 0x3
REFUSED_STREAM = 0x7
REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"),
       (b":path", b"/p")]


def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    return c


def _pair(limits: H2Limits | None = None) -> tuple[h2.connection.H2Connection, H2Session]:
    server = H2Session(limits or H2Limits(), client_side=False)
    server.start()
    client = _client()
    server.receive(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send())
    server.receive(client.data_to_send(), 0.0)  # the client's SETTINGS ACK
    return client, server


def _up(client: h2.connection.H2Connection, server: H2Session,
        now: float = 0.0) -> list[h2.events.Event]:
    return server.receive(client.data_to_send(), now)


def _down(client: h2.connection.H2Connection, server: H2Session) -> list[h2.events.Event]:
    return client.receive_data(server.data_to_send())


def _goaway_code(client: h2.connection.H2Connection, server: H2Session) -> int | None:
    for ev in _down(client, server):
        if isinstance(ev, h2.events.ConnectionTerminated):
            return int(ev.error_code or 0)
    return None


def _server_preface(limits: H2Limits) -> bytes:
    """What a client needs to feed before the frames under test."""
    return PREFACE + SettingsFrame(0).serialize()


# --- settings and flow control ------------------------------------------------

def test_settings_advertise_the_limits() -> None:
    lim = H2Limits()
    client, _ = _pair(lim)
    rs = client.remote_settings
    assert rs.max_concurrent_streams == lim.max_concurrent_streams
    assert rs.max_header_list_size == lim.max_header_list_size
    assert rs.initial_window_size == lim.stream_window
    assert rs.max_frame_size == lim.max_frame_size
    # The connection window was opened to its limit.
    assert client.outbound_flow_control_window == lim.connection_window


def test_received_data_is_held_within_the_windows_and_credited_when_taken() -> None:
    lim = H2Limits()
    client, server = _pair(lim)
    sids = []
    for _ in range(6):  # 6 x 256 KiB asked, the connection window is 1 MiB
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQ)
        sids.append(sid)
    sent = dict.fromkeys(sids, 0)
    for sid in sids:
        while (n := min(client.local_flow_control_window(sid), lim.max_frame_size)) > 0:
            client.send_data(sid, b"x" * n)
            sent[sid] += n
        assert server.held(sid) <= lim.stream_window
    _up(client, server)
    assert sum(sent.values()) == lim.connection_window  # the client could send no more
    assert server.buffered == lim.connection_window
    assert all(server.held(s) <= lim.stream_window for s in sids)
    assert client.local_flow_control_window(sids[-1]) == 0
    # Nothing was credited back: a slow consumer holds the peer off.
    _down(client, server)
    assert client.outbound_flow_control_window == 0
    # The consumer takes the first stream's data: credit returns, the peer may send.
    server.consumed(sids[0], sent[sids[0]])
    _down(client, server)
    assert client.outbound_flow_control_window >= sent[sids[0]] // 2
    assert client.local_flow_control_window(sids[0]) > 0
    assert server.buffered == lim.connection_window - sent[sids[0]]


def test_a_peer_that_overruns_the_window_is_a_flow_control_error() -> None:
    lim = H2Limits(stream_window=65535)
    client, server = _pair(lim)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQ)
    _up(client, server)
    raw = b""
    for _ in range(5):  # 80 KiB on a 64 KiB stream window, framing by hyperframe
        f = DataFrame(sid)
        f.data = b"y" * 16384
        raw += f.serialize()
    with pytest.raises(SessionError) as e:
        server.receive(raw, 0.0)
    assert e.value.code == FLOW_CONTROL_ERROR
    assert server.buffered <= lim.stream_window


# --- rapid reset and floods -----------------------------------------------------

def _open_and_reset(client: h2.connection.H2Connection, n: int) -> None:
    for _ in range(n):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQ)
        client.reset_stream(sid, 0x8)


def test_rapid_reset_ends_the_connection_with_enhance_your_calm() -> None:
    lim = H2Limits(max_resets=200, reset_window=10.0)
    client, server = _pair(lim)
    _open_and_reset(client, 200)
    _up(client, server, now=1.0)  # at the limit: still served
    _open_and_reset(client, 1)
    with pytest.raises(SessionError) as e:
        _up(client, server, now=2.0)
    assert e.value.code == ENHANCE_YOUR_CALM
    assert _goaway_code(client, server) == ENHANCE_YOUR_CALM
    with pytest.raises(SessionError):  # and it stays over
        server.receive(b"", 3.0)


def test_resets_spread_over_time_are_not_an_attack() -> None:
    lim = H2Limits(max_resets=200, reset_window=10.0)
    client, server = _pair(lim)
    for t in range(5):  # 150 per 11 s: 750 in all, never 200 in one window
        _open_and_reset(client, 150)
        _up(client, server, now=t * 11.0)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQ, end_stream=True)
    assert any(isinstance(ev, h2.events.RequestReceived) for ev in _up(client, server, 60.0))


def _answer(server: H2Session, sid: int) -> None:
    """The server's whole answer: HEADERS, a DATA frame, trailers (as gRPC answers)."""
    server.conn.send_headers(sid, [(b":status", b"200")])
    server.conn.send_data(sid, b"\x00\x00\x00\x00\x02hi")
    server.conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)


def test_ordinary_grpc_traffic_earns_its_control_frames() -> None:
    """A gRPC client answers every response with WINDOW_UPDATEs (its stream and the
    connection) and pings now and then: 3000 calls in 5 s (18,000 frames of work,
    6,300 control frames) must not look like a flood of 1,000."""
    lim = H2Limits(max_control_frames=1000, control_window=10.0)
    client, server = _pair(lim)
    for i in range(3000):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQ)
        client.send_data(sid, b"\x00\x00\x00\x00\x05hello", end_stream=True)
        _up(client, server, now=i / 600)
        server.consumed(sid, 10)
        _answer(server, sid)
        _down(client, server)
        client.increment_flow_control_window(7)  # the connection's
        if i % 10 == 0:
            client.ping(i.to_bytes(8, "big"))
        _up(client, server, now=i / 600)
    assert server.error is None and server.stats["goaway_calm"] == 0
    # Control frames beyond the work still count: 1,001 pings with nothing else.
    with pytest.raises(SessionError) as e:
        for i in range(1001 + 4 * 1000):
            client.ping(i.to_bytes(8, "big"))
            _up(client, server, now=6.0)
    assert e.value.code == ENHANCE_YOUR_CALM


def test_a_reset_after_the_whole_response_is_not_a_rapid_reset() -> None:
    """RST_STREAM NO_ERROR from a peer whose stream we already answered in full
    cancels nothing (RFC 9113 §8.1); only resets of streams still being worked on
    count toward ``max_resets``."""
    lim = H2Limits(max_resets=200, reset_window=10.0)
    client, server = _pair(lim)
    for i in range(1000):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQ)  # its side stays open
        _up(client, server, now=i / 200)
        _answer(server, sid)
        _down(client, server)
        client.reset_stream(sid, 0)
        _up(client, server, now=i / 200)
    assert server.error is None
    assert server.stats["resets_after_completion"] == 1000
    assert server.stats["resets_received"] == 0
    _open_and_reset(client, 201)  # unanswered: the attack, counted as before
    with pytest.raises(SessionError) as e:
        _up(client, server, now=5.5)
    assert e.value.code == ENHANCE_YOUR_CALM


def test_as_a_client_a_callee_resetting_after_its_whole_answer_is_not_counted() -> None:
    lim = H2Limits(max_resets=200, reset_window=10.0)
    session = H2Session(lim, client_side=True)
    session.start()
    callee = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                  header_encoding=None))
    callee.initiate_connection()
    callee.receive_data(session.data_to_send())
    session.receive(callee.data_to_send(), 0.0)
    callee.receive_data(session.data_to_send())
    for i in range(500):
        sid = session.conn.get_next_available_stream_id()
        session.conn.send_headers(sid, REQ)  # the request body still to come
        callee.receive_data(session.data_to_send())
        callee.send_headers(sid, [(b":status", b"200")])
        callee.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        callee.reset_stream(sid, 0)  # as gRPC servers do when the client has not ended
        session.receive(callee.data_to_send(), i / 100)
    assert session.error is None
    assert session.stats["resets_after_completion"] == 500


def _overflow_window(sid: int) -> bytes:
    f = WindowUpdateFrame(sid)
    f.window_increment = 2**31 - 1  # past the largest window: h2 resets the stream
    return f.serialize()


def _data_after_end(sid: int) -> bytes:
    end = DataFrame(sid)
    end.data = b"x"
    end.flags.add("END_STREAM")
    more = DataFrame(sid)
    more.data = b"y"  # on a half-closed stream: h2 resets it (STREAM_CLOSED)
    return end.serialize() + more.serialize()


@pytest.mark.parametrize("provoke", [_overflow_window, _data_after_end])
def test_streams_the_peer_makes_us_reset_count_as_resets(
        provoke: Callable[[int], bytes]) -> None:
    """MadeYouReset (CVE-2025-8671): no RST_STREAM from the peer, yet each of its
    streams is started and reset at once; the same limit as rapid reset applies."""
    lim = H2Limits(max_resets=200)
    _, server = _pair(lim)
    enc = hpack.Encoder()
    started = 0
    with pytest.raises(SessionError) as e:
        for i in range(1000):
            sid = 1 + 2 * i
            frames = _headers_frame(sid, enc.encode(REQ), end_headers=True) + provoke(sid)
            started += sum(isinstance(ev, h2.events.RequestReceived)
                           for ev in server.receive(frames, i / 1000))
    assert e.value.code == ENHANCE_YOUR_CALM
    assert started <= lim.max_resets + 1
    assert server.stats["resets_provoked"] == lim.max_resets + 1


@pytest.mark.parametrize("kind", ["ping", "settings", "empty-data", "priority",
                                  "tiny-window-update"])
def test_control_frame_floods_end_the_connection(kind: str) -> None:
    lim = H2Limits(max_control_frames=1000)
    client, server = _pair(lim)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQ)
    _up(client, server)

    def one(i: int) -> bytes:
        f: Frame
        if kind == "ping":
            f = PingFrame(0)
            f.opaque_data = i.to_bytes(8, "big")
        elif kind == "settings":
            f = SettingsFrame(0)
        elif kind == "empty-data":
            f = DataFrame(sid)
        elif kind == "priority":
            f = PriorityFrame(sid + 2 * (i + 1))
            f.depends_on = 0
            f.stream_weight = 15
        else:
            f = WindowUpdateFrame(0)
            f.window_increment = 1
        return f.serialize()

    with pytest.raises(SessionError) as e:
        for i in range(0, 2000, 100):
            server.receive(b"".join(one(j) for j in range(i, i + 100)), 0.5)
    assert e.value.code == ENHANCE_YOUR_CALM
    # Replies queued before the cut are bounded by the flood that provoked them.
    assert len(server.data_to_send()) < 1100 * 17 + 1024


def _headers_frame(sid: int, block: bytes, *, end_headers: bool) -> bytes:
    f = HeadersFrame(sid)
    f.data = block
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


def _continuation(sid: int, block: bytes, *, end_headers: bool = False) -> bytes:
    f = ContinuationFrame(sid)
    f.data = block
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


def test_continuation_flood_of_big_frames_is_cut_by_bytes() -> None:
    lim = H2Limits()
    _client_conn, server = _pair(lim)
    block = hpack.Encoder().encode(REQ)
    server.receive(_headers_frame(1, block, end_headers=False), 0.0)
    tracemalloc.start()
    try:
        with pytest.raises(SessionError) as e:
            for _ in range(1000):  # 16 MiB of CONTINUATION, never END_HEADERS
                server.receive(_continuation(1, b"\x00" * 16384), 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.code == ENHANCE_YOUR_CALM
    assert peak < lim.bound_bytes()


def test_continuation_flood_of_empty_frames_is_cut_by_count() -> None:
    _client_conn, server = _pair()
    server.receive(_headers_frame(1, hpack.Encoder().encode(REQ), end_headers=False), 0.0)
    fed = 0
    with pytest.raises(SessionError):
        for fed in range(1, 100_000):  # noqa: B007 - counted below
            server.receive(_continuation(1, b""), 0.0)
    assert fed <= 65  # h2's backlog of 64 frames per header block


def test_oversized_header_list_is_refused_on_its_stream_with_431() -> None:
    lim = H2Limits()
    client, server = _pair(lim)
    sid = client.get_next_available_stream_id()
    big = [(b"x-big-%d" % i, b"v" * 1000) for i in range(20)]  # ~20 KiB > 16 KiB
    client.send_headers(sid, REQ + big, end_stream=True)
    events = _up(client, server)
    assert not any(isinstance(ev, h2.events.RequestReceived) for ev in events)
    answers = [ev for ev in _down(client, server) if isinstance(ev, h2.events.ResponseReceived)]
    assert [dict(a.headers or [])[b":status"] for a in answers] == [b"431"]
    # The connection goes on: HPACK stayed in sync.
    sid2 = client.get_next_available_stream_id()
    client.send_headers(sid2, REQ, end_stream=True)
    got = [ev for ev in _up(client, server) if isinstance(ev, h2.events.RequestReceived)]
    assert [ev.stream_id for ev in got] == [sid2]


def test_hpack_bomb_ends_the_connection() -> None:
    """A few KiB of header block that decode to ~100 KiB (one big field in the
    dynamic table, referenced again and again)."""
    lim = H2Limits()
    client, server = _pair(lim)
    enc = hpack.Encoder()
    field = (b"x-bomb", b"b" * 3900)
    block = enc.encode(REQ + [field] * 25)
    assert len(block) < 8 * 1024
    with pytest.raises(SessionError) as e:
        server.receive(_headers_frame(1, block, end_headers=True), 0.0)
    assert e.value.code == ENHANCE_YOUR_CALM
    assert _goaway_code(client, server) == ENHANCE_YOUR_CALM


def test_a_frame_longer_than_max_frame_size_is_refused_before_its_body_is_held() -> None:
    """h2 checks a frame's length only once its whole body is buffered; a peer
    announcing 16 MiB must be cut as soon as the 9-byte header is in."""
    lim = H2Limits()
    _client_conn, server = _pair(lim)
    f = DataFrame(1)
    f.data = b""
    header = bytearray(f.serialize())
    header[0:3] = (2**24 - 1).to_bytes(3, "big")
    tracemalloc.start()
    try:
        with pytest.raises(SessionError):
            server.receive(bytes(header), 0.0)
            for _ in range(256):  # 16 MiB of body
                server.receive(b"\x00" * 65536, 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < lim.bound_bytes()


def test_streams_past_max_concurrent_are_refused_alone_the_newest_ones() -> None:
    lim = H2Limits(max_concurrent_streams=10)
    _, server = _pair(lim)
    server.data_to_send()
    enc = hpack.Encoder()
    # A client ignoring MAX_CONCURRENT_STREAMS, by hand, all in one read.
    raw = b"".join(_headers_frame(1 + 2 * i, enc.encode(REQ), end_headers=True)
                   for i in range(20))
    opened = [int(ev.stream_id or 0) for ev in server.receive(raw, 0.0)
              if isinstance(ev, h2.events.RequestReceived)]
    buf = FrameBuffer(server=False)
    buf.max_frame_size = lim.max_frame_size
    buf.add_data(server.data_to_send())
    refused = {f.stream_id: f.error_code for f in buf if isinstance(f, RstStreamFrame)}
    assert opened == [1 + 2 * i for i in range(10)]  # the first ten run
    assert refused == {1 + 2 * i: REFUSED_STREAM for i in range(10, 20)}
    assert server.error is None


# --- fuzzing ---------------------------------------------------------------------

def _feed_all(server: H2Session, chunks: list[bytes]) -> None:
    for i, chunk in enumerate(chunks):
        try:
            server.receive(chunk, float(i))
        except SessionError:
            with pytest.raises(SessionError):
                server.receive(b"\x00" * 9, float(i))
            return


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_after_the_preface_raise_only_session_error(chunks: list[bytes]) -> None:
    server = H2Session(H2Limits(), client_side=False)
    server.start()
    _feed_all(server, [_server_preface(H2Limits()), *chunks])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_instead_of_a_preface_raise_only_session_error(data: bytes) -> None:
    server = H2Session(H2Limits(), client_side=False)
    server.start()
    _feed_all(server, [data])


_sids = st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1])


def _frame(kind: str, sid: int, payload: bytes, flags: list[str], n: int) -> bytes:
    try:
        return _build(kind, sid, payload, flags, n)
    except Exception:  # a combination hyperframe will not write: a raw empty DATA
        return DataFrame(1).serialize()


def _build(kind: str, sid: int, payload: bytes, flags: list[str], n: int) -> bytes:
    f: Frame
    if kind == "headers":
        f = HeadersFrame(sid)
        f.data = payload
    elif kind == "continuation":
        f = ContinuationFrame(sid)
        f.data = payload
    elif kind == "data":
        f = DataFrame(sid)
        f.data = payload
    elif kind == "rst":
        f = RstStreamFrame(sid)
        f.error_code = n % 16
    elif kind == "window":
        f = WindowUpdateFrame(sid)
        f.window_increment = n % 2**31
    elif kind == "ping":
        f = PingFrame(0)
        f.opaque_data = payload[:8].ljust(8, b"\x00")
    elif kind == "goaway":
        f = GoAwayFrame(0)
        f.last_stream_id = sid
        f.error_code = n % 16
    else:
        f = SettingsFrame(0)
        f.settings = {(n % 7) + 1: n}
    for flag in flags:
        if flag in {d.name for d in f.defined_flags}:
            f.flags.add(flag)
    return f.serialize()


_frames = st.builds(
    _frame,
    st.sampled_from(["headers", "continuation", "data", "rst", "window", "ping", "goaway",
                     "settings"]),
    _sids,
    st.one_of(st.binary(max_size=64),
              st.just(hpack.Encoder().encode(REQ))),
    st.lists(st.sampled_from(["END_STREAM", "END_HEADERS", "ACK", "PADDED", "PRIORITY"]),
             max_size=3),
    st.integers(min_value=0, max_value=2**32),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frames, max_size=20))
def test_random_frames_raise_only_session_error(frames: list[bytes]) -> None:
    server = H2Session(H2Limits(), client_side=False)
    server.start()
    _feed_all(server, [_server_preface(H2Limits()), *frames])
    assert server.buffered <= H2Limits().connection_window


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frames, max_size=20))
def test_random_frames_to_a_client_raise_only_session_error(frames: list[bytes]) -> None:
    client = H2Session(H2Limits(), client_side=True)
    client.start()
    client.data_to_send()
    _feed_all(client, [SettingsFrame(0).serialize(), *frames])
