# layer: shell — HTTP/2 connections on sockets (trio)
"""HTTP/2 on a socket: the connection driver both sides share, and ``serve_h2``.

The protocol and its limits live in the sans-IO ``h2_session`` core; this shell
reads the socket into it, writes what it queues, and gives every stream a small
inbox. One writer task owns the socket's sending side: a stream queues frames in
the core and waits until the writer has put them on the wire, and all streams
together queue at most ``max_unsent`` bytes of DATA, so that is what a peer that
does not read makes us hold; a write that makes no progress for ``send_timeout``
expires the socket and ends the connection (in this task: an error never reaches the
listener).

Flow control bounds memory: a stream's received DATA stays in its inbox until the
consumer takes it (``receive``), and only then is it credited back to the peer, so
a stream holds at most ``stream_window`` bytes and the connection
``connection_window``. A send waits for the peer's window at most ``send_timeout``;
past it the stream is reset (a peer that opens streams and never reads them).

``serve_h2`` runs a task per stream in the connection's nursery, cancelled when the
peer resets the stream or the connection ends; it ends the connection with GOAWAY
on idle (``idle_timeout`` with no stream open), on a missing preface
(``preface_timeout``), on the core's limits, and when it is cancelled (shutdown).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes

from .h2_session import (
    SEND_BATCH,
    H2Limits,
    H2Session,
    SessionError,
    StreamRefused,
    error_name,
)
from .identity import Identity
from .sockio import ConnectionBroken, SocketIO, TimedOut

__all__ = ["H2Handler", "H2Limits", "H2Request", "StreamGone", "serve_h2"]

log = logging.getLogger("rumor.proxy.h2")

#: Called on answers the connection makes itself (as relay.ErrorHook).
ErrorHook = Callable[[str, int, str], None]


class StreamGone(Exception):
    """The stream was reset (by the peer or by our limits) or its connection ended."""

    def __init__(self, reason: str, code: int = int(ErrorCodes.CANCEL)) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Inbox:
    """What one stream received, waiting for its consumer."""

    __slots__ = ("chunks", "ended", "gone", "head", "head_ended", "scope", "trailers",
                 "wake")

    def __init__(self) -> None:
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.ended = False
        self.gone: StreamGone | None = None
        self.head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.head_ended = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.wake = trio.Event()
        #: Cancelled when the peer resets the stream (the server's handler task).
        self.scope: trio.CancelScope | None = None

    def kick(self) -> None:
        self.wake.set()

    async def changed(self) -> None:
        await self.wake.wait()
        self.wake = trio.Event()


class H2Conn:
    """One HTTP/2 connection on a socket: reader, writer, stream inboxes."""

    def __init__(self, io: SocketIO, session: H2Session) -> None:
        self.io = io
        self.session = session
        self.limits = session.limits
        self.inboxes: dict[int, Inbox] = {}
        self._dirty = trio.Event()
        self._queued = 0      # generation of what was queued
        self._written = 0     # generation the writer has put on the wire
        self._written_evt = trio.Event()
        #: DATA bytes queued in the core and not yet written (``max_unsent`` caps it).
        self.unsent = 0
        self._window_evt = trio.Event()
        self._state_evt = trio.Event()
        self.read_deadline = math.inf
        self._write_deadline = math.inf
        self.closed = False
        self.goaway_last: int | None = None   # the peer's GOAWAY last stream id
        self.error: str | None = None
        #: Called on each RequestReceived before the events after it (its DATA may
        #: come in the same read): the server starts the stream there.
        self.on_request: Callable[[h2.events.RequestReceived], None] | None = None
        #: Around the reader: cancelled when the last stream ends after a GOAWAY.
        self.drained = trio.CancelScope()

    # -- writing -------------------------------------------------------------------

    def kick(self) -> int:
        """Have the writer send what the core queued; the generation to wait for. The
        writer runs at the caller's next checkpoint, so the frames a handler queues
        without waiting (HEADERS, DATA, trailers of a gRPC answer) leave in one write."""
        self._queued += 1
        self._dirty.set()
        return self._queued

    async def flush(self) -> None:
        """Wait until everything queued so far is on the wire."""
        gen = self.kick()
        while self._written < gen:
            if self.closed:
                raise StreamGone(self.error or "the connection closed")
            await self._written_evt.wait()

    async def writer(self) -> None:
        """Until cancelled. A write that fails (the peer reset, or took nothing for
        ``send_timeout``) ends the connection here: it never leaves the task (it would
        reach the listener's nursery); the reader wakes with the socket expired."""
        try:
            await self._write_loop()
        except (ConnectionBroken, TimedOut) as e:
            self.end(f"write failed: {e or type(e).__name__}")
            if not self.io.closed:
                self.io.expire()
        finally:
            self.closed = True
            self._written_evt.set()

    async def _write_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            gen = self._queued
            taken = self.unsent  # all of it is in what data_to_send returns
            data = self.session.data_to_send()
            if data:
                io = self.io
                # A peer that takes nothing for send_timeout loses the connection.
                self._write_deadline = trio.current_time() + self.limits.send_timeout
                io.set_deadline(min(self.read_deadline, self._write_deadline))
                await io.send(data)
                self._write_deadline = math.inf
                io.set_deadline(self.read_deadline)
            self.unsent -= taken
            self._written = gen
            self._written_evt.set()
            self._written_evt = trio.Event()

    # -- reading -------------------------------------------------------------------

    def set_read_deadline(self, when: float) -> None:
        self.read_deadline = when
        self.io.set_deadline(min(when, self._write_deadline))

    def idle_deadline(self) -> None:
        """No stream open: the connection may idle for ``idle_timeout``; with one open,
        the streams' own deadlines (the consumer's) apply."""
        if self.inboxes:
            self.set_read_deadline(math.inf)
        else:
            self.set_read_deadline(trio.current_time() + self.limits.idle_timeout)

    def feed(self, data: bytes) -> list[h2.events.Event]:
        """Into the core; the events, with inbox bookkeeping done. Raises SessionError."""
        events = self.session.receive(data, trio.current_time())
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                if self.on_request is not None:
                    self.on_request(ev)
            elif isinstance(ev, h2.events.DataReceived):
                box = self.inboxes.get(ev.stream_id)
                if box is None:
                    self.session.forget(ev.stream_id)
                else:
                    box.chunks.append((ev.data or b"", ev.flow_controlled_length or 0))
                    if ev.stream_ended is not None:
                        box.ended = True
                    box.kick()
            elif isinstance(ev, h2.events.StreamEnded):
                box = self.inboxes.get(ev.stream_id)
                if box is not None:
                    box.ended = True
                    box.kick()
            elif isinstance(ev, h2.events.TrailersReceived):
                box = self.inboxes.get(ev.stream_id)
                if box is not None:
                    box.trailers = list(ev.headers or [])
                    box.ended = ev.stream_ended is not None or box.ended
                    box.kick()
            elif isinstance(ev, (h2.events.StreamReset, StreamRefused)):
                box = self.inboxes.get(ev.stream_id)
                if box is not None and box.gone is None:
                    code = int(ev.error_code or 0)
                    box.gone = StreamGone(
                        ev.reason if isinstance(ev, StreamRefused) else
                        f"the peer reset the stream ({error_name(code)})", code)
                    box.kick()
                    if box.scope is not None:
                        box.scope.cancel()
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self.window_opened()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway_last = int(ev.last_stream_id or 0)
                if not self.inboxes:
                    self.drained.cancel()
        return events

    def state_changed(self) -> None:
        """Wake whoever waits in ``changed`` (settings arrived, the connection ended)."""
        self._state_evt.set()
        self._state_evt = trio.Event()

    async def changed(self) -> None:
        await self._state_evt.wait()

    def window_opened(self) -> None:
        self._window_evt.set()
        self._window_evt = trio.Event()

    def end(self, why: str) -> None:
        """The connection is over: every stream's waiter learns why."""
        if self.error is None:
            self.error = why
        self.closed = True
        self._written_evt.set()
        self._window_evt.set()
        for box in self.inboxes.values():
            if box.gone is None and not (box.ended and box.head is not None):
                box.gone = StreamGone(why)
            box.kick()

    # -- streams -------------------------------------------------------------------

    async def take(self, sid: int, box: Inbox) -> bytes:
        """The stream's next DATA payload (b"" at its end), credited back as taken."""
        while True:
            if box.chunks:
                data, n = box.chunks.popleft()
                if n:
                    self.session.consumed(sid, n)
                    self.kick()
                if data or not (box.ended and not box.chunks):
                    if data:
                        return data
                    continue
                return b""
            if box.ended:
                return b""
            if box.gone is not None:
                raise box.gone
            await box.changed()

    async def send_data(self, sid: int, box: Inbox, data: bytes, end_stream: bool) -> None:
        """Send ``data`` as the peer's windows allow; a window shut for
        ``send_timeout`` resets the stream (StreamGone)."""
        view = memoryview(data)
        conn = self.session.conn
        while True:
            if box.gone is not None:
                raise box.gone
            if self.closed:
                raise StreamGone(self.error or "the connection closed")
            if not view:
                if end_stream:
                    self._do(lambda: conn.end_stream(sid))
                    self.kick()
                return
            n = self.session.window(sid)
            if n < 0:
                raise StreamGone("the stream is closed")
            if n == 0:
                evt = self._window_evt
                with trio.move_on_after(self.limits.send_timeout) as scope:
                    await evt.wait()
                if scope.cancelled_caught:
                    self.reset(sid, box, int(ErrorCodes.CANCEL),
                               f"the peer kept its window shut for "
                               f"{self.limits.send_timeout:g} s")
                    raise box.gone  # type: ignore[misc]
                continue
            room = self.limits.max_unsent - self.unsent
            if room <= 0:  # the writer is behind (a peer that reads slowly): wait
                await self._written_evt.wait()
                continue
            # Frames up to SEND_BATCH bytes, then one write for them all.
            queued = 0
            last = False
            budget = min(SEND_BATCH, room)
            while n > 0 and view and queued < budget:
                n = min(n, budget - queued)
                chunk, view = bytes(view[:n]), view[n:]
                last = end_stream and not view
                self._do(functools.partial(conn.send_data, sid, chunk, end_stream=last))
                queued += len(chunk)
                self.unsent += len(chunk)
                n = self.session.window(sid)
            # The writer takes it at the next checkpoint, with whatever else was queued
            # by then; max_unsent (above) holds a sender back while it is behind.
            self.kick()
            if last:
                return
            await trio.lowlevel.checkpoint()

    def _do(self, op: Callable[[], object]) -> None:
        try:
            op()
        except h2.exceptions.StreamClosedError:
            raise StreamGone("the stream is closed") from None
        except h2.exceptions.H2Error as e:
            raise StreamGone(f"HTTP/2: {e}") from None

    def reset(self, sid: int, box: Inbox | None, code: int, why: str = "reset") -> None:
        """RST_STREAM ``sid`` (no wait) and forget what it held."""
        if box is not None and box.gone is None:
            box.gone = StreamGone(why, code)
            box.kick()
        with contextlib.suppress(h2.exceptions.H2Error):  # already closed
            self.session.conn.reset_stream(sid, code)
        self.session.forget(sid)
        self.kick()

    def done(self, sid: int) -> None:
        """The stream's consumer is finished with it."""
        self.inboxes.pop(sid, None)
        self.session.forget(sid)
        self.kick()
        if not self.inboxes and not self.closed:
            if self.goaway_last is not None:
                self.drained.cancel()  # the peer's GOAWAY: done once its streams are
            else:
                self.idle_deadline()


# -- the server side -----------------------------------------------------------------


class H2Request:
    """One request stream, as the handler sees it."""

    __slots__ = ("_box", "_conn", "_ended_by_us", "_scope", "authority", "client",
                 "end_stream", "headers", "headers_sent", "method", "path", "peer",
                 "scheme", "stream_id", "trailers")

    def __init__(self, conn: H2Conn, sid: int, pseudo: dict[bytes, bytes],
                 headers: list[tuple[bytes, bytes]], end_stream: bool, client: str,
                 peer: Identity | None, box: Inbox) -> None:
        self._conn = conn
        self._box = box
        self._scope = trio.CancelScope()
        self._ended_by_us = False
        self.stream_id = sid
        self.method = pseudo.get(b":method", b"")
        self.scheme = pseudo.get(b":scheme", b"")
        self.authority = pseudo.get(b":authority", b"")
        self.path = pseudo.get(b":path", b"")
        self.headers = headers
        self.end_stream = end_stream
        self.client = client
        self.peer = peer
        self.headers_sent = False
        self.trailers: list[tuple[bytes, bytes]] | None = None

    async def receive(self) -> bytes:
        data = await self._conn.take(self.stream_id, self._box)
        if not data:
            self.trailers = self._box.trailers
        return data

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], *,
                      end_stream: bool = False) -> None:
        fields = [(b":status", str(status).encode()), *headers]
        conn = self._conn.session.conn
        self._conn._do(lambda: conn.send_headers(self.stream_id, fields,
                                                 end_stream=end_stream))
        if status >= 200:
            self.headers_sent = True
        if end_stream:
            self._ended_by_us = True
        self._conn.kick()  # written with what follows it (one write, not one per frame)

    async def send(self, data: bytes, *, end_stream: bool = False) -> None:
        if end_stream:
            self._ended_by_us = True
        await self._conn.send_data(self.stream_id, self._box, data, end_stream)

    async def send_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        conn = self._conn.session.conn
        self._ended_by_us = True
        self._conn._do(lambda: conn.send_headers(self.stream_id, trailers, end_stream=True))
        self._conn.kick()

    def reset(self, code: int = 0x8) -> None:
        self._ended_by_us = True
        self._conn.reset(self.stream_id, self._box, code)


