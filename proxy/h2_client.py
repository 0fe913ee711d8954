# layer: shell — HTTP/2 client connections (trio, sockets)
"""The client side of an HTTP/2 hop: multiplexed connections per origin.

Each origin gets as few connections as carry its calls: a call takes a live one
with a free stream slot (below the peer's MAX_CONCURRENT_STREAMS, no GOAWAY seen)
and a new connection is opened only when none has. Between sidecars over mutual
TLS the connection offers ALPN ``h2`` only (``MeshTls.client_h2``) and the callee's
certificate must name the service, as ``pool.py`` checks for HTTP/1.1; without TLS
it is h2c with prior knowledge.

A connection's reader runs as a trio system task (the pool has no nursery of its
own, and a connection outlives the call that opened it); ``close`` cancels them.

Failures become ``pool.TryFailed`` so the attempt core can decide on a retry:
``connect-failure`` before a connection exists (connect, TLS, ALPN, identity);
``stale-connection`` when the peer refused the stream unprocessed (REFUSED_STREAM,
or a GOAWAY whose last stream id is below ours): safe to send again at once; ``502``
when the stream or connection broke after the request may have been seen.
"""

from __future__ import annotations

import contextlib
import logging
import math

import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes

from ..policy.documents import BAD_GATEWAY, CONNECT_FAILURE
from .attempts import STALE_CONNECTION
from .h2_server import H2Conn, Inbox, StreamGone
from .h2_session import H2Limits, H2Session, SessionError
from .identity import Identity
from .pool import TryFailed, connect_upstream
from .sockio import (
    ConnectionBroken,
    TimedOut,
    TlsSocketIO,
    Watchdog,
)
from .tls import ALPN_H2, MeshTls

log = logging.getLogger("rumor.proxy.h2")

_DEFAULT_LIMITS = H2Limits()


class _Upstream:
    """One client connection: the driver, its reader task's scope, who is at the end."""

    __slots__ = ("conn", "origin", "peer", "scope", "settled")

    def __init__(self, conn: H2Conn, origin: tuple[str, int], peer: Identity | None) -> None:
        self.conn = conn
        self.origin = origin
        self.peer = peer
        self.scope = trio.CancelScope()
        #: Set once the peer's SETTINGS arrived (its stream limit is known).
        self.settled = trio.Event()

    def usable(self) -> bool:
        c = self.conn
        if c.closed or c.goaway_last is not None or c.session.error is not None:
            return False
        return c.session.open_outbound() < c.session.peer_max_streams()


