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

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpcore
import trio

from .net_backend import LeanTrioBackend
from .stream_server import ClientGone, UpstreamBroken

CONNECT_FAILURE = "connect-failure"
TIMEOUT = "timeout"
RESET = "reset"


class TryFailed(Exception):
    def __init__(self, condition: str, detail: str) -> None:
        super().__init__(f"{condition}: {detail}")
        self.condition = condition
        self.detail = detail

    @property
    def status(self) -> int:
        """The status the caller sees if this was the last try."""
        return 504 if self.condition == TIMEOUT else 502 if self.condition == RESET else 503


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _response: httpcore.Response

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_stream():
                yield chunk
        except (httpcore.ReadError, httpcore.ReadTimeout, httpcore.RemoteProtocolError,
                httpcore.NetworkError) as exc:
            raise UpstreamBroken(f"{type(exc).__name__}: {exc}") from None

    async def release(self) -> None:
        await self._response.aclose()


class Upstreams:
    def __init__(self, *, max_connections: int = 4096, keepalive: int = 256,
                 keepalive_expiry: float = 30.0, body_idle_timeout: float = 60.0) -> None:
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=max_connections, max_keepalive_connections=keepalive,
            keepalive_expiry=keepalive_expiry, network_backend=LeanTrioBackend())
        self.body_idle_timeout = body_idle_timeout

    async def send(self, method: bytes, host: str, port: int, target: bytes,
                   headers: list[tuple[bytes, bytes]],
                   body: bytes | AsyncIterator[bytes] | None, *,
                   connect_timeout: float, per_try_timeout: float) -> UpstreamResponse:
        """Send one try and return once the response headers are in. ``headers`` must
        already carry Host and framing (Content-Length or chunked)."""
        url = httpcore.URL(scheme=b"http", host=host.encode(), port=port, target=target)
        request = httpcore.Request(
            method, url, headers=headers, content=body,
            # Only the connect timeout goes to httpcore: the per-try scope below bounds
            # everything up to the response headers, and the server's moving deadline
            # bounds the body (no scope per read: see net_backend.py).
            extensions={"timeout": {"connect": connect_timeout}})
        try:
            with trio.fail_after(per_try_timeout):
                response = await self.pool.handle_async_request(request)
        except trio.TooSlowError:
            raise TryFailed(TIMEOUT, f"no response within {per_try_timeout:g} s") from None
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            raise TryFailed(CONNECT_FAILURE, str(exc) or type(exc).__name__) from None
        except httpcore.PoolTimeout:
            raise TryFailed(TIMEOUT, "no connection free in time") from None
        except ClientGone:
            raise
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException,
                OSError) as exc:
            raise TryFailed(RESET, f"{type(exc).__name__}: {exc}") from None
        return UpstreamResponse(response.status, list(response.headers), response)

    async def aclose(self) -> None:
        await self.pool.aclose()