H2Handler = Callable[[H2Request], Awaitable[None]]
_DEFAULT_LIMITS = H2Limits()


async def serve_h2(io: SocketIO, handler: H2Handler, *, first: bytes, peer: Identity | None,
                   client: str, limits: H2Limits = _DEFAULT_LIMITS,
                   on_error: ErrorHook | None = None,
                   observe: Callable[[H2Session], None] | None = None) -> None:
    """Serve HTTP/2 on ``io`` (the server side) until the client leaves, a limit ends
    the connection, or this is cancelled. ``first``: bytes already read from it.
    ``observe`` is shown the connection's core (tests read its buffered bytes)."""
    session = H2Session(limits, client_side=False)
    if observe is not None:
        observe(session)
    session.start()
    conn = H2Conn(io, session)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.writer)
            conn.kick()
            try:
                with conn.drained:  # a graceful GOAWAY from the client: its streams finish
                    await _serve(conn, handler, first, peer, client, nursery, on_error)
            finally:
                with trio.CancelScope(shield=True) as shield:
                    shield.deadline = trio.current_time() + 1.0
                    await _goodbye(conn)
                nursery.cancel_scope.cancel()
    except* (ConnectionBroken, TimedOut, StreamGone):
        pass  # the connection is over; nothing of it may reach the listener
    except* Exception:
        log.exception("HTTP/2 connection from %s failed", client,
                      extra={"event": "h2_connection_error"})
    finally:
        conn.end(conn.error or "the connection closed")


