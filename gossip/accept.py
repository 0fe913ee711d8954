# layer: shell — accepts connections (trio, file descriptors)
"""Accepting TCP connections within a file-descriptor budget, for every listener.

An agent's listeners (gossip streams, the local API, the sidecar's) share one
process limit on open files. Left alone, a few thousand idle connections to the
proxy exhaust it, and then the gossip port can accept no push-pull and open no
exchange: the agent drops out of the cluster because a client was slow. So the
agent splits its limit into pools (``FdBudget``): gossip and the API keep a reserve
the proxy cannot take, and a listener whose pool is empty simply stops accepting
(new connections wait in the kernel's backlog) until one of its connections closes.

``serve_listeners`` replaces ``trio.serve_listeners`` with that rule, a cap on
connections per client address, and EMFILE handled with back-off and one log line
per interval (trio logs a traceback for every failed accept, ten a second).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

log = logging.getLogger("rumor.accept")

#: accept(2) failures that mean "out of descriptors or memory, try again later".
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: At most one warning per listener this often while accepts keep failing.
LOG_INTERVAL = 10.0


class FdPool:
    """A counted share of the process's file descriptors (trio-aware)."""

    def __init__(self, name: str, size: float) -> None:
        self.name = name
        self.size = size
        self.used = 0
        self._freed = trio.Event()

    def try_acquire(self, n: int = 1) -> bool:
        if self.used + n > self.size:
            return False
        self.used += n
        return True

    async def acquire(self, n: int = 1) -> None:
        """Wait until ``n`` descriptors are free in this pool, then take them."""
        while not self.try_acquire(n):
            await self._freed.wait()

    def release(self, n: int = 1) -> None:
        self.used -= n
        ev, self._freed = self._freed, trio.Event()
        ev.set()


@dataclass(frozen=True, slots=True)
class FdBudget:
    """The process's descriptors split into pools; see the module docstring."""

    gossip: FdPool
    api: FdPool
    proxy: FdPool
    limit: int
    #: DNS over TCP (its connections at once).
    dns: FdPool = field(default_factory=lambda: FdPool("dns", math.inf))

    @classmethod
    def unlimited(cls) -> FdBudget:
        return cls(FdPool("gossip", math.inf), FdPool("api", math.inf),
                   FdPool("proxy", math.inf), 0)

    @classmethod
    def from_process(cls, in_use: int | None = None) -> FdBudget:
        """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (as Go's runtime does),
        then split it: whatever is open now plus a margin, a reserve for gossip and
        one for the API, and the rest for the sidecar."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        if in_use is None:
            try:
                in_use = len(os.listdir("/proc/self/fd"))
            except OSError:
                in_use = 64
        return cls.split(soft, in_use)

    @classmethod
    def split(cls, limit: int, in_use: int) -> FdBudget:
        """Pools for a process limited to ``limit`` descriptors, ``in_use`` open now."""
        spare = max(0, limit - in_use - 16)  # 16: log files, DNS's UDP, certificate reloads
        gossip = max(8, min(256, spare // 8))
        api = max(4, min(512, spare // 16))  # blocking queries hold one each
        dns = max(4, min(128, spare // 32))  # DNS over TCP: truncated answers' retries
        return cls(FdPool("gossip", gossip), FdPool("api", api),
                   FdPool("proxy", max(0, spare - gossip - api - dns)), limit,
                   FdPool("dns", dns))

    def describe(self) -> str:
        pools = ", ".join(f"{p.name} {p.size:g}"
                          for p in (self.gossip, self.api, self.proxy, self.dns))
        return f"{self.limit} file descriptors: {pools}"


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    #: Descriptors one accepted connection costs (a proxied one also opens an upstream).
    fds_per_connection: int = 1
    #: Connections at once from one client host (0: no cap).
    max_per_client: int = 0


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def serve_listeners(handler: Handler, listeners: list[trio.SocketListener], *,
                          pool: FdPool | None = None, limits: ListenerLimits | None = None,
                          what: str = "listener") -> None:
    """Serve ``handler`` on every listener until cancelled (see the module docstring).
    The handler owns the stream; it is closed here afterwards in any case."""
    pool = pool or FdPool(what, math.inf)
    lim = limits or ListenerLimits()
    per_client: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, handler, listener, nursery, pool, lim,
                               per_client, what)


async def accept_loop(handler: Handler, listener: trio.SocketListener,
                      nursery: trio.Nursery, pool: FdPool, lim: ListenerLimits,
                      per_client: Counter[str], what: str) -> None:
    """Accept on ``listener`` until cancelled (closing it then), each connection run in
    ``nursery``, which may outlive the loop (an upstream port removed by a reload keeps
    its connections). ``per_client`` is shared by the listeners that cap together."""
    backoff = 0.0
    failed = 0
    logged_at = -math.inf
    async with listener:
        while True:
            await pool.acquire(lim.fds_per_connection)
            try:
                stream = await listener.accept()
            except OSError as e:
                pool.release(lim.fds_per_connection)
                if e.errno not in _CAPACITY_ERRNOS:
                    raise
                failed += 1
                now = trio.current_time()
                if now - logged_at >= LOG_INTERVAL:
                    log.warning("%s cannot accept connections: %s (%d failed accepts; "
                                "retrying with back-off)", what, os.strerror(e.errno or 0),
                                failed, extra={"event": "accept_failed", "listener": what,
                                               "errno": e.errno, "failures": failed})
                    logged_at = now
                backoff = min(1.0, max(0.01, backoff * 2))
                await trio.sleep(backoff)
                continue
            backoff = 0.0
            host = _client_host(stream)
            if lim.max_per_client and per_client[host] >= lim.max_per_client:
                _close_now(stream)
                pool.release(lim.fds_per_connection)
                continue
            per_client[host] += 1
            nursery.start_soon(_run, handler, stream, pool, lim.fds_per_connection,
                               per_client, host)


async def _run(handler: Handler, stream: trio.SocketStream, pool: FdPool, fds: int,
               per_client: Counter[str], host: str) -> None:
    try:
        await handler(stream)
    finally:
        _close_now(stream)
        pool.release(fds)
        per_client[host] -= 1
        if per_client[host] <= 0:
            del per_client[host]


def _client_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError):
        return "?"


def _close_now(stream: trio.SocketStream) -> None:
    """Close without waiting (the handler already shut down gracefully if it could)."""
    stream.socket.close()
