"""The client side of a proxy hop: pooled httpcore connections, failures classified.

One `Upstreams` per listener keeps keep-alive connections to every upstream it talks
to (the callee sidecars for the outbound listener, the local services for the inbound
one), so a request in steady state costs no TCP handshake. The retry and ejection
logic needs to know *how* a try failed, not just that it did; `send()` turns the many
exceptions of the network stack into one `TryFailed` with a condition:

- ``connect-failure``: the connection could not be made (refused, unreachable,
  connect timeout): the upstream never saw the request, so it is safe to retry;
- ``timeout``: no response headers within the per-try timeout (counted as 504);
- ``reset``: the connection broke while sending or before the response (counted as
  502; the upstream may have acted on the request).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpcore
import trio

from ..policy.documents import BAD_GATEWAY, CONNECT_FAILURE, GATEWAY_TIMEOUT
from .attempts import failure_status
from .identity import Identity
from .net_backend import LeanTrioBackend
from .stream_server import ClientGone, UpstreamBroken
from .tls import MeshTls

#: How a failed try reads in the error the caller sees, by retry condition.
_WORDS = {CONNECT_FAILURE: "connect-failure", BAD_GATEWAY: "reset", GATEWAY_TIMEOUT: "timeout"}


class TryFailed(Exception):
    """A try that got no response; ``condition`` is a retry condition (documents.py)."""

    def __init__(self, condition: str, detail: str) -> None:
        super().__init__(f"{_WORDS.get(condition, condition)}: {detail}")
        self.condition = condition
        self.detail = detail

    @property
    def status(self) -> int:
        """The status the caller sees if this was the last try."""
        return failure_status(self.condition)


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _response: httpcore.Response
    _pool: Upstreams
    _key: tuple[str, int]
    _conn: httpcore.AsyncHTTP11Connection
    #: Time this try spent opening a connection (TCP, and TLS on the sidecar hop); 0
    #: on a pooled one. A balancer measures the instance, not the handshake.
    connect_seconds: float = 0.0

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_stream():
                yield chunk
        except (httpcore.ReadError, httpcore.ReadTimeout, httpcore.RemoteProtocolError,
                httpcore.NetworkError) as exc:
            raise UpstreamBroken(f"{type(exc).__name__}: {exc}") from None

    async def release(self) -> None:
        """Done with the response: the connection goes back to the pool if the
        exchange completed cleanly, else it is closed."""
        await self._response.aclose()
        if not self._pool.give_back(self._key, self._conn):
            await self._conn.aclose()


class Upstreams:
    """Keep-alive HTTP/1.1 connections (httpcore's) to every upstream, per origin.

    Why not ``httpcore.AsyncConnectionPool``: it is general (HTTP/2, proxies, waiting
    for a free slot under a global limit) and that generality is about a third of a
    sidecar's CPU per request. A proxy hop needs less: take an idle connection to the
    origin or open one, send, hand it back when the response is done. The HTTP work
    itself is httpcore's ``AsyncHTTP11Connection``; concurrency limits live in the
    circuit breaker, not here.
    """

    def __init__(self, *, keepalive: int = 256, keepalive_expiry: float = 30.0,
                 tls: MeshTls | None = None) -> None:
        self.keepalive = keepalive
        self.keepalive_expiry = keepalive_expiry
        self._backend = LeanTrioBackend(tls)
        self._idle: dict[tuple[str, int], list[httpcore.AsyncHTTP11Connection]] = {}
        #: The verified identity at the other end of each mutual-TLS connection.
        self._peers: weakref.WeakKeyDictionary[httpcore.AsyncHTTP11Connection, Identity] = \
            weakref.WeakKeyDictionary()
        self.stats = {"connections_opened": 0, "stale_retries": 0, "wrong_identity": 0}

    async def send(self, method: bytes, host: str, port: int, target: bytes,
                   headers: list[tuple[bytes, bytes]],
                   body: bytes | AsyncIterator[bytes] | None, *,
                   connect_timeout: float, per_try_timeout: float,
                   service: str | None = None) -> UpstreamResponse:
        """Send one try and return once the response headers are in. ``headers`` must
        already carry Host and framing (Content-Length or chunked). Over mutual TLS,
        ``service`` must be named by the upstream's certificate: a host cannot be
        called as a service its certificate does not name (a connect failure: the
        request is not sent)."""
        url = httpcore.URL(scheme=b"http", host=host.encode(), port=port, target=target)
        request = httpcore.Request(method, url, headers=headers, content=body)
        key = (host, port)
        response: httpcore.Response | None = None
        connect_seconds = 0.0
        try:
            # A bare scope, not fail_after: one generator context manager less per
            # request on the hot path.
            with trio.CancelScope(deadline=trio.current_time() + per_try_timeout):
                while True:
                    conn, reused = await self._take(key)
                    if conn is None:
                        opened = trio.current_time()
                        conn = await self._connect(key, url, connect_timeout)
                        connect_seconds += trio.current_time() - opened
                    if service is not None and self._backend.tls is not None:
                        wrong = self._wrong_identity(conn, service)
                        if wrong:
                            # Closed, not pooled: a renewed certificate may name it.
                            await conn.aclose()
                            raise TryFailed(CONNECT_FAILURE, wrong)
                    try:
                        response = await conn.handle_async_request(request)
                        break
                    except (httpcore.ReadError, httpcore.WriteError,
                            httpcore.RemoteProtocolError):
                        # A reused connection the upstream closed as we picked it:
                        # the request never got an answer, so send it on a new one
                        # (only when the body can be sent again).
                        if not reused or not isinstance(body, (bytes, type(None))):
                            raise
                        self.stats["stale_retries"] += 1
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            raise TryFailed(CONNECT_FAILURE, str(exc) or type(exc).__name__) from None
        except ClientGone:
            raise
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException,
                OSError) as exc:
            raise TryFailed(BAD_GATEWAY, f"{type(exc).__name__}: {exc}") from None
        if response is None:  # the scope's deadline passed
            raise TryFailed(GATEWAY_TIMEOUT, f"no response within {per_try_timeout:g} s")
        assert conn is not None  # a response came on it
        return UpstreamResponse(response.status, list(response.headers), response,
                                self, key, conn, connect_seconds)

    def has_idle(self, host: str, port: int) -> bool:
        """Whether a pooled connection to host:port may carry the next request
        without opening one (it may still turn out closed when taken)."""
        return bool(self._idle.get((host, port)))

    async def _take(self, key: tuple[str, int]
                    ) -> tuple[httpcore.AsyncHTTP11Connection | None, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # most recently used: warmest, least likely closed
            if conn.is_idle() and not conn.has_expired():
                return conn, True
            await conn.aclose()  # expired, or the upstream closed it
        return None, False

    async def _connect(self, key: tuple[str, int], url: httpcore.URL,
                       timeout: float) -> httpcore.AsyncHTTP11Connection:
        stream = await self._backend.connect_tcp(key[0], key[1], timeout=timeout)
        self.stats["connections_opened"] += 1
        conn = httpcore.AsyncHTTP11Connection(url.origin, stream,
                                              keepalive_expiry=self.keepalive_expiry)
        if stream.peer is not None:
            self._peers[conn] = stream.peer
        return conn

    def _wrong_identity(self, conn: httpcore.AsyncHTTP11Connection, service: str) -> str:
        """Why ``conn`` must not carry a request for ``service`` ("" if it may)."""
        peer = self._peers.get(conn)
        if peer is not None and peer.names(service):
            return ""
        self.stats["wrong_identity"] += 1
        who = f"node {peer.node}" if peer is not None and peer.node else "the upstream"
        return f"the certificate of {who} does not name service {service!r}"

    def give_back(self, key: tuple[str, int], conn: httpcore.AsyncHTTP11Connection) -> bool:
        """Keep ``conn`` for the next request if it can carry one."""
        if not conn.is_idle():
            return False
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.keepalive:
            return False
        idle.append(conn)
        return True

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                await conn.aclose()
        self._idle.clear()
