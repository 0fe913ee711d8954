# layer: shell — syscall-first socket I/O (trio, socket, os)
"""Syscall-first socket I/O for the data path, with deadlines kept by one watchdog.

A trio ``SocketStream`` operation costs 14–19 µs here, a syscall about 1 µs, and a
``CancelScope`` with a deadline another 15 µs; a proxied request makes a dozen such
operations per hop. So the data path owns plain non-blocking sockets and tries the
syscall first; only when the kernel says EAGAIN does it park the task in
``trio.lowlevel.wait_readable/wait_writable``. Structured concurrency is unchanged:
every wait is a trio checkpoint, cancellation reaches a parked task as usual, and a
task that never has to wait still yields every ``_STREAK`` operations.

Deadlines are floats on each ``SocketIO``. One ``Watchdog`` task per listener scans
them and expires the late ones with ``trio.lowlevel.notify_closing``, which wakes
the parked task with an error that becomes ``TimedOut``. An expired socket is never
reused: its owner closes it. The watchdog sleeps until the earliest deadline (at
most ``MAX_SLEEP``, at least ``RESOLUTION``); setting an earlier one wakes it.

``TlsSocketIO`` is the same loop around an ``ssl.SSLObject`` on memory BIOs: the
handshake and every record go through the syscall-first path instead of
``trio.SSLStream``'s per-operation machinery.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import trio

#: Bytes asked of the kernel per receive.
RECV_SIZE = 64 * 1024
#: Operations in a row that completed without waiting before the task yields anyway.
_STREAK = 64
#: The watchdog's coarsest and finest sleep.
MAX_SLEEP = 1.0
RESOLUTION = 0.005

_Wait = Callable[[socket.socket], Coroutine[Any, Any, None]]


class ConnectionBroken(Exception):
    """The peer reset the connection, or TLS failed on it."""


class TlsFailed(ConnectionBroken):
    """The TLS handshake did not complete (closed, refused certificate, bad record)."""


class TimedOut(Exception):
    """The socket's deadline passed (the watchdog expired it)."""


class Watchdog:
    """Expires the sockets whose deadline has passed (see the module docstring)."""

    def __init__(self) -> None:
        self._ios: set[SocketIO] = set()
        #: When the watchdog will next look; an earlier deadline must wake it.
        self.wake_at = math.inf
        self._scope: trio.CancelScope | None = None

    def add(self, io: SocketIO) -> None:
        self._ios.add(io)

    def discard(self, io: SocketIO) -> None:
        self._ios.discard(io)

    def wake_by(self, when: float) -> None:
        self.wake_at = when
        if self._scope is not None:
            self._scope.deadline = when

    def expire_due(self, now: float) -> float:
        """Expire every socket due by ``now``; return the earliest deadline left."""
        soonest = math.inf
        for io in list(self._ios):
            d = io.deadline
            if d <= now:
                if not io.expired:
                    io.expire()
            elif d < soonest:
                soonest = d
        return soonest

    async def run(self) -> None:
        """Until cancelled (a task of the listener's nursery)."""
        while True:
            now = trio.current_time()
            soonest = self.expire_due(now)
            self.wake_at = max(min(soonest, now + MAX_SLEEP), now + RESOLUTION)
            with trio.CancelScope(deadline=self.wake_at) as self._scope:
                await trio.sleep_forever()
            self._scope = None


