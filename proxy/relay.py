# layer: shell — client connections and streaming (trio, socket)
"""The server side of the sidecar's listeners: one task per client connection, relaying.

A connection's task reads requests with the strict codec (``codec.RequestReader``),
hands each head to the listener's handler (``outbound.py`` or ``inbound.py``), and
writes what the handler returns: a ``Reply`` the proxy makes itself, or a ``Forward``
whose upstream response it streams to the client, re-framed for the client:

- a Content-Length body is relayed as is; a chunked or close-delimited one is sent
  chunked to an HTTP/1.1 client (trailers kept) and close-delimited to HTTP/1.0;
- HEAD, 1xx, 204 and 304 responses have no body whatever their headers say;
- what one upstream read held (head, data, the end) goes out in one client write.

Request bodies stream too: the handler either reads a small one whole (so it can be
retried) or starts an upload, a task of the connection's nursery that pumps the body
to the upstream while this task relays the response, so a large upload answered early
cannot deadlock. ``Expect: 100-continue`` is forwarded and the upstream's 1xx relayed.
Pipelined requests are answered in order; the connection reads ahead at most one
receive buffer. Protocol upgrades and CONNECT are refused with 501 (codec.py says
why).

Hostile clients are bounded before any handler runs: a new connection must send the
first byte of a request within ``first_byte_timeout`` (or it is closed), the head must
arrive whole within ``head_timeout`` once its first byte has (slowloris: 408), it is
capped at
``max_header_bytes`` (431), every body read and write has an idle limit, and anything
the codec refuses is answered with its status and the connection closed. A handler
that raises is answered with 502 and logged; the listener keeps serving.

A client that leaves while its request is being handled (EOF or reset while the
upstream works on it, or mid-response) abandons it: a watcher task of the connection
notices (started for requests still in hand after ``WATCH_AFTER``, so a fast
request pays a dict insert, not a task), and the request's cancel scope is cancelled,
which closes its upstream connection (never pooled) and drops everything held for
it. The watcher runs only once the request body is read, so it never reads beside the
handler; it peeks,
consuming nothing, and falls back to polling the TCP state when pipelined bytes
wait. Trailers are filtered both ways (``headers.trailer_fields``).
"""

from __future__ import annotations

import logging
import math
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from ..gossip.accept import FdPool, ListenerLimits, serve_listeners
from .codec import Data, End, Event, Head, ProtocolError, RequestReader, ResponseHead
from .connection import SERVER_NAME, reason_phrase
from .errors import ERROR_CODE_HEADER, ERROR_CONTENT_TYPE, ErrorCode, error_body, listener_code
from .headers import end_to_end, trailer_fields
from .identity import Identity
from .pool import Upload, UpstreamPool, UpstreamResponse
from .protocols import Sniffed, sniff
from .sockio import ConnectionBroken, SocketIO, TimedOut, TlsSocketIO, Watchdog, adopt
from .tls import ALPN_H2, HandshakeFailed, MeshTls

log = logging.getLogger("rumor.proxy")

#: Unread request body we are willing to swallow to keep a connection alive.
DRAIN_LIMIT = 256 * 1024
#: After a final response we half-close and read for at most this long, so the client
#: sees it instead of a reset caused by its unread bytes.
CLOSE_DRAIN_SECONDS = 1.0

#: A request still handled after this long gets a watcher for its client leaving.
WATCH_AFTER = 0.05
#: How often the client's TCP state is read while pipelined bytes keep its socket
#: readable (so readiness cannot tell a close).
GONE_POLL_SECONDS = 0.5
#: TCP states (linux/tcp_states.h) that mean the client closed or reset.
_TCP_GONE = frozenset({7, 8, 9})  # CLOSE, CLOSE_WAIT, LAST_ACK

