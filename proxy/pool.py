# layer: shell — upstream connections (trio)
"""The client side of a proxy hop: pooled upstream connections, one exchange per try.

One ``UpstreamPool`` per listener keeps keep-alive connections to every origin it
talks to (callee sidecars for the outbound listener, local services for the inbound
one) in a LIFO list per origin: the most recently used connection is the warmest and
the least likely to have been closed by its server. ``exchange`` sends one request
head (and a buffered body in the same write, or starts the caller's upload) and
returns at the final response head; the relay streams the rest.

The attempt core needs to know *how* a try failed, so every failure becomes one
``TryFailed`` with a retry condition:

- ``connect-failure``: no connection (refused, unreachable, connect timeout, a TLS
  peer whose certificate does not name the service): the upstream never saw the
  request, so it is safe to retry;
- ``timeout``: no response head within the per-try deadline (504);
- ``reset``: the connection broke, or the upstream answered nonsense (502; the
  upstream may have acted on the request).

An upstream may send a few informational (1xx) responses before its final one; more
than ``MAX_INFORMATIONAL`` fail the try (502, ``reset``): relaying them without end
would keep the client and a connection busy for as long as the upstream likes.

A pooled connection the upstream closed just as it was taken (EOF or reset before any
response byte) is not a failure of the try: the request goes again on a new
connection, when its body can be sent again.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..policy.documents import BAD_GATEWAY, CONNECT_FAILURE, GATEWAY_TIMEOUT
from .attempts import STALE_CONNECTION, failure_status
from .codec import ProtocolError, ResponseEvent, ResponseHead, ResponseReader
from .identity import Identity
from .sockio import (
    ConnectionBroken,
    SocketIO,
    TimedOut,
    TlsFailed,
    Watchdog,
    open_connection,
)
from .tls import HandshakeFailed, MeshTls

#: Informational (1xx) responses relayed per request; one more fails the try.
MAX_INFORMATIONAL = 8

#: How a failed try reads in the error the caller sees, by retry condition.
_WORDS = {CONNECT_FAILURE: "connect-failure", BAD_GATEWAY: "reset", GATEWAY_TIMEOUT: "timeout",
          STALE_CONNECTION: "stale connection"}


class TryFailed(Exception):
    """A try that got no response; ``condition`` is a retry condition (documents.py)."""

    def __init__(self, condition: str, detail: str, *, bad_response: bool = False) -> None:
        super().__init__(f"{_WORDS.get(condition, condition)}: {detail}")
        self.condition = condition
        self.detail = detail
        #: A 502 for a response that broke HTTP/1.1, not for a broken connection.
        self.bad_response = bad_response

    @property
    def status(self) -> int:
        """The status the caller sees if this was the last try."""
        return failure_status(self.condition)


class UpstreamConn:
    """A connection to one origin, with the parser of its responses."""

    __slots__ = ("idle_since", "io", "origin", "peer", "reader")

    def __init__(self, io: SocketIO, origin: tuple[str, int], peer: Identity | None) -> None:
        self.io = io
        self.origin = origin
        #: The verified identity at the other end, on a mutual-TLS connection.
        self.peer = peer
        self.reader = ResponseReader()
        self.idle_since = 0.0

    def close(self) -> None:
        self.io.close()


@dataclass(slots=True)
class UpstreamResponse:
    conn: UpstreamConn
    head: ResponseHead
    #: What the read that completed the head also held (body data, the end).
    events: list[ResponseEvent]
    #: Time this try spent opening a connection (TCP, and TLS on the sidecar hop); 0
    #: on a pooled one. A balancer measures the instance, not the handshake.
    connect_seconds: float


#: Starts streaming the request body to a connection (the relay's upload task).
Upload = Callable[[SocketIO], None]
#: Relays an informational (1xx) response head to the client.
Informational = Callable[[ResponseHead], Awaitable[None]]


class UpstreamPool:
    def __init__(self, watchdog: Watchdog, *, tls: MeshTls | None = None,
                 keepalive: int = 256, keepalive_expiry: float = 30.0) -> None:
        self.watchdog = watchdog
        self.tls = tls
        self.keepalive = keepalive
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[tuple[str, int], list[UpstreamConn]] = {}
        self.stats = {"connections_opened": 0, "stale_retries": 0, "wrong_identity": 0}

    def has_idle(self, host: str, port: int) -> bool:
        """Whether a pooled connection may carry the next request to host:port without
        opening one (it may still turn out closed when taken)."""
        return bool(self._idle.get((host, port)))

    async def exchange(self, method: bytes, origin: tuple[str, int], head: bytes,
                       body: bytes | Upload | None, *, connect_deadline: float,
                       deadline: float, service: str | None = None,
                       informational: Informational | None = None,
                       fresh: bool = False, resend_stale: bool = True) -> UpstreamResponse:
        """Send one try and return at its final response head. ``head`` is the whole
        serialized request head; ``body`` is sent with it (bytes) or streamed by the
        upload started once the head is out. Over mutual TLS ``service`` must be
        named by the upstream's certificate. ``fresh``: open a new connection even if
        one is pooled. Raises ``TryFailed``; a pooled connection found closed before
        any response byte raises it with ``stale-connection`` when the body can be
        sent again (the caller decides), or resends on a new connection at once when
        ``resend_stale`` (a caller with no budget to keep: the inbound hop)."""
        while True:
            conn = None if fresh else self._take(origin)
            reused = conn is not None
            connect_seconds = 0.0
            if conn is None:
                opened = trio.current_time()
                conn = await self._connect(origin, min(connect_deadline, deadline))
                connect_seconds = trio.current_time() - opened
            if service is not None and self.tls is not None:
                wrong = self._wrong_identity(conn, service)
                if wrong:
                    conn.close()  # not pooled: a renewed certificate may name it
                    raise TryFailed(CONNECT_FAILURE, wrong)
            io = conn.io
            io.set_deadline(deadline)
            replayable = body is None or isinstance(body, bytes)
            try:
                if isinstance(body, bytes):
                    await io.send(head + body if body else head)
                else:
                    await io.send(head)
                    if body is not None:
                        body(io)
                return await self._response(conn, method, informational, connect_seconds)
            except (_Stale, ConnectionBroken) as e:
                conn.close()
                if not (reused and replayable):
                    detail = str(e) if isinstance(e, ConnectionBroken) else (
                        "the upstream closed the connection before responding")
                    raise TryFailed(BAD_GATEWAY, detail) from None
                self.stats["stale_retries"] += 1
                if not resend_stale:
                    raise TryFailed(STALE_CONNECTION, "the upstream closed the pooled "
                                    "connection before responding") from None
                fresh = True
            except TimedOut:
                conn.close()
                raise TryFailed(GATEWAY_TIMEOUT, "no response before the per-try "
                                "deadline") from None
            except ProtocolError as e:
                conn.close()
                raise TryFailed(BAD_GATEWAY, e.reason, bad_response=True) from None
            except BaseException:
                conn.close()
                raise

    async def _response(self, conn: UpstreamConn, method: bytes,
                        informational: Informational | None,
                        connect_seconds: float) -> UpstreamResponse:
        reader = conn.reader
        reader.expect(method)
        got_any = False
        skip_end = False
        interim = 0
        while True:
            if reader.failed is not None:
                raise reader.failed  # in bytes already read: more would never come
            data = await conn.io.recv()
            if not data:
                if not got_any:
                    raise _Stale
                events = reader.eof()  # raises: a head cannot end at EOF
            else:
                got_any = True
                events = reader.feed(data)
            for i, ev in enumerate(events):
                if skip_end:
                    skip_end = False
                    continue  # the End of a 1xx
                if not isinstance(ev, ResponseHead):
                    raise ProtocolError(502, "response data before its head")
                if ev.informational:
                    if ev.status == 101:
                        raise ProtocolError(502, "the upstream switched protocols "
                                            "(upgrades are not relayed)")
                    interim += 1
                    if interim > MAX_INFORMATIONAL:
                        raise ProtocolError(502, f"the upstream sent more than "
                                            f"{MAX_INFORMATIONAL} informational (1xx) "
                                            "responses")
                    if informational is not None:
                        await informational(ev)
                    reader.expect(method)
                    skip_end = True
                    continue
                conn.io.deadline = float("inf")
                return UpstreamResponse(conn, ev, events[i + 1:], connect_seconds)

    def _take(self, origin: tuple[str, int]) -> UpstreamConn | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        expired_before = trio.current_time() - self.keepalive_expiry
        while idle:
            conn = idle.pop()  # most recently used: warmest, least likely closed
            if conn.idle_since > expired_before and conn.io.idle_and_open():
                return conn
            conn.close()
        return None

    async def _connect(self, origin: tuple[str, int], deadline: float) -> UpstreamConn:
        tls = self.tls
        io, peer = await connect_upstream(origin, self.watchdog, deadline, tls,
                                          tls.client if tls is not None else None)
        self.stats["connections_opened"] += 1
        return UpstreamConn(io, origin, peer)

    def _wrong_identity(self, conn: UpstreamConn, service: str) -> str:
        """Why ``conn`` must not carry a request for ``service`` ("" if it may)."""
        peer = conn.peer
        if peer is not None and peer.names(service):
            return ""
        self.stats["wrong_identity"] += 1
        who = f"node {peer.node}" if peer is not None and peer.node else "the upstream"
        return f"the certificate of {who} does not name service {service!r}"

    def give_back(self, conn: UpstreamConn) -> None:
        """Keep ``conn`` for the next request to its origin (or close it if full)."""
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.keepalive or conn.io.expired:
            conn.close()
            return
        conn.idle_since = trio.current_time()
        conn.io.deadline = float("inf")
        idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


async def connect_upstream(origin: tuple[str, int], watchdog: Watchdog, deadline: float,
                           tls: MeshTls | None, context: ssl.SSLContext | None,
                           ) -> tuple[SocketIO, Identity | None]:
    """Connect (and under mutual TLS shake hands with ``context`` and verify the peer)
    by ``deadline``; every failure is a ``connect-failure`` try. Shared by the
    HTTP/1.1 pool and the HTTP/2 upstreams (``h2_client.py``)."""
    host, port = origin
    try:
        io, der = await open_connection(host, port, watchdog, deadline, tls=context)
    except TimedOut:
        raise TryFailed(CONNECT_FAILURE, f"connect to {host}:{port} timed out") from None
    except (ConnectionBroken, OSError) as e:
        if isinstance(e, TlsFailed) and tls is not None:
            tls.stats["handshake_failures"] += 1
        raise TryFailed(CONNECT_FAILURE, str(e) or type(e).__name__) from None
    peer = None
    if tls is not None:
        try:
            peer = tls.verify_peer(der)
        except HandshakeFailed as e:
            io.close()
            raise TryFailed(CONNECT_FAILURE, f"{host}:{port}: {e}") from None
    return io, peer


class _Stale(Exception):
    """The connection closed before any response byte."""