class H2Upstreams:
    """Multiplexed HTTP/2 client connections per origin."""

    def __init__(self, watchdog: Watchdog, *, tls: MeshTls | None = None,
                 limits: H2Limits = _DEFAULT_LIMITS) -> None:
        self.watchdog = watchdog
        self.tls = tls
        self.limits = limits
        self._conns: dict[tuple[str, int], list[_Upstream]] = {}
        #: One connect at a time per origin: calls arriving meanwhile share its slots.
        self._connecting: dict[tuple[str, int], trio.Lock] = {}
        self.stats = {"connections_opened": 0, "wrong_identity": 0, "streams": 0}

    def has_idle(self, host: str, port: int) -> bool:
        return any(u.usable() for u in self._conns.get((host, port), ()))

    async def open(self, origin: tuple[str, int], *, method: bytes, scheme: bytes,
                   authority: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                   end_stream: bool, connect_deadline: float,
                   service: str | None = None) -> H2Call:
        """Open a stream carrying the request head (see the module docstring)."""
        up = self._take(origin)
        connect_seconds = 0.0
        if up is None:
            opened = trio.current_time()
            lock = self._connecting.setdefault(origin, trio.Lock())
            async with lock:
                up = self._take(origin)
                if up is None:
                    up = await self._connect(origin, connect_deadline)
            connect_seconds = trio.current_time() - opened
        if service is not None and self.tls is not None:
            peer = up.peer
            if peer is None or not peer.names(service):
                self.stats["wrong_identity"] += 1
                who = f"node {peer.node}" if peer is not None and peer.node else "the upstream"
                raise TryFailed(CONNECT_FAILURE, f"the certificate of {who} does not name "
                                f"service {service!r}")
        conn = up.conn
        h2c = conn.session.conn
        fields = [(b":method", method), (b":scheme", scheme), (b":authority", authority),
                  (b":path", path), *headers]
        try:
            sid = h2c.get_next_available_stream_id()
            h2c.send_headers(sid, fields, end_stream=end_stream)
        except h2.exceptions.H2Error as e:
            raise TryFailed(STALE_CONNECTION, f"HTTP/2 connection unusable: {e}") from None
        box = Inbox()
        conn.inboxes[sid] = box
        conn.set_read_deadline(math.inf)
        conn.session.track(sid)
        self.stats["streams"] += 1
        call = H2Call(conn, sid, box, connect_seconds, end_stream)
        conn.kick()  # written with the body that follows (one write per call, not frame)
        return call

    def _take(self, origin: tuple[str, int]) -> _Upstream | None:
        ups = self._conns.get(origin)
        if not ups:
            return None
        ups[:] = [u for u in ups if not u.conn.closed]
        for u in ups:
            if u.usable():
                return u
        return None

    async def _connect(self, origin: tuple[str, int], deadline: float) -> _Upstream:
        host, port = origin
        tls = self.tls
        io, peer = await connect_upstream(origin, self.watchdog, deadline, tls,
                                          tls.client_h2 if tls is not None else None)
        if tls is not None and (not isinstance(io, TlsSocketIO) or io.alpn != ALPN_H2):
            io.close()
            raise TryFailed(CONNECT_FAILURE, f"{host}:{port} did not choose HTTP/2 (ALPN h2)")
        self.stats["connections_opened"] += 1
        session = H2Session(self.limits, client_side=True)
        session.start()
        up = _Upstream(H2Conn(io, session), origin, peer)
        self._conns.setdefault(origin, []).append(up)
        trio.lowlevel.spawn_system_task(self._run, up, name=f"h2 upstream {host}:{port}")
        up.conn.kick()
        # Its SETTINGS first: streams past a limit we do not know yet would be refused.
        with trio.move_on_at(deadline):
            while not up.settled.is_set() and not up.conn.closed:
                await up.conn.changed()
        if not up.settled.is_set():
            up.scope.cancel()
            raise TryFailed(CONNECT_FAILURE, f"{host}:{port} sent no HTTP/2 SETTINGS"
                            + (f" ({up.conn.error})" if up.conn.error else ""))
        return up

    async def _run(self, up: _Upstream) -> None:
        conn = up.conn
        why = "the connection closed"
        try:
            with up.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.writer)
                    why = "drained after the upstream's GOAWAY"
                    with conn.drained:
                        why = await _read(conn, up.settled)
                    nursery.cancel_scope.cancel()
        except* (ConnectionBroken, TimedOut, StreamGone) as eg:
            why = str(eg.exceptions[0]) or type(eg.exceptions[0]).__name__
        except* Exception:
            log.exception("HTTP/2 upstream connection to %s:%d failed", *up.origin)
            why = "internal error"
        finally:
            conn.end(why)
            conn.state_changed()
            conn.io.close()
            ups = self._conns.get(up.origin)
            if ups is not None and up in ups:
                ups.remove(up)

    def close(self) -> None:
        for ups in self._conns.values():
            for u in ups:
                u.scope.cancel()
        self._conns.clear()


async def _read(conn: H2Conn, settled: trio.Event) -> str:
    """Read responses until the connection ends; why it ended."""
    while True:
        conn.idle_deadline()
        try:
            data = await conn.io.recv()
        except TimedOut:
            return conn.error or "idle timeout"
        except ConnectionBroken as e:
            return f"the upstream's connection broke: {e}"
        if not data:
            return "the upstream closed the connection"
        try:
            events = conn.feed(data)
        except SessionError as e:
            await _last_words(conn)
            return f"HTTP/2: {e.reason}"
        for ev in events:
            if isinstance(ev, h2.events.RemoteSettingsChanged) and not settled.is_set():
                settled.set()
                conn.state_changed()
            elif isinstance(ev, h2.events.ResponseReceived):
                box = conn.inboxes.get(int(ev.stream_id or 0))
                if box is not None:
                    status, fields = _split(ev.headers or [])
                    box.head = (status, fields)
                    box.head_ended = ev.stream_ended is not None
                    box.kick()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                last = int(ev.last_stream_id or 0)
                for sid, box in conn.inboxes.items():
                    if sid > last and box.gone is None:
                        box.gone = StreamGone("refused by GOAWAY",
                                              int(ErrorCodes.REFUSED_STREAM))
                        box.kick()
        if conn.session.error is not None:  # the upstream's GOAWAY with an error
            return f"HTTP/2: {conn.session.error.reason}"
        conn.kick()