async def _goodbye(conn: H2Conn) -> None:
    """GOAWAY (NO_ERROR unless the core queued one) and a last write, quietly."""
    s = conn.session
    if s.error is None:
        with contextlib.suppress(h2.exceptions.H2Error):
            s.conn.close_connection(int(ErrorCodes.NO_ERROR))
    data = s.data_to_send()
    # An expired socket (idle or preface timeout) can still take a small write: the
    # syscall comes first (sockio), only a wait would raise.
    if data and not conn.io.closed:
        with contextlib.suppress(ConnectionBroken, TimedOut):
            await conn.io.send(data)


async def _serve(conn: H2Conn, handler: H2Handler, first: bytes, peer: Identity | None,
                 client: str, nursery: trio.Nursery, on_error: ErrorHook | None) -> None:
    lim = conn.limits
    conn.on_request = functools.partial(_start, conn, handler=handler, client=client,
                                        peer=peer, nursery=nursery)
    preface_by = trio.current_time() + lim.preface_timeout
    settled = False  # the client's preface and SETTINGS arrived
    data = first
    while True:
        if data:
            try:
                events = conn.feed(data)
            except SessionError as e:
                conn.end(e.reason)
                log.info("HTTP/2 connection from %s ended: %s", client, e.reason,
                         extra={"event": "h2_goaway"})
                if on_error is not None:
                    on_error(client, 0, e.reason)
                return
            for ev in events:
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    settled = True
            if conn.session.error is not None:  # the client's GOAWAY with an error
                conn.end(conn.session.error.reason)
                return
            conn.kick()
        if not settled:
            conn.set_read_deadline(preface_by)
        else:
            conn.idle_deadline()
        try:
            data = await conn.io.recv()
        except TimedOut:
            conn.end("preface timeout" if not settled else "idle timeout")
            return
        except ConnectionBroken as e:
            conn.end(f"the client's connection broke: {e}")
            return
        if not data:
            conn.end("the client closed the connection")
            return


