"""A leaner trio network backend for httpcore's connection pools.

httpcore's own trio backend wraps every read and every write in an exception-mapping
context manager and a ``fail_after`` scope, even with no timeout. On the data plane
that is four scopes and context managers per proxied request per hop, a measurable
share of a sidecar's CPU. This backend plugs into httpcore's documented extension
point (``network_backend=``) and does the same work with plain ``try``/``except``
(free in Python 3.11 unless raised) and a scope only when a timeout is set. The
proxy's per-try deadline already bounds every request, so its pools pass no read or
write timeout on the path to the response headers.
"""

from __future__ import annotations

import typing

import httpcore
import trio

from .identity import Identity
from .tls import HandshakeFailed, MeshTls

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class LeanTrioStream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType,
                 peer: Identity | None = None) -> None:
        self._stream = stream
        self._sock = sock
        #: The server's verified identity when the stream is mutual TLS.
        self.peer = peer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            # A TLS stream may hand back a bytearray; httpcore's h11 takes any bytes-like.
            if timeout is None:
                return typing.cast(bytes, await self._stream.receive_some(max_bytes))
            with trio.fail_after(timeout):
                return typing.cast(bytes, await self._stream.receive_some(max_bytes))
        except trio.TooSlowError:
            raise httpcore.ReadTimeout(f"no data for {timeout} s") from None
        except _BROKEN as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            if timeout is None:
                await self._stream.send_all(buffer)
                return
            with trio.fail_after(timeout):
                await self._stream.send_all(buffer)
        except trio.TooSlowError:
            raise httpcore.WriteTimeout(f"could not write for {timeout} s") from None
        except _BROKEN as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    def get_extra_info(self, info: str) -> typing.Any:
        sock = self._sock
        if info == "is_readable":
            return sock.is_readable()  # httpcore's check before reusing a connection
        if info == "socket":
            return sock
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        return None


class LeanTrioBackend(httpcore.AsyncNetworkBackend):
    """Plain TCP, or with ``tls`` a verified mutual-TLS stream (the sidecar hop)."""

    def __init__(self, tls: MeshTls | None = None) -> None:
        self.tls = tls

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None,
                          ) -> LeanTrioStream:
        try:
            # One deadline for the TCP connect and the TLS handshake together.
            with trio.fail_after(float("inf") if timeout is None else timeout):
                stream = await trio.open_tcp_stream(host, port,
                                                    local_address=local_address)
                for option in socket_options or ():
                    stream.setsockopt(*option)
                if self.tls is None:
                    return LeanTrioStream(stream, stream.socket)
                try:
                    tls_stream, peer = await self.tls.connect(stream)
                except HandshakeFailed as exc:
                    await stream.aclose()
                    raise httpcore.ConnectError(f"{host}:{port}: {exc}") from None
                return LeanTrioStream(tls_stream, stream.socket, peer)
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)