async def _last_words(conn: H2Conn) -> None:
    data = conn.session.data_to_send()
    if data:
        with contextlib.suppress(ConnectionBroken, TimedOut):
            await conn.io.send(data)


def _split(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    status = 0
    regular: list[tuple[bytes, bytes]] = []
    for n, v in headers:
        n, v = bytes(n), bytes(v)
        if n == b":status":
            status = int(v)
        elif not n.startswith(b":"):
            regular.append((n, v))
    return status, regular


class H2Call:
    """One request stream on an upstream connection."""

    __slots__ = ("_box", "_conn", "_done", "_sent_end", "connect_seconds", "stream_id",
                 "trailers")

    def __init__(self, conn: H2Conn, sid: int, box: Inbox, connect_seconds: float,
                 sent_end: bool) -> None:
        self._conn = conn
        self._box = box
        self._done = False
        self._sent_end = sent_end
        self.stream_id = sid
        self.connect_seconds = connect_seconds
        self.trailers: list[tuple[bytes, bytes]] | None = None

    def _failed(self, e: StreamGone, before_head: bool) -> TryFailed:
        if e.code == int(ErrorCodes.REFUSED_STREAM) and before_head:
            return TryFailed(STALE_CONNECTION, f"the upstream refused the stream: {e.reason}")
        return TryFailed(BAD_GATEWAY, e.reason)

    def _answered(self) -> bool:
        """The whole response is in: what is left of the request is not wanted."""
        return self._done and self._box.ended and self._box.head is not None

    async def send(self, data: bytes, *, end_stream: bool = False) -> None:
        if self._answered():
            return
        try:
            await self._conn.send_data(self.stream_id, self._box, data, end_stream)
        except StreamGone as e:
            if self._answered() or (e.code == 0 and self._box.head is not None):
                return  # the upstream answered and stopped the upload (NO_ERROR)
            raise self._failed(e, self._box.head is None) from None
        except BaseException:
            self.reset()
            raise
        if end_stream:
            self._sent_end = True

    async def end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self._answered():
            return
        if trailers:
            h2c = self._conn.session.conn
            try:
                self._conn._do(lambda: h2c.send_headers(self.stream_id, trailers,
                                                        end_stream=True))
                self._sent_end = True
                self._conn.kick()
            except StreamGone as e:
                raise self._failed(e, self._box.head is None) from None
        else:
            await self.send(b"", end_stream=True)

    async def response(self) -> tuple[int, list[tuple[bytes, bytes]], bool]:
        box = self._box
        try:
            while box.head is None or box.head[0] < 200:
                if box.head is not None:
                    box.head = None  # an informational head: skipped
                if box.gone is not None:
                    raise self._failed(box.gone, True)
                await box.changed()
        except BaseException as e:
            if not isinstance(e, TryFailed):
                self.reset()
            else:
                self._finish()
            raise
        status, fields = box.head
        if box.head_ended:
            self._finish()
        return status, fields, box.head_ended

    async def receive(self) -> bytes:
        try:
            data = await self._conn.take(self.stream_id, self._box)
        except StreamGone as e:
            self._finish()
            raise TryFailed(BAD_GATEWAY, e.reason) from None
        except BaseException:
            self.reset()
            raise
        if not data:
            self.trailers = self._box.trailers
            self._finish()
        return data

    def reset(self, code: int = 0x8) -> None:
        if self._done:
            return
        self._done = True
        self._conn.reset(self.stream_id, self._box, code)
        self._conn.done(self.stream_id)

    def _finish(self) -> None:
        """The response is over (or failed): the stream's inbox goes."""
        if self._done:
            return
        self._done = True
        if not self._sent_end and self._box.gone is None and not self._conn.closed:
            self._conn.reset(self.stream_id, self._box, int(ErrorCodes.CANCEL))
        self._conn.done(self.stream_id)
