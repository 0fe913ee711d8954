"""The h11 server side of the sidecar's listeners, streaming bodies both ways.

The API server (`api/server.py`) reads whole requests because its bodies are small JSON;
the data plane must not: a 1 GB upload passes through chunk by chunk, with memory
bounded by one receive buffer. So a handler gets an `Incoming` whose body is an async
iterator pulling h11 events off the client's connection as the upstream consumes
them, and returns an `Outgoing` whose body is an async iterator the server writes out
as it arrives.

Hostile clients are bounded here, before any handler runs: the request head must
arrive whole within `head_timeout` (slowloris), the head is capped by h11's
`max_incomplete_event_size`, every body read and write has an idle timeout, and any
protocol violation h11 detects (bad chunking, conflicting lengths, obsolete line
folding, smuggling attempts) is answered with 400 and the connection closed. A
handler that raises is answered with 502 and logged; the listener keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import h11
import trio

from ..gossip.accept import FdPool, ListenerLimits, serve_listeners
from .connection import SERVER_NAME, graceful_close, peer_name, reason_phrase
from .identity import Identity
from .tls import HandshakeFailed, MeshTls

log = logging.getLogger("rumor.proxy")

RECEIVE_CHUNK = 64 * 1024
#: Unread request body we are willing to swallow to keep a connection alive.
DRAIN_LIMIT = 256 * 1024


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    max_header_bytes: int = 16 * 1024
    #: The whole request head must arrive within this, once its first byte has.
    head_timeout: float = 10.0
    #: A keep-alive connection may idle this long between requests.
    idle_timeout: float = 60.0
    #: Longest silence inside a body, either direction.
    body_idle_timeout: float = 60.0


class ClientGone(Exception):
    """The client broke off (closed, reset, too slow) while we read its body."""


class BadRequestBody(ClientGone):
    """The client's body broke the protocol (e.g. malformed chunking): answer 400."""


class Incoming:
    """One request as a proxy handler sees it; the body streams from the client."""

    __slots__ = ("_body_started", "_conn", "_limits", "_stream", "client", "done",
                 "headers", "http_version", "method", "peer", "target")

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream, head: h11.Request,
                 client: str, limits: ProxyLimits, peer: Identity | None = None) -> None:
        self._conn = conn
        self._stream = stream
        self._limits = limits
        self._body_started = False
        self.method: bytes = head.method
        self.target: bytes = head.target
        #: Names lower-cased by h11, in arrival order, repeats kept.
        self.headers: list[tuple[bytes, bytes]] = list(head.headers)
        self.http_version: bytes = head.http_version
        self.client = client
        #: The caller's verified identity (its certificate) on a mutual-TLS listener.
        self.peer = peer
        #: True once the whole body (possibly empty) has been read.
        self.done = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def content_length(self) -> int | None:
        v = self.header(b"content-length")
        return int(v) if v is not None else None  # h11 validated it

    @property
    def chunked(self) -> bool:
        return self.header(b"transfer-encoding") is not None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    async def read_all(self, limit: int) -> bytes | None:
        """The whole body if it is at most ``limit`` bytes (for retries); None if it is
        larger (what was read is lost: only call this when the length is known)."""
        buf = bytearray()
        async for chunk in self.body():
            buf += chunk
            if len(buf) > limit:
                return None
        return bytes(buf)

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, chunk by chunk (single use)."""
        if self._body_started:
            raise RuntimeError("the request body can be read once")
        self._body_started = True
        conn = self._conn
        if conn.they_are_waiting_for_100_continue:
            await self._stream.send_all(
                conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        while True:
            try:
                event = await _next_event(conn, self._stream, self._limits.body_idle_timeout)
            except h11.RemoteProtocolError as exc:
                raise BadRequestBody(f"malformed request body: {exc}") from None
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
                return
            else:  # ConnectionClosed mid-body
                raise ClientGone("client closed the connection mid-body")


@dataclass(slots=True)
class Outgoing:
    """What a proxy handler answers. ``body`` streams; ``release`` runs after the last
    byte (or on failure) to hand the upstream connection back; ``on_done`` gets the
    number of body bytes written and whether the response completed."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes | AsyncIterator[bytes] = b""
    release: Callable[[], Awaitable[None]] | None = None
    on_done: Callable[[int, bool], None] | None = None


ProxyHandler = Callable[[Incoming], Awaitable[Outgoing]]
#: Called on answers the server makes itself (400, 408, 502 for a crashed handler).
ErrorHook = Callable[[str, int, str], None]