_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n"


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    max_header_bytes: int = 16 * 1024
    #: A new connection's first request byte must arrive within this.
    first_byte_timeout: float = 5.0
    #: The whole request head must arrive within this, once its first byte has.
    head_timeout: float = 10.0
    #: A keep-alive connection may idle this long between requests.
    idle_timeout: float = 60.0
    #: Longest silence inside a body, either direction.
    body_idle_timeout: float = 60.0


class ClientGone(Exception):
    """The client broke off (closed, reset, too slow) while we read its body."""


class ResetConnection(Exception):
    """Raised by a handler: end the client's connection with a TCP reset, no answer."""


class BadRequestBody(ClientGone):
    """The client's body broke the protocol (e.g. malformed chunking): answer 400."""


#: Called with the body bytes sent and whether the response completed.
Done = Callable[[int, bool], None]


@dataclass(slots=True)
class Reply:
    """An answer the proxy makes itself."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    on_done: Done | None = None


@dataclass(slots=True)
class Forward:
    """An upstream's response to relay: ``headers`` are the end-to-end ones the client
    gets (framing is added here); the connection goes back to ``pool`` if it can."""

    response: UpstreamResponse
    headers: list[tuple[bytes, bytes]]
    pool: UpstreamPool
    on_done: Done | None = None
    #: Runs once the response is over, however it ended (e.g. a breaker slot).
    release: Callable[[], None] | None = None


Handler = Callable[["Request"], Awaitable[Reply | Forward]]
#: Serves a connection of another protocol: (its socket, the verified peer under mutual
#: TLS, the bytes already read from it). It owns the socket until it returns.
AltHandler = Callable[[SocketIO, Identity | None, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class AltProtocols:
    """What a listener serves besides HTTP/1.1: HTTP/2 (the client preface, or ALPN
    ``h2`` under TLS) and mesh TCP (``protocols.TCP_MAGIC``). A connection's first
    bytes tell them apart exactly (``protocols.sniff``); a protocol without a handler
    here is served as HTTP/1.1, which refuses it as bad request bytes."""

    h2: AltHandler | None = None
    tcp: AltHandler | None = None
#: Called on answers the listener makes itself (400, 408, 431, 502 for a crash).
ErrorHook = Callable[[str, int, str], None]


def simple_reply(status: int, reason: str, *,
                 headers: list[tuple[bytes, bytes]] | None = None,
                 code: ErrorCode | None = None, agent: str = "", service: str = "",
                 tries: int = 0, instances: tuple[str, ...] = (),
                 last_failure: str | None = None, policy: str | None = None) -> Reply:
    """An answer the proxy made itself (so it is never mistaken for the upstream's):
    ``x-rumor-error`` says why in words, ``x-rumor-error-code`` with a stable code
    (``errors.py``), and a short JSON body names the agent, the service, what was
    tried and the policy that decided. Only these say ``server: rumor``: a proxied
    response keeps the upstream's own Server header."""
    code = code or listener_code(status)
    body = error_body(code, agent=agent or None, service=service or None, phrase=reason,
                      tries=tries or None, instances=instances or None,
                      last_failure=last_failure, policy=policy)
    hs = [(b"server", SERVER_NAME.encode()), (b"content-type", ERROR_CONTENT_TYPE),
          (b"content-length", b"%d" % len(body)),
          (b"x-rumor-error", reason.encode("ascii", "replace")[:512]),
          (ERROR_CODE_HEADER, code.encode()), *(headers or [])]
    return Reply(status, hs, body)


# The states of a request body, as the connection sees it.
_UNREAD = 0
_STREAMING = 1
_DONE = 2
_BROKEN = 3


class Request:
    """One request as a handler sees it; its body stays on the client's connection
    until the handler reads it (``read_body``) or streams it (``upload``)."""

    __slots__ = (
        "_conn",
        "_upload_scope",
        "_watch_scope",
        "body_state",
        "client",
        "continued",
        "failure",
        "gone_scope",
        "head",
        "headers",
        "method",
        "peer",
        "target",
    )

    def __init__(self, conn: _ClientConn, head: Head) -> None:
        self._conn = conn
        self.head = head
        self.method = head.method
        self.target = head.target
        #: Names lower-cased, in arrival order, repeats kept (framing ones included).
        self.headers = head.headers
        self.client = conn.client
        #: The caller's verified identity (its certificate) on a mutual-TLS listener.
        self.peer = conn.peer
        self.body_state = _UNREAD if head.chunked or head.length else _DONE
        #: Whether a 100 Continue reached the client.
        self.continued = False
        #: Why the client's side of an upload failed (the handler re-raises it).
        self.failure: ClientGone | None = None
        self._upload_scope: trio.CancelScope | None = None
        #: Cancelled when the client leaves while the request is handled.
        self.gone_scope: trio.CancelScope | None = None
        self._watch_scope: trio.CancelScope | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def take_body(self, keep: int) -> bytes | Upload | None:
        """The body as the upstream pool sends it: None when there is none; bytes when
        its length is known and at most ``keep`` (read now, so that a retry can send it
        again); else an upload that streams it once, started with the request head."""
        head = self.head
        if self.body_state == _DONE:
            return None
        if not head.chunked and not head.expect_continue and head.length is not None \
                and head.length <= keep:
            return await self.read_body()
        return partial(self.upload, chunked=head.chunked)

    def framing(self, body: bytes | Upload | None) -> tuple[bytes, bytes] | None:
        """The framing header for ``body`` on the next hop."""
        if isinstance(body, bytes):
            return (b"content-length", b"%d" % len(body))
        if body is not None:
            return ((b"transfer-encoding", b"chunked") if self.head.chunked
                    else (b"content-length", b"%d" % (self.head.length or 0)))
        # No body: keep an explicit zero length (a POST without one may be refused).
        return (b"content-length", b"0") if self.header(b"content-length") else None

    async def informational(self, head: ResponseHead) -> None:
        """Relay an upstream's 1xx to the client (for ``UpstreamPool.exchange``)."""
        await self._conn.informational(self, head)

    async def _begin_body(self) -> None:
        if self.body_state != _UNREAD:
            raise RuntimeError("the request body can be read once")
        self.body_state = _STREAMING
        if self.head.expect_continue and not self.continued:
            self.continued = True
            await self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def read_body(self) -> bytes:
        """The whole body (call only for a Content-Length body small enough to keep)."""
        await self._begin_body()
        parts: list[bytes] = []
        while True:
            ev = await self._conn.body_event()
            if isinstance(ev, Data):
                parts.append(ev.data)
            else:
                self.body_state = _DONE
                self._conn.watch(self)
                return b"".join(parts)

    def upload(self, io: SocketIO, chunked: bool) -> None:
        """Start streaming the body to ``io`` (chunked: re-framed as chunks), beside
        the response. A client that fails mid-body leaves ``failure`` set and the
        upstream connection expired, so the exchange waiting on it ends at once."""
        if self.body_state != _UNREAD:
            raise RuntimeError("the request body can be read once")
        self.body_state = _STREAMING
        self._conn.nursery.start_soon(self._pump, io, chunked)

    async def _pump(self, io: SocketIO, chunked: bool) -> None:
        with trio.CancelScope() as scope:
            self._upload_scope = scope
            conn = self._conn
            try:
                while True:
                    ev = await conn.body_event()
                    if isinstance(ev, Data):
                        d = ev.data
                        await io.send(b"%x\r\n%b\r\n" % (len(d), d) if chunked else d)
                    else:
                        if chunked:
                            await io.send(_LAST_CHUNK + _fields(trailer_fields(ev.trailers))
                                          + _CRLF)
                        self.body_state = _DONE
                        conn.watch(self)
                        return
            except ClientGone as e:
                self.failure = e
                self.body_state = _BROKEN
                if not io.closed:
                    io.expire()
            except (ConnectionBroken, TimedOut):
                # The upstream stopped reading: its response (or its close) says the rest.
                self.body_state = _BROKEN

    def stop_upload(self) -> None:
        if self._upload_scope is not None:
            self._upload_scope.cancel()


def _fields(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([k + b": " + v + _CRLF for k, v in headers])


def request_head_start(method: bytes, target: bytes,
                       headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and header lines, without the blank line that ends a head (a
    try adds its own last headers). Every part was checked by the codec or made by
    the proxy, so nothing is forwarded that was not parsed."""
    return b"%b %b HTTP/1.1\r\n%b" % (method, target, _fields(headers))


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 status line and header block (parts already checked by the codec
    or made by the proxy)."""
    return b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason or reason_phrase(status),
                                          _fields(headers))


class _SlowRequests:
    """A listener's requests whose client may leave them, since when; one task hands
    those held past ``WATCH_AFTER`` to their connection's watcher (a task per request
    would cost every fast one a spawn and two scheduler rounds)."""

    def __init__(self) -> None:
        self.since: dict[Request, float] = {}
        self._added = trio.Event()

    def add(self, req: Request) -> None:
        self.since[req] = trio.current_time()
        self._added.set()

    async def run(self) -> None:
        while True:
            if not self.since:  # idle: no wake-ups until a request is in hand
                self._added = trio.Event()
                await self._added.wait()
            await trio.sleep(WATCH_AFTER)
            due = trio.current_time() - WATCH_AFTER
            for req, t in list(self.since.items()):
                if t <= due:
                    del self.since[req]
                    req._conn.start_watcher(req)


class _ClientConn:
    """One client connection: its reader, what it read ahead, its limits."""

    __slots__ = ("client", "early", "eof", "events", "io", "limits", "nursery", "on_error",
                 "peer", "reader", "requests", "slow", "watching")

    def __init__(self, io: SocketIO, limits: ProxyLimits, client: str, peer: Identity | None,
                 nursery: trio.Nursery, on_error: ErrorHook | None,
                 slow: _SlowRequests | None = None) -> None:
        self.io = io
        self.slow = slow
        self.limits = limits
        self.client = client
        self.peer = peer
        self.nursery = nursery
        self.on_error = on_error
        self.reader = RequestReader(limits.max_header_bytes)
        self.events: deque[Event] = deque()
        self.early = b""
        self.eof = False
        #: Request heads read so far on this connection.
        self.requests = 0
        #: The request being handled, while the client may still leave it.
        self.watching: Request | None = None

    def feed(self, data: bytes) -> None:
        """Bytes read before this connection's reader existed: parsed first."""
        self.early = data

    async def _read(self, deadline: float) -> bool:
        """Read once and parse; False at the client's EOF. Raises ``ProtocolError`` for
        bad bytes already read before waiting for more."""
        if self.reader.failed is not None:
            raise self.reader.failed
        if self.early:
            data, self.early = self.early, b""
        else:
            self.io.set_deadline(deadline)
            data = await self.io.recv()
        if not data:
            self.eof = True
            return False
        self.events.extend(self.reader.feed(data))
        return True

    async def next_head(self) -> Head | None:
        """The next request's head; None when the client is done (closed, or idle past
        the keep-alive limit). Raises ``ProtocolError`` for one not to serve."""
        if not self.events:
            lim = self.limits
            # A new connection must start talking soon; a kept-alive one may idle.
            wait = lim.first_byte_timeout if not self.requests else lim.idle_timeout
            deadline = trio.current_time() + wait
            started = False
            while not self.events:
                try:
                    if not await self._read(deadline):
                        return None
                except TimedOut:
                    if started:
                        raise ProtocolError(408, "request head not received in time") \
                            from None
                    return None  # silent or idle past its limit: close quietly
                except ConnectionBroken:
                    return None
                if not started and not self.events:
                    # From the first byte on, the whole head has its own limit.
                    started = True
                    deadline = trio.current_time() + lim.head_timeout
        self.io.deadline = math.inf  # the head is in: no limit while the upstream works
        self.requests += 1
        head = self.events.popleft()
        assert isinstance(head, Head)
        if not head.chunked and not head.length:
            end = self.events.popleft()  # parsed with the head: nothing can come between
            assert isinstance(end, End)
        return head

    # ---- a client that leaves mid-request ----------------------------------------------

    def begin(self, req: Request, scope: trio.CancelScope) -> None:
        """``req`` is handled in ``scope`` from now on: watch the client once its body
        is read (at once when it has none)."""
        req.gone_scope = scope
        self.watching = req
        if req.body_state == _DONE:
            self.watch(req)

    def watch(self, req: Request) -> None:
        """Watch for the client leaving ``req`` (its body is all read): soon, if the
        request is still in hand by then."""
        if self.watching is req and req._watch_scope is None:
            if self.slow is None:
                self.start_watcher(req)
            else:
                self.slow.add(req)

    def start_watcher(self, req: Request) -> None:
        if self.watching is req and req._watch_scope is None:
            req._watch_scope = trio.CancelScope()
            self.nursery.start_soon(self._watch, req, req._watch_scope)

    def unwatch(self, req: Request) -> None:
        """The request is over: stop watching before anyone reads the client again.
        (Cancelling a task parked on the socket unregisters it at once; one already
        woken sees ``watching`` changed and touches nothing.)"""
        if self.watching is req:
            self.watching = None
        if self.slow is not None:
            self.slow.since.pop(req, None)
        if req._watch_scope is not None:
            req._watch_scope.cancel()

    async def _watch(self, req: Request, scope: trio.CancelScope) -> None:
        with scope:
            sock = self.io.sock
            while self.watching is req:
                if not self.eof:
                    try:
                        await trio.lowlevel.wait_readable(sock)
                    except (trio.ClosedResourceError, OSError):
                        return  # closed or expired under us: its owner sees to it
                    if self.watching is not req:
                        return
                    try:
                        peeked = sock.recv(1, socket.MSG_PEEK)
                    except BlockingIOError:
                        continue
                    except OSError:
                        peeked = b""  # reset
                    if peeked:
                        # Pipelined bytes (or a TLS record) keep it readable: readiness
                        # can no longer tell a close, the TCP state can.
                        await self._poll_state(req, sock)
                        return
                self._gone(req, "the client closed the connection before the response")
                return

    async def _poll_state(self, req: Request, sock: socket.socket) -> None:
        opt = getattr(socket, "TCP_INFO", None)
        if opt is None:
            return  # not Linux: the request runs its course
        while self.watching is req:
            await trio.sleep(GONE_POLL_SECONDS)
            try:
                state = sock.getsockopt(socket.IPPROTO_TCP, opt, 8)[0]
            except OSError:
                return
            if state in _TCP_GONE and self.watching is req:
                self._gone(req, "the client closed the connection before the response")
                return

    def _gone(self, req: Request, why: str) -> None:
        req.failure = ClientGone(why)
        if req.gone_scope is not None:
            req.gone_scope.cancel()

    async def body_event(self) -> Data | End:
        while not self.events:
            if self.eof:
                raise ClientGone("the client closed the connection mid-body")
            idle = self.limits.body_idle_timeout
            try:
                await self._read(trio.current_time() + idle)
            except TimedOut:
                raise ClientGone(f"no data from the client for {idle:g} s") from None
            except ConnectionBroken as e:
                raise ClientGone(str(e)) from None
            except ProtocolError as e:
                raise BadRequestBody(f"malformed request body: {e.reason}") from None
        ev = self.events.popleft()
        assert isinstance(ev, Data | End)
        return ev

    async def send(self, data: bytes | bytearray) -> None:
        self.io.set_deadline(trio.current_time() + self.limits.body_idle_timeout)
        await self.io.send(data)

    async def refuse(self, status: int, reason: str) -> None:
        log.debug("refusing %s: %d %s", self.client, status, reason)
        if self.on_error is not None:
            self.on_error(self.client, status, reason)
        r = simple_reply(status, reason, headers=[(b"connection", b"close")])
        try:
            self.io.set_deadline(trio.current_time() + 1.0)
            await self.io.send(response_head(status, b"", r.headers) + r.body)
        except (ConnectionBroken, TimedOut):
            pass
        await self.close_gracefully()

    async def close_gracefully(self) -> None:
        """Half-close and drain briefly so unread client bytes do not reset our last
        response. (TLS cannot half-close: closing sends nothing more.)"""
        io = self.io
        io.shutdown_write()
        io.set_deadline(trio.current_time() + CLOSE_DRAIN_SECONDS)
        drained = 0
        try:
            while drained < DRAIN_LIMIT:
                data = await io.recv()
                if not data:
                    break
                drained += len(data)
        except (ConnectionBroken, TimedOut):
            pass

    # ---- answers -------------------------------------------------------------------

    def _may_continue(self, req: Request) -> bool:
        """Whether the connection can carry another request after this one's answer:
        its body must be read or drainable (a client still waiting for 100 Continue
        may send its body or not, so that connection ends)."""
        if not req.head.keep_alive or req.body_state == _BROKEN:
            return False
        return not (req.body_state == _UNREAD and req.head.expect_continue)

    async def answer(self, req: Request, out: Reply | Forward) -> bool:
        """Write ``out``; True if the connection can carry the next request."""
        if isinstance(out, Reply):
            return await self._reply(req, out)
        return await self._forward(req, out)

    async def _reply(self, req: Request, out: Reply) -> bool:
        keep = self._may_continue(req)
        headers = out.headers if keep else [*out.headers, (b"connection", b"close")]
        body = out.body if req.method != b"HEAD" else b""
        complete = False
        try:
            await self.send(response_head(out.status, b"", headers) + body)
            complete = True
        except (ConnectionBroken, TimedOut) as e:
            log.debug("response to %s not delivered: %r", self.client, e)
            keep = False
        finally:
            if out.on_done is not None:
                out.on_done(len(body) if complete else 0, complete)
        return keep and await self._settle_body(req)

    async def _forward(self, req: Request, out: Forward) -> bool:
        resp = out.response
        up = resp.conn
        head = resp.head
        bodiless = req.method == b"HEAD" or head.status in (204, 304)
        chunked = False
        # An upload still running means an early answer: the rest of the body will be
        # cut off, so this connection ends with the response.
        keep = self._may_continue(req) and req.body_state != _STREAMING
        headers = out.headers
        if not bodiless and head.length is None:
            if req.head.version == b"1.1":
                chunked = True
                headers = [*headers, (b"transfer-encoding", b"chunked")]
            else:
                keep = False  # close-delimited to an HTTP/1.0 client
        if not keep:
            headers = [*headers, (b"connection", b"close")]
        pending = bytearray(response_head(head.status, head.reason, headers))
        events = resp.events
        sent = 0
        ended = False
        complete = False
        idle = self.limits.body_idle_timeout
        try:
            while True:
                for ev in events:
                    if isinstance(ev, Data):
                        d = ev.data
                        sent += len(d)
                        if chunked:
                            pending += b"%x\r\n" % len(d)
                            pending += d
                            pending += _CRLF
                        else:
                            pending += d
                    else:
                        assert isinstance(ev, End)  # one response per exchange
                        ended = True
                        if chunked:
                            pending += (_LAST_CHUNK + _fields(trailer_fields(ev.trailers))
                                        + _CRLF)
                if pending:
                    await self.send(pending)
                    pending = bytearray()
                if ended:
                    break
                try:
                    if up.reader.failed is not None:
                        # Bytes already read broke the protocol (e.g. a Content-Length
                        # trailer): waiting for more would only hang the client.
                        raise up.reader.failed
                    up.io.set_deadline(trio.current_time() + idle)
                    data = await up.io.recv()
                    events = up.reader.feed(data) if data else up.reader.eof()
                except (ConnectionBroken, TimedOut, ProtocolError) as e:
                    why = e.reason if isinstance(e, ProtocolError) else (
                        f"no data for {idle:g} s" if isinstance(e, TimedOut) else str(e))
                    log.info("upstream broke off mid-response to %s: %s", self.client, why)
                    keep = False
                    ended = False
                    break
            complete = ended
        except (ConnectionBroken, TimedOut) as e:
            log.debug("response to %s not delivered: %r", self.client, e)
            keep = False
        finally:
            if req.body_state == _STREAMING:
                req.stop_upload()  # answered before the upload ended: the body is moot
                req.body_state = _BROKEN
                keep = False
            if complete and head.keep_alive and req.body_state == _DONE:
                out.pool.give_back(up)
            else:
                up.close()
            if out.release is not None:
                out.release()
            if out.on_done is not None:
                out.on_done(sent, complete)
        return keep and await self._settle_body(req)

    async def informational(self, req: Request, head: ResponseHead) -> None:
        """Relay an upstream's 1xx (HTTP/1.1 clients only)."""
        if req.head.version != b"1.1":
            return
        if head.status == 100:
            req.continued = True
        await self.send(response_head(head.status, head.reason, end_to_end(head.headers)))

    async def _settle_body(self, req: Request) -> bool:
        """Swallow the rest of a body the handler did not need (e.g. answered 403 before
        reading it) so the connection can carry the next request; give up past a limit."""
        if req.body_state == _DONE:
            return True
        if req.body_state != _UNREAD:
            return False
        req.body_state = _STREAMING
        drained = 0
        give_up = trio.current_time() + min(5.0, self.limits.body_idle_timeout)
        try:
            while True:
                ev = await self.body_event()
                if isinstance(ev, End):
                    req.body_state = _DONE
                    return True
                drained += len(ev.data)
                if drained > DRAIN_LIMIT or trio.current_time() > give_up:
                    return False
        except ClientGone:
            return False


async def serve_proxy(handler: Handler, host: str, port: int, *, watchdog: Watchdog,
                      limits: ProxyLimits | None = None, on_error: ErrorHook | None = None,
                      tls: MeshTls | None = None, pool: FdPool | None = None,
                      max_per_client: int = 0, alt: AltProtocols | None = None,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handler`` on host:port until cancelled; reports the bound port. With
    ``tls`` every connection must first complete a mutual TLS handshake; the peer's
    verified identity then comes with each of its requests (``Request.peer``).
    Connections are accepted within ``pool`` (two descriptors each: the client's and
    an upstream's), at most ``max_per_client`` at once from one host (0: no cap).
    ``alt`` serves the other protocols a connection may open with (``AltProtocols``).
    ``watchdog`` keeps the deadlines of this listener's sockets (and of the handler's
    upstream pool); it runs here."""
    lim = limits or ProxyLimits()
    slow = _SlowRequests()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]

    async def on_connection(stream: trio.SocketStream) -> None:
        sock = adopt(stream)
        io: SocketIO
        peer = None
        if tls is None:
            io = SocketIO(sock, watchdog)
        else:
            try:
                io, peer = await tls.accept(sock, watchdog)
            except HandshakeFailed as e:
                # A port scanner, a plaintext client, a stranger's certificate: its own
                # connection ends here and the listener serves everyone else. Counted
                # (rumor_tls_handshake_failures_total); logged at debug, so a scan cannot
                # flood the log.
                log.debug("TLS handshake refused: %s", e, extra={"event": "tls_refused"})
                return
        try:
            first = b""
            if alt is not None:
                proto, first = await _opening(io, lim.first_byte_timeout)
                handle = alt.h2 if proto == "h2" else alt.tcp if proto == "tcp" else None
                if handle is not None:
                    await handle(io, peer, first)
                    return
                if proto is None:
                    return  # silent past the first-byte limit, or closed: as HTTP/1.1 does
            await _serve_connection(io, handler, lim, on_error, peer, slow, first)
        finally:
            io.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run)
        nursery.start_soon(slow.run)
        nursery.start_soon(partial(
            serve_listeners, on_connection, listeners, pool=pool, what="proxy",
            limits=ListenerLimits(fds_per_connection=2, max_per_client=max_per_client)))
        task_status.started(bound)


async def _opening(io: SocketIO, timeout: float) -> tuple[Sniffed | None, bytes]:
    """(the protocol a new connection speaks, the bytes read to tell): ALPN under TLS,
    else its first bytes, read until ``sniff`` decides; (None, ...) when the client
    closed or stayed silent past ``timeout``."""
    if isinstance(io, TlsSocketIO) and io.alpn == ALPN_H2:
        return "h2", b""
    io.set_deadline(trio.current_time() + timeout)
    first = b""
    try:
        while True:
            data = await io.recv()
            if not data:
                return None, first
            first += data
            proto = sniff(first)
            if proto is not None:
                return proto, first
    except (TimedOut, ConnectionBroken):
        return None, first
    finally:
        io.deadline = math.inf


async def _serve_connection(io: SocketIO, handler: Handler, limits: ProxyLimits,
                            on_error: ErrorHook | None, peer: Identity | None,
                            slow: _SlowRequests | None = None, first: bytes = b"") -> None:
    client = io.peer_name()
    try:
        async with trio.open_nursery() as nursery:
            conn = _ClientConn(io, limits, client, peer, nursery, on_error, slow)
            if first:  # read to tell the protocol (serve_proxy's alt)
                conn.feed(first)
            try:
                await _requests(conn, handler)
            finally:
                nursery.cancel_scope.cancel()  # an upload still running is moot
    except (ConnectionBroken, TimedOut, ClientGone) as exc:
        log.debug("proxy connection from %s dropped: %r", client, exc)
    except Exception:
        log.exception("proxy connection from %s failed", client)


async def _requests(conn: _ClientConn, handler: Handler) -> None:
    while True:
        try:
            head = await conn.next_head()
        except ProtocolError as e:
            await conn.refuse(e.status, e.reason)
            return
        if head is None:
            return
        req = Request(conn, head)
        bad: BadRequestBody | None = None
        keep = False
        with trio.CancelScope() as scope:
            conn.begin(req, scope)
            try:
                try:
                    out = await handler(req)
                except BadRequestBody as e:
                    bad = e
                except ClientGone:
                    return
                except ResetConnection:
                    conn.io.reset()
                    return
                except Exception:
                    log.exception("proxy handler failed for %s %s",
                                  head.method.decode(errors="replace"),
                                  head.target.decode(errors="replace")[:200])
                    if conn.on_error is not None:
                        conn.on_error(conn.client, 500, "proxy error")
                    out = simple_reply(500, "proxy error (see the agent's log)",
                                       code=ErrorCode.INTERNAL_ERROR)
                if bad is None:
                    keep = await conn.answer(req, out)
            finally:
                conn.unwatch(req)
        if bad is not None:
            await conn.refuse(400, str(bad))
            return
        if req.failure is not None and (scope.cancelled_caught or not keep):
            # The client left: its upstream exchange was abandoned (closed, not pooled).
            log.debug("client %s left before the response to %s %s", conn.client,
                      head.method.decode(errors="replace"),
                      head.target.decode(errors="replace")[:200])
            if conn.on_error is not None:
                conn.on_error(conn.client, 499, str(req.failure))
            return
        if not keep:
            await conn.close_gracefully()
            return