class SocketIO:
    """One non-blocking TCP socket: receive, send everything, close."""

    __slots__ = ("_streak", "_watchdog", "closed", "deadline", "expired", "sock")

    def __init__(self, sock: socket.socket, watchdog: Watchdog) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._watchdog = watchdog
        self.deadline = math.inf
        self.expired = False
        self.closed = False
        self._streak = 0
        watchdog.add(self)

    def set_deadline(self, when: float) -> None:
        self.deadline = when
        if when < self._watchdog.wake_at:
            self._watchdog.wake_by(when)

    def expire(self) -> None:
        self.expired = True
        trio.lowlevel.notify_closing(self.sock)

    async def _wait(self, wait: _Wait) -> None:
        if self.expired:
            raise TimedOut
        self._streak = 0
        try:
            await wait(self.sock)
        except trio.ClosedResourceError:
            if self.expired:
                raise TimedOut from None
            raise ConnectionBroken("connection closed") from None

    async def _yield_sometimes(self) -> None:
        self._streak += 1
        if self._streak >= _STREAK:
            self._streak = 0
            await trio.lowlevel.checkpoint()

    async def recv(self) -> bytes:
        """The next bytes the peer sent; b"" once it closed its side."""
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_readable)
                continue
            except OSError as e:
                raise ConnectionBroken(e.strerror or str(e)) from None
            await self._yield_sometimes()
            return data

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """All of ``data``, waiting for room as needed."""
        view: memoryview | None = None
        while True:
            try:
                n = self.sock.send(data if view is None else view)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_writable)
                continue
            except OSError as e:
                raise ConnectionBroken(e.strerror or str(e)) from None
            if n == len(data if view is None else view):
                # No yield here: a relay loop yields in recv, and an upload marks its
                # body sent right after its last send, before the upstream can answer.
                return
            view = (memoryview(data) if view is None else view)[n:]

    def idle_and_open(self) -> bool:
        """For a pooled connection: true if the peer has neither closed it nor sent
        anything unasked (either makes it unusable)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: open and quiet
        except OSError:
            return False
        return False  # closed (b"") or unasked bytes

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with a TCP reset instead of a FIN (an injected fault: the caller sees
        what a crashed dependency would show)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._watchdog.discard(self)
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    def peer_name(self) -> str:
        try:
            host, port, *_ = self.sock.getpeername()
        except (OSError, ValueError):
            return "?"
        return f"{host}:{port}"


class TlsSocketIO(SocketIO):
    """A ``SocketIO`` speaking TLS through an ``ssl.SSLObject`` on memory BIOs."""

    __slots__ = ("_in", "_out", "tls")

    def __init__(self, sock: socket.socket, watchdog: Watchdog, context: ssl.SSLContext, *,
                 server_side: bool) -> None:
        super().__init__(sock, watchdog)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_side)

    async def _flush(self) -> None:
        if self._out.pending:
            await SocketIO.send(self, self._out.read())

    async def _fill(self) -> bool:
        """Feed the TLS object the next raw bytes; False if the peer closed."""
        await self._flush()
        raw = await SocketIO.recv(self)
        if not raw:
            self._in.write_eof()
            return False
        self._in.write(raw)
        return True

    async def handshake(self) -> bytes:
        """Complete the handshake; the peer's certificate (DER), b"" if it sent none."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if not await self._fill():
                    raise TlsFailed("connection closed during the TLS handshake") from None
            except ssl.SSLError as e:
                await self._flush_quietly()
                raise TlsFailed(f"TLS handshake failed: {e.reason or e}") from None
        await self._flush()
        return self.tls.getpeercert(binary_form=True) or b""

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(ConnectionBroken, TimedOut):
            await self._flush()

    async def recv(self) -> bytes:
        while True:
            try:
                data = self.tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                if not await self._fill():
                    return b""  # closed without close_notify: the caller's framing decides
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as e:
                raise ConnectionBroken(f"TLS: {e.reason or e}") from None
            if self._out.pending:  # e.g. a key update answered
                await self._flush()
            return data

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.tls.write(data)
        except ssl.SSLError as e:
            raise ConnectionBroken(f"TLS: {e.reason or e}") from None
        await SocketIO.send(self, self._out.read())

    async def close_write(self) -> None:
        """Half-close: send close_notify (then a TCP FIN) and keep reading; OpenSSL
        reads the peer's records after our close_notify until its own arrives. (Not
        ``shutdown_write``, which stays the plain socket's synchronous FIN.)"""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's close_notify comes when it is done writing
        except ssl.SSLError as e:
            raise ConnectionBroken(f"TLS: {e.reason or e}") from None
        await self._flush()
        SocketIO.shutdown_write(self)

    @property
    def alpn(self) -> str | None:
        """The application protocol the handshake chose (ALPN), None if none."""
        return self.tls.selected_alpn_protocol()

    def idle_and_open(self) -> bool:
        # Sessions tickets are off on the server side (tls.py), so an idle mutual-TLS
        # connection has nothing to say; any bytes are a close_notify or worse.
        return SocketIO.idle_and_open(self) and not self._in.pending


async def open_connection(host: str, port: int, watchdog: Watchdog, deadline: float, *,
                          tls: ssl.SSLContext | None = None) -> tuple[SocketIO, bytes]:
    """Connect (and with ``tls`` complete a client handshake) by ``deadline``.
    Returns the socket and the server's certificate (b"" without TLS)."""
    addr = await _resolve(host, port)
    sock = socket.socket(addr[0], socket.SOCK_STREAM)
    io: SocketIO
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        io = SocketIO(sock, watchdog) if tls is None else \
            TlsSocketIO(sock, watchdog, tls, server_side=False)
    except BaseException:
        sock.close()
        raise
    io.set_deadline(deadline)
    try:
        err = sock.connect_ex(addr[1])
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            await io._wait(trio.lowlevel.wait_writable)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectionBroken(f"connect to {host}:{port}: {os.strerror(err)}")
        der = await io.handshake() if isinstance(io, TlsSocketIO) else b""
    except BaseException:
        io.close()
        raise
    io.deadline = math.inf
    return io, der


async def _resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise ConnectionBroken(f"{host}: no address") from None
        family, _, _, _, sockaddr = infos[0]
        return int(family), tuple(sockaddr)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)


def adopt(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket under an accepted trio stream (the stream is left detached)."""
    fd = stream.socket.detach()
    return socket.socket(fileno=fd)