def simple_response(status: int, reason: str, *, body: str | None = None,
                    headers: list[tuple[bytes, bytes]] | None = None) -> Outgoing:
    """A short text answer with an ``x-rumor-error`` header saying why (for 4xx/5xx the
    proxy itself produced, so they are never mistaken for the upstream's). Only these
    say ``server: rumor``: a proxied response keeps the upstream's own Server header."""
    text = (body if body is not None else f"{status} {reason_phrase(status).decode()}: "
            f"{reason}\n").encode()
    hs = [(b"server", SERVER_NAME.encode()), (b"content-type", b"text/plain; charset=utf-8"),
          (b"content-length", str(len(text)).encode()),
          (b"x-rumor-error", reason.encode("ascii", "replace")[:512]), *(headers or [])]
    return Outgoing(status, hs, text)


async def serve_proxy(handler: ProxyHandler, host: str, port: int, *,
                      limits: ProxyLimits | None = None, on_error: ErrorHook | None = None,
                      tls: MeshTls | None = None, pool: FdPool | None = None,
                      max_per_client: int = 0,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handler`` on host:port until cancelled; reports the bound port. With
    ``tls`` every connection must first complete a mutual TLS handshake; the peer's
    verified identity then comes with each of its requests (``Incoming.peer``).
    Connections are accepted within ``pool`` (two descriptors each: the client's and
    an upstream's), at most ``max_per_client`` at once from one host (0: no cap)."""
    lim = limits or ProxyLimits()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]

    async def on_connection(raw: trio.SocketStream) -> None:
        client = peer_name(raw) or "?"
        if tls is None:
            await _serve_connection(raw, handler, lim, on_error, client, None)
            return
        try:
            stream, peer = await tls.accept(raw)
        except HandshakeFailed as e:
            # A port scanner, a plaintext client, a stranger's certificate: its own
            # connection ends here and the listener serves everyone else. Counted
            # (rumor_tls_handshake_failures_total); logged at debug, so a scan cannot
            # flood the log.
            log.debug("TLS handshake from %s refused: %s", client, e,
                      extra={"event": "tls_refused", "client": client})
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await raw.aclose()
            return
        await _serve_connection(stream, handler, lim, on_error, client, peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(
            serve_listeners, on_connection, listeners, pool=pool, what="proxy",
            limits=ListenerLimits(fds_per_connection=2, max_per_client=max_per_client)))
        task_status.started(bound)


async def _serve_connection(stream: trio.abc.Stream, handler: ProxyHandler,
                            limits: ProxyLimits, on_error: ErrorHook | None, client: str,
                            peer: Identity | None) -> None:
    try:
        await _connection_loop(stream, handler, limits, client, on_error, peer)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone) as exc:
        log.debug("proxy connection from %s dropped: %r", client, exc)
    except Exception:
        log.exception("proxy connection from %s failed", client)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await stream.aclose()


async def _connection_loop(stream: trio.abc.Stream, handler: ProxyHandler,
                           limits: ProxyLimits, client: str,
                           on_error: ErrorHook | None, peer: Identity | None) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    while True:
        head = await _read_head(conn, stream, limits, client, on_error)
        if head is None:
            return
        req = Incoming(conn, stream, head, client, limits, peer)
        try:
            out = await handler(req)
        except BadRequestBody as exc:
            await _refuse(conn, stream, 400, str(exc), client, on_error)
            return
        except ClientGone:
            return
        except Exception:
            log.exception("proxy handler failed for %s %s", head.method.decode(errors="replace"),
                          head.target.decode(errors="replace"))
            if on_error is not None:
                on_error(client, 502, "proxy error")
            out = simple_response(502, "proxy error (see the agent's log)")
        ok = await _send(conn, stream, req, out, limits)
        if not ok:
            return
        if conn.their_state is not h11.DONE and not await _drain(conn, stream, limits):
            return
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            await graceful_close(stream)
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _read_head(conn: h11.Connection, stream: trio.abc.Stream, limits: ProxyLimits,
                     client: str, on_error: ErrorHook | None) -> h11.Request | None:
    try:
        # Idle keep-alive wait: the first byte of the next request.
        event = conn.next_event()
        # One scope: first the keep-alive idle limit, then, from the first byte of the
        # request on, the limit for the whole head.
        with trio.CancelScope(deadline=trio.current_time() + limits.idle_timeout) as scope:
            first = True
            while event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_CHUNK)
                if first:
                    first = False
                    scope.deadline = trio.current_time() + limits.head_timeout
                # (A TLS stream may hand back a bytearray; h11 takes any bytes-like.)
                conn.receive_data(cast(bytes, data))  # b"" (closed): ConnectionClosed
                event = conn.next_event()
        if scope.cancelled_caught:
            if first:
                return None  # idle keep-alive connection: close quietly
            raise trio.TooSlowError
        if isinstance(event, h11.Request):
            # h11 bounds a head still arriving; one that came in a single read is
            # measured here, so the limit does not depend on how bytes were split.
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > limits.max_header_bytes:
                await _refuse(conn, stream, 431, f"request head exceeds "
                              f"{limits.max_header_bytes} bytes", client, on_error)
                return None
            names = {k for k, _ in event.headers}
            if b"transfer-encoding" in names and b"content-length" in names:
                # RFC 9112 6.3 lets a server pick Transfer-Encoding; a proxy must not,
                # since the next hop might pick Content-Length (request smuggling).
                await _refuse(conn, stream, 400, "both Content-Length and "
                              "Transfer-Encoding", client, on_error)
                return None
            return event
        return None  # ConnectionClosed (or PAUSED, which cannot happen here)
    except trio.TooSlowError:
        await _refuse(conn, stream, 408, "request head not received in time", client, on_error)
        return None
    except h11.RemoteProtocolError as exc:
        await _refuse(conn, stream, exc.error_status_hint, f"bad request: {exc}", client,
                      on_error)
        return None


