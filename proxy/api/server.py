# layer: shell — serves the local API (trio)
"""A small HTTP/1.1 server on trio and h11 for rumor's local JSON APIs.

Why not a framework: the agent's API is a handful of JSON routes on loopback, and the
sidecar already depends on h11 for its data plane. A hundred lines of h11 give us
keep-alive, hard limits against misbehaving clients and no extra dependency.

Requests and responses are buffered whole (bodies are capped, see `ServerLimits`); this
server is for control-plane traffic, not for the streaming data plane.

Failure policy, per connection:

- malformed bytes -> 400 (431 for oversized headers) and close;
- body larger than the limit -> 413 and close;
- a request that does not arrive completely within the request timeout -> 408 and close
  (an idle keep-alive connection is simply closed);
- handler raises `HttpError` -> that status with a JSON `{"error": ...}` body;
- handler raises anything else -> 500, traceback logged at ERROR;
- a client that vanishes mid-response is logged at DEBUG; any other connection-level
  error is logged with its traceback. Nothing a client does stops the server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from ...gossip.accept import FdPool, serve_listeners
from ..connection import (
    CLOSE_DRAIN_SECONDS,
    SERVER_NAME,
    graceful_close,
    local_address,
    peer_name,
    reason_phrase,
)

logger = logging.getLogger(__name__)

_RECEIVE_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Request:
    """One complete HTTP request as the handler sees it.

    `path` is percent-decoded and has no query string; `query` keeps the last value of
    a repeated parameter; header names are lower-case, repeated headers are joined
    with ", " (RFC 9110 section 5.3). `params` is filled by a router for `{name}`
    path segments.
    """

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    client: str | None = None
    #: (host, port) the connection arrived on: what a ``Host`` header must name.
    local: tuple[str, int] | None = None


@dataclass
class Response:
    """A complete response. `Content-Length` is added by the server.

    `on_sent`, if set, runs after the response has been written (or the attempt to
    write it failed): it lets a handler act only once the client has its answer, for
    example shutting the agent down after `/v1/leave`.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    on_sent: Callable[[], None] | None = None


class HttpError(Exception):
    """Raised by a handler to answer with `status` and `{"error": message}`.

    This is the expected-failure path (bad input, upstream refused): it is logged at
    DEBUG only, unlike an unexpected exception which becomes a logged 500.
    """

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ServerLimits:
    """Bounds that keep one client from holding memory or connections forever."""

    max_body_bytes: int = 1024 * 1024
    # Passed to h11 as max_incomplete_event_size: caps request line plus headers.
    max_header_bytes: int = 16 * 1024
    # Time allowed to receive one whole request, and to idle between keep-alive
    # requests; a per-request deadline (not per read) defeats slowloris clients.
    request_timeout: float = 30.0
    # Time allowed to write one response to a slow reader.
    send_timeout: float = 30.0


def json_response(
    obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> Response:
    """Serialize `obj` as compact UTF-8 JSON with a trailing newline (curl-friendly)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    all_headers = [("content-type", "application/json")]
    all_headers.extend(headers or [])
    return Response(status=status, headers=all_headers, body=body)


def error_response(
    status: int, message: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    """The one error shape of every rumor API: `{"error": message}`."""
    return json_response({"error": message}, status=status, headers=headers)


def read_json(request: Request) -> Any:
    """Decode a JSON request body, answering 400 (via HttpError) when it is not JSON."""
    if not request.body.strip():
        raise HttpError(400, "request body must be a JSON document")
    try:
        return json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError:
        # json's decoder recurses per nesting level; a 1 MB body of "[" exceeds the stack.
        raise HttpError(400, "request body is nested too deeply") from None


async def serve_http(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    limits: ServerLimits | None = None,
    pool: FdPool | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on host:port until cancelled; reports the bound port.

    Loopback by default: the local API must never be exposed by accident. With
    `port=0` the OS picks a port, passed to `task_status.started()`, so tests use
    `port = await nursery.start(serve_http, handler)`. If `host` resolves to several
    addresses with port 0, each listener gets its own port and the first is reported.
    Connections are accepted within ``pool`` (the API's share of the process's file
    descriptors), so a flood of clients waits in the backlog instead of starving gossip.
    """
    limits = limits or ServerLimits()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port: int = listeners[0].socket.getsockname()[1]
    logger.debug("http server listening on %s:%d", host, bound_port)

    async def on_connection(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, handler, limits)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_listeners, on_connection, listeners, pool=pool,
                                   what="local API"))
        task_status.started(bound_port)


class _Closing(Exception):
    """Internal: the connection must end (error already answered, or peer gone)."""


async def _serve_connection(
    stream: trio.SocketStream, handler: Handler, limits: ServerLimits
) -> None:
    """Run one connection; never lets an exception escape into the listener nursery."""
    peer = peer_name(stream)
    try:
        await _connection_loop(stream, handler, limits, peer, local_address(stream))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        logger.debug("http connection from %s dropped: %r", peer, exc)
    except Exception:
        logger.exception("http connection from %s failed", peer)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_DRAIN_SECONDS):
            await stream.aclose()


