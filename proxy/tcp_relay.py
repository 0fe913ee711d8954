# layer: shell — relays a TCP connection's bytes both ways (trio, sockets)
"""Both directions of a relayed TCP connection at once, with half-close and an idle timeout.

A TCP protocol may close one direction and keep the other: a client sends its request
and shuts down its writing side, then reads the whole answer. So EOF from one side is
passed on as a half-close of the other (``shutdown(SHUT_WR)``, or under TLS a
close_notify followed by the FIN: ``TlsSocketIO.close_write``) while the other
direction keeps flowing; the relay ends when both directions have ended, when either
side breaks (a reset ends both), or after ``idle`` seconds without a byte either way.

The idle timeout is one cancel scope whose deadline moves as bytes flow (at most once a
second, so a busy connection does not touch trio's deadline heap per chunk): a
direction that is quiet while the other streams is not idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from .sockio import ConnectionBroken, SocketIO, TimedOut, TlsSocketIO

#: Default seconds without a byte either way before a relayed connection is closed.
IDLE_TIMEOUT = 3600.0
#: The idle deadline is pushed on at most this often (seconds).
_IDLE_SLACK = 1.0


@dataclass(slots=True)
class Relayed:
    """What one relay carried and how it ended."""

    #: Bytes from the client side to the server side, and back.
    sent: int = 0
    received: int = 0
    #: "closed" (both directions ended), "idle", "reset" (either side broke).
    ended: str = "closed"


async def close_write(io: SocketIO) -> None:
    """Half-close ``io``: no more bytes from us, the peer's still welcome."""
    if isinstance(io, TlsSocketIO):
        await io.close_write()
    else:
        io.shutdown_write()


async def relay(client: SocketIO, server: SocketIO, *, idle: float = IDLE_TIMEOUT,
                to_client: bytes = b"", to_server: bytes = b"") -> Relayed:
    """Relay until both directions end (see the module docstring); ``to_client`` and
    ``to_server`` are bytes already read from the other side, sent first. The caller
    closes both sockets afterwards."""
    out = Relayed()
    scope = trio.CancelScope(deadline=trio.current_time() + idle)

    def active() -> None:
        due = trio.current_time() + idle
        if due - scope.deadline >= _IDLE_SLACK:
            scope.deadline = due

    async def pump(src: SocketIO, dst: SocketIO, early: bytes, upward: bool) -> None:
        try:
            data = early
            while True:
                if data:
                    active()
                    await dst.send(data)
                    if upward:
                        out.sent += len(data)
                    else:
                        out.received += len(data)
                data = await src.recv()
                if not data:
                    break
            await close_write(dst)
        except (ConnectionBroken, TimedOut):
            out.ended = "reset"
            nursery.cancel_scope.cancel()

    for io in (client, server):
        io.deadline = math.inf
    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server, to_server, True)
            nursery.start_soon(pump, server, client, to_client, False)
    if scope.cancelled_caught:
        out.ended = "idle"
    return out


__all__ = ["IDLE_TIMEOUT", "Relayed", "close_write", "relay"]