async def _refuse(conn: h11.Connection, stream: trio.abc.Stream, status: int, reason: str,
                  client: str, on_error: ErrorHook | None) -> None:
    log.debug("refusing %s: %d %s", client, status, reason)
    if on_error is not None:
        on_error(client, status, reason)
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    out = simple_response(status, reason, headers=[(b"connection", b"close")])
    try:
        with trio.fail_after(1.0):
            data = conn.send(h11.Response(status_code=status, headers=out.headers,
                                          reason=reason_phrase(status))) or b""
            assert isinstance(out.body, bytes)
            data += conn.send(h11.Data(data=out.body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
        await graceful_close(stream)
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
            h11.LocalProtocolError):
        pass


async def _send(conn: h11.Connection, stream: trio.abc.Stream, req: Incoming,
                out: Outgoing, limits: ProxyLimits) -> bool:
    """Write the response; False if the connection cannot be reused."""
    sent = 0
    complete = False
    try:
        head = conn.send(h11.Response(status_code=out.status, headers=out.headers,
                                      reason=reason_phrase(out.status))) or b""
        if isinstance(out.body, bytes):
            data = head
            if out.body and req.method != b"HEAD":
                data += conn.send(h11.Data(data=out.body)) or b""
                sent = len(out.body)
            data += conn.send(h11.EndOfMessage()) or b""
            with trio.CancelScope(deadline=trio.current_time() + limits.body_idle_timeout
                                  ) as scope:
                await stream.send_all(data)
            if scope.cancelled_caught:
                log.debug("response to %s not read for %g s; closing", req.client,
                          limits.body_idle_timeout)
                return False
        else:
            # One scope whose deadline moves with progress: an idle limit on both the
            # upstream's chunks and the client's reading, without a scope per chunk.
            idle = limits.body_idle_timeout
            with trio.CancelScope(deadline=trio.current_time() + idle) as scope:
                pending = head  # the head goes out with the first chunk: one write
                async for chunk in out.body:
                    if not chunk:
                        continue
                    await stream.send_all(pending + (conn.send(h11.Data(data=chunk)) or b""))
                    pending = b""
                    sent += len(chunk)
                    scope.deadline = trio.current_time() + idle
                pending += conn.send(h11.EndOfMessage()) or b""
                if pending:
                    await stream.send_all(pending)
            if scope.cancelled_caught:
                log.debug("response to %s stalled for %g s; closing", req.client, idle)
                return False
        complete = True
        return True
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("response to %s not delivered: %r", req.client, exc)
        return False
    except h11.LocalProtocolError as exc:
        # The upstream's framing was wrong for this response (e.g. a body longer than
        # its Content-Length): the client gets a truncated response and a close.
        log.warning("response to %s aborted: %s", req.client, exc)
        return False
    except UpstreamBroken as exc:
        log.info("upstream broke off mid-response to %s: %s", req.client, exc)
        return False
    finally:
        if out.release is not None:
            with trio.CancelScope(shield=True):
                await out.release()
        if out.on_done is not None:
            out.on_done(sent, complete)


class UpstreamBroken(Exception):
    """Raised by a response body iterator when the upstream fails mid-body."""


async def _drain(conn: h11.Connection, stream: trio.abc.Stream,
                 limits: ProxyLimits) -> bool:
    """Swallow the rest of a request body we did not need (e.g. answered 403 before
    reading it) so the connection can carry the next request; give up past a limit."""
    drained = 0
    try:
        with trio.fail_after(min(5.0, limits.body_idle_timeout)):
            while conn.their_state is h11.SEND_BODY:
                event = await _next_event(conn, stream, limits.body_idle_timeout)
                if isinstance(event, h11.Data):
                    drained += len(event.data)
                    if drained > DRAIN_LIMIT:
                        return False
                elif not isinstance(event, h11.EndOfMessage):
                    return False
    except (trio.TooSlowError, h11.RemoteProtocolError, ClientGone):
        return False
    return conn.their_state is h11.DONE


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream,
                      idle: float) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
    """The next event, reading from the client as needed (never NEED_DATA)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(idle) as scope:
            data = await stream.receive_some(RECEIVE_CHUNK)
        if scope.cancelled_caught:
            raise ClientGone(f"no data from the client for {idle:g} s")
        conn.receive_data(cast(bytes, data))
