# layer: shell — HTTP connection helpers (trio)
"""What the data plane and the API server both need of a trio connection: a close that
lets the peer read our last response, peer and local addresses, reason phrases."""

from __future__ import annotations

from http import HTTPStatus

import trio

#: The ``server`` header of responses rumor itself makes (API answers, proxy errors).
SERVER_NAME = "rumor"
_RECEIVE_CHUNK = 64 * 1024
# After sending a final response we half-close and read for at most this long, so the
# client sees it instead of a reset caused by its unread bytes.
CLOSE_DRAIN_SECONDS = 1.0
_CLOSE_DRAIN_BYTES = 256 * 1024


async def graceful_close(stream: trio.abc.Stream) -> None:
    """Half-close and drain briefly so unread client bytes do not reset our response.
    (A TLS stream cannot half-close; its ``aclose`` sends close_notify instead.)"""
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    try:
        await stream.send_eof()
        drained = 0
        with trio.move_on_after(CLOSE_DRAIN_SECONDS):
            while drained < _CLOSE_DRAIN_BYTES:
                data = await stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    break
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer is already gone, which is all a close needs


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def local_address(stream: trio.SocketStream) -> tuple[str, int] | None:
    try:
        host, port, *_ = stream.socket.getsockname()
    except (OSError, ValueError):
        return None
    return str(host), int(port)


def peer_name(stream: trio.SocketStream) -> str | None:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):
        return None
    return f"{host}:{port}"
