# layer: shell — serves DNS (trio)
"""The DNS responder on the network: UDP and TCP on one port (RFC 1035 4.2, RFC 7766).

A UDP answer that does not fit is cut with TC set, and the client asks again over TCP
on the same address and port, so both must be bound to one port number, also when the
port is chosen by the system (0). Over TCP every message carries a two-byte length;
a connection may carry many queries, sent one after another or pipelined, answered in
order. TCP lets a client hold state on the agent, so every hold is bounded:

- a connection must deliver its next whole query within ``idle`` seconds of the last
  answer, or it is closed (an idle client, or one that drips a query byte by byte);
- a length prefix of 0 or above ``max_query`` closes the connection (no query with one
  question is that long, and nothing we cannot parse is buffered);
- an answer the client does not read within ``write`` seconds closes it;
- at most ``pool.size`` connections at once; more wait in the kernel's backlog;
- each query is a checkpoint, so a client pipelining thousands cannot starve the UDP
  loop or the agent's other tasks.

``TcpFraming`` is the sans-IO part (bytes in, whole queries out); the rest is trio.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from functools import partial

import trio

from ...gossip.accept import FdPool, ListenerLimits, serve_listeners
from ...gossip.node import bind_udp_and_tcp
from ..connection import peer_name
from .dns import EDNS_LIMIT, DnsResponder, servfail

log = logging.getLogger("rumor.dns")

#: The longest query accepted over TCP (a query with one question and EDNS0 options is
#: far shorter; the UDP side reads at most this much too).
MAX_TCP_QUERY = EDNS_LIMIT
#: Connections to DNS over TCP at once, unless the agent gives a pool of its own.
TCP_CONNECTIONS = 128
#: The share of those one client address may hold at once (so one host cannot take
#: them all: resolvers retry truncated answers over TCP from many hosts).
TCP_PER_CLIENT_SHARE = 4
#: Bytes read from a connection at a time, and answers gathered before one write.
_RECV_BYTES = 4096
_FLUSH_BYTES = 16384


class TcpFraming:
    """RFC 7766 framing of one connection: bytes in, whole queries out (sans-IO)."""

    def __init__(self, max_query: int = MAX_TCP_QUERY) -> None:
        self.max_query = max_query
        #: Set once a length prefix no query can have arrived: answer the queries
        #: before it, then close (nothing after it can be framed).
        self.error: str | None = None
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        """Whether bytes of an unfinished query are buffered."""
        return bool(self._buf)

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """The queries ``data`` completes, in order (none once ``error`` is set)."""
        if self.error is not None:
            return []
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 2:
            (length,) = struct.unpack_from(">H", self._buf)
            if length == 0 or length > self.max_query:
                self.error = f"length prefix {length} (expected 1 to {self.max_query})"
                self._buf.clear()
                break
            if len(self._buf) < 2 + length:
                break
            out.append(bytes(self._buf[2:2 + length]))
            del self._buf[:2 + length]
        return out


def frame(message: bytes) -> bytes:
    """``message`` with its two-byte length, as TCP carries it."""
    return struct.pack(">H", len(message)) + message


@dataclass(frozen=True, slots=True)
class TcpLimits:
    #: Seconds a connection may take to deliver its next whole query.
    idle: float = 10.0
    #: Seconds an answer may take to be written (a client that does not read).
    write: float = 10.0
    max_query: int = MAX_TCP_QUERY


def answer_safely(responder: DnsResponder, data: bytes, peer: str, *,
                  tcp: bool = False) -> bytes | None:
    """The responder's answer; SERVFAIL (and the traceback logged) if it fails."""
    try:
        return responder.answer(data, tcp=tcp)
    except Exception:
        # A bug in rumor, not the client's fault: log it, answer SERVFAIL, go on.
        log.exception("DNS query from %s failed", peer)
        responder.stats["servfail"] += 1
        return servfail(data)


async def serve_dns(responder: DnsResponder, host: str = "127.0.0.1", port: int = 8600, *,
                    limits: TcpLimits | None = None, pool: FdPool | None = None,
                    max_per_client: int | None = None,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer DNS over UDP and TCP on host:port until cancelled; reports the bound port.
    TCP connections are accepted within ``pool`` (the agent's DNS share of its file
    descriptors; by default ``TCP_CONNECTIONS``), at most ``max_per_client`` at once
    from one address (default: a quarter of the pool, at least one; 0: no cap)."""
    lim = limits or TcpLimits()
    tcp_pool = pool or FdPool("dns", TCP_CONNECTIONS)
    if max_per_client is None:
        max_per_client = max(1, int(min(tcp_pool.size, TCP_CONNECTIONS))
                             // TCP_PER_CLIENT_SHARE)
    udp, listeners = await bind_udp_and_tcp(host, port)
    bound: int = udp.getsockname()[1]

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_tcp_connection(responder, stream, peer_name(stream) or "?", lim)

    with udp:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_udp, responder, udp)
            nursery.start_soon(partial(
                serve_listeners, on_connection, listeners, pool=tcp_pool,
                limits=ListenerLimits(max_per_client=max_per_client), what="DNS over TCP"))
            task_status.started(bound)


async def _serve_udp(responder: DnsResponder, sock: trio.socket.SocketType) -> None:
    while True:
        data, addr = await sock.recvfrom(EDNS_LIMIT)
        reply = answer_safely(responder, data, addr[0])
        if reply is None:
            continue
        try:
            await sock.sendto(reply, addr)
        except OSError as e:  # a full buffer loses one answer; the client retries
            responder.stats["send_errors"] += 1
            log.debug("DNS reply to %s failed: %s", addr[0], e)


async def serve_tcp_connection(responder: DnsResponder, stream: trio.abc.Stream, peer: str,
                               limits: TcpLimits | None = None) -> None:
    """Answer the queries of one TCP connection until the client closes it or a limit
    (see the module docstring) does; never raises for anything the client does."""
    lim = limits or TcpLimits()
    framing = TcpFraming(lim.max_query)
    stats = responder.stats
    stats["tcp_connections"] += 1
    try:
        while True:
            queries: list[bytes] = []
            with trio.move_on_after(lim.idle):
                while not queries and framing.error is None:
                    data = await stream.receive_some(_RECV_BYTES)
                    if not data:
                        return  # the client is done (an unfinished query is dropped)
                    queries = framing.feed(data)
            if not queries and framing.error is None:
                stats["tcp_idle_closed"] += 1
                log.debug("DNS over TCP from %s: closed after %.0f s without a whole "
                          "query", peer, lim.idle)
                return
            out = bytearray()
            for q in queries:
                stats["tcp_queries"] += 1
                reply = answer_safely(responder, q, peer, tcp=True)
                if reply is not None:
                    out += frame(reply)
                if len(out) >= _FLUSH_BYTES:
                    await _send(stream, out, lim)
                    out.clear()
                await trio.lowlevel.checkpoint()
            if out:
                await _send(stream, out, lim)
            if framing.error is not None:
                stats["tcp_bad_length"] += 1
                log.debug("DNS over TCP from %s: %s, closing", peer, framing.error)
                return
    except trio.TooSlowError:
        stats["tcp_write_timeouts"] += 1
        log.debug("DNS over TCP to %s: answer not read within %.0f s, closing",
                  peer, lim.write)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        log.debug("DNS over TCP from %s dropped: %r", peer, e)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await stream.aclose()


async def _send(stream: trio.abc.Stream, data: bytearray, lim: TcpLimits) -> None:
    with trio.fail_after(lim.write):
        await stream.send_all(data)