async def _connection_loop(
    stream: trio.SocketStream, handler: Handler, limits: ServerLimits, peer: str | None,
    local: tuple[str, int] | None,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    while True:
        try:
            request = await _read_request(stream, conn, limits, peer, local)
        except _Closing:
            return
        if request is None:
            return
        response = await _call_handler(handler, request)
        if request.method == "HEAD":
            # h11 frames a HEAD response as empty; the length still describes GET.
            if not any(name.lower() == "content-length" for name, _ in response.headers):
                response.headers.append(("content-length", str(len(response.body))))
            response.body = b""
        try:
            with trio.fail_after(limits.send_timeout):
                await _send_response(stream, conn, response)
        except trio.TooSlowError:
            logger.debug("http client %s too slow to read its response; closing", peer)
            return
        finally:
            if response.on_sent is not None:
                response.on_sent()
        if conn.our_state is h11.MUST_CLOSE:
            await graceful_close(stream)
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            # The client has not finished its side (e.g. we answered early); close.
            return


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection, limits: ServerLimits, peer: str | None,
    local: tuple[str, int] | None,
) -> Request | None:
    """Read one request; None on a clean close between requests.

    Protocol and limit violations are answered here and end in `_Closing`.
    """
    head: h11.Request | None = None
    body = bytearray()
    received_any = False
    try:
        with trio.fail_after(limits.request_timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(_RECEIVE_CHUNK)
                    received_any = received_any or bool(data)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    head = event
                    _check_head(head, limits)
                    if conn.they_are_waiting_for_100_continue:
                        await stream.send_all(
                            conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                            or b""
                        )
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limits.max_body_bytes:
                        raise HttpError(413, _too_large(limits))
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    return _make_request(head, bytes(body), peer, local)
                elif isinstance(event, h11.ConnectionClosed):
                    if head is not None or received_any:
                        logger.debug("http client %s closed mid-request", peer)
                    return None
                elif event is h11.PAUSED:  # pragma: no cover - only after a full request
                    return None
    except trio.TooSlowError:
        if head is None and not received_any:
            logger.debug("http connection from %s idle too long; closing", peer)
            raise _Closing() from None
        await _send_error(stream, conn, error_response(408, "request not received in time"))
        raise _Closing() from None
    except h11.RemoteProtocolError as exc:
        logger.debug("malformed http request from %s: %s", peer, exc)
        status = exc.error_status_hint
        await _send_error(stream, conn, error_response(status, f"bad request: {exc}"))
        raise _Closing() from None
    except HttpError as exc:
        await _send_error(stream, conn, error_response(exc.status, exc.message))
        raise _Closing() from None


def _check_head(head: h11.Request, limits: ServerLimits) -> None:
    """Enforce the header limit and refuse an announced oversized body unread.

    h11's max_incomplete_event_size only bounds a head still being received; a head
    that arrived whole in one read is measured here so the limit does not depend on
    how the client's bytes happened to be split.
    """
    head_size = len(head.method) + len(head.target) + sum(
        len(name) + len(value) + 4 for name, value in head.headers
    )
    if head_size > limits.max_header_bytes:
        raise HttpError(431, f"request head exceeds {limits.max_header_bytes} bytes")
    for name, value in head.headers:
        if name == b"content-length" and int(value) > limits.max_body_bytes:
            raise HttpError(413, _too_large(limits))


def _too_large(limits: ServerLimits) -> str:
    return f"request body exceeds {limits.max_body_bytes} bytes"


def _make_request(head: h11.Request, body: bytes, peer: str | None,
                  local: tuple[str, int] | None) -> Request:
    target = head.target.decode("ascii", errors="replace")
    parts = urlsplit(target)
    headers: dict[str, str] = {}
    for raw_name, raw_value in head.headers:
        name = raw_name.decode("ascii", errors="replace")
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Request(
        method=head.method.decode("ascii", errors="replace"),
        path=unquote(parts.path) or "/",
        query=dict(parse_qsl(parts.query, keep_blank_values=True)),
        headers=headers,
        body=body,
        client=peer,
        local=local,
    )


async def _call_handler(handler: Handler, request: Request) -> Response:
    try:
        return await handler(request)
    except HttpError as exc:
        logger.debug("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return error_response(exc.status, exc.message, exc.headers)
    except Exception:
        logger.exception("handler for %s %s raised", request.method, request.path)
        return error_response(500, "internal server error (see the agent's log)")


async def _send_response(
    stream: trio.SocketStream, conn: h11.Connection, response: Response
) -> None:
    headers = [("server", SERVER_NAME), *response.headers]
    has_length = any(name.lower() == "content-length" for name, _ in headers)
    # 1xx, 204 and 304 responses must not carry a Content-Length (RFC 9110 8.6).
    if not has_length and response.status >= 200 and response.status not in (204, 304):
        headers.append(("content-length", str(len(response.body))))
    out = bytearray()
    reason = reason_phrase(response.status)
    head = h11.Response(status_code=response.status, headers=headers, reason=reason)
    out += conn.send(head) or b""
    if response.body:
        out += conn.send(h11.Data(data=response.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(bytes(out))


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, response: Response) -> None:
    """Answer a broken request if the protocol state still allows it, then close."""
    if conn.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
        return
    response.headers.append(("connection", "close"))
    try:
        with trio.fail_after(CLOSE_DRAIN_SECONDS):
            await _send_response(stream, conn, response)
        await graceful_close(stream)
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        logger.debug("could not deliver error %d: %r", response.status, exc)