def _start(conn: H2Conn, ev: h2.events.RequestReceived, *, handler: H2Handler, client: str,
           peer: Identity | None, nursery: trio.Nursery) -> None:
    sid = int(ev.stream_id or 0)
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    for name, value in ev.headers or []:
        n, v = bytes(name), bytes(value)
        if n.startswith(b":"):
            pseudo[n] = v
        else:
            regular.append((n, v))
    box = Inbox()
    ended = ev.stream_ended is not None
    box.ended = ended
    conn.inboxes[sid] = box
    conn.set_read_deadline(math.inf)
    req = H2Request(conn, sid, pseudo, regular, ended, client, peer, box)
    box.scope = req._scope
    nursery.start_soon(_run_stream, conn, req, handler)


async def _run_stream(conn: H2Conn, req: H2Request, handler: H2Handler) -> None:
    box = req._box
    sid = req.stream_id
    try:
        with req._scope:
            if box.gone is not None:
                return
            try:
                await handler(req)
            except* StreamGone:
                pass  # also from inside the handler's own nursery (its upload task)
            except* Exception:
                log.exception("HTTP/2 handler failed on stream %d", sid,
                              extra={"event": "h2_handler_error"})
                if not req.headers_sent and box.gone is None and not conn.closed:
                    with contextlib.suppress(StreamGone):
                        await req.respond(500, [], end_stream=True)
                elif not req._ended_by_us:
                    req.reset(int(ErrorCodes.INTERNAL_ERROR))
    finally:
        if box.gone is None and not conn.closed:
            if not req._ended_by_us:
                conn.reset(sid, box, int(ErrorCodes.INTERNAL_ERROR))
            elif not box.ended:  # answered before the request ended: stop its upload
                conn.reset(sid, box, int(ErrorCodes.NO_ERROR))
        conn.done(sid)

