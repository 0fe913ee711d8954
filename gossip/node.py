# layer: shell — the trio runtime of a gossip node: sockets, timers
"""The trio runtime of a gossip member: sockets, timers, and nothing else.

``Node`` binds one UDP socket and one TCP listener on the same port, assembles the
node (``assembly.py``: the core and its delegates, as the simulator does), feeds what
arrives into the sans-IO ``Membership`` core, and carries out the effects the core
returns (``executor.py``). It holds no protocol logic: a disagreement between a
simulation and a real cluster is a bug here.

Embedding::

    async with Node(NodeConfig(name="a", bind=("127.0.0.1", 7946))) as node:
        await node.join(["10.0.0.2:7946"])
        async for event in node.subscribe():
            print(event.to_json())

The catalog's trio face (blocking queries, watches, check probes) is a ``Discovery``
over ``node.parts.catalog``, run in the program's nursery.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import socket as pysocket
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import trio

from .accept import FdPool, ListenerLimits, serve_listeners
from .address import format_address, parse_address
from .assembly import DelegateFactory, NodeParts, NodeSpec, assemble
from .cluster_query import ClusterQueries
from .config import LAN, GossipConfig
from .delegate import Delegate
from .effects import (
    Effect,
    JoinFinished,
    LeaveFinished,
    MemberEvent,
    Notice,
    SendPacket,
    StreamRequest,
)
from .executor import EffectExecutor
from .fields import ip_literal
from .history import Record
from .identity import Identity
from .keyring import KeyringSeal
from .membership import Membership
from .security import ReadBody, Refuse, Seal, refusal_frame
from .version import release
from .wire import FRAME_HEADER, MAX_PACKET, PROTOCOL_VERSION, Address, Meta, Status

log = logging.getLogger("rumor.gossip")

EVENT_BUFFER = 1024
#: Inbound streams handled at once, and open at once from one host (a loopback
#: cluster's agents all share 127.0.0.1, hence generous).
MAX_STREAMS = 32
MAX_STREAMS_PER_HOST = 256
#: Frame bytes being read at once over all inbound streams (one frame may be 16 MiB).
STREAM_BYTES = 32 * 1024 * 1024


class JoinError(Exception):
    """No seed answered a join."""


class BindError(OSError):
    """The gossip address could not be bound (in use, not local, wildcard without
    an advertise address)."""

    def __str__(self) -> str:
        return str(self.strerror)


async def bind_udp_and_tcp(host: str, port: int) -> tuple[trio.socket.SocketType,
                                                           list[trio.SocketListener]]:
    """A UDP socket and TCP listeners on one port (gossip, and the DNS server); with
    port 0, one free for both."""
    family = pysocket.AF_INET6 if ":" in host else pysocket.AF_INET
    for _attempt in range(20):
        udp = trio.socket.socket(family, pysocket.SOCK_DGRAM)
        try:
            await udp.bind((host, port))
            listeners = await trio.open_tcp_listeners(udp.getsockname()[1], host=host)
            return udp, listeners
        except OSError as e:
            udp.close()
            if port != 0 or e.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "no free port for both UDP and TCP")


@dataclass
class NodeConfig:
    name: str
    bind: Address = ("127.0.0.1", 7946)
    #: Address others use to reach us (defaults to ``bind``; needed behind NAT or when
    #: binding 0.0.0.0).
    advertise: Address | None = None
    gossip: GossipConfig = LAN
    profile: str = "lan"
    tags: Meta = field(default_factory=dict)
    seal: Seal | None = None
    #: Seed of the protocol's random choices; None draws one from the OS.
    seed: int | None = None
    #: File descriptors reserved for gossip streams (None: no limit but the process's).
    fds: FdPool | None = None
    #: Further delegates for the assembly (``NodeSpec.extras``), e.g. policy replication.
    extras: Sequence[DelegateFactory] = ()
    #: The node key and the rules for others' signed word (``identity.py``).
    identity: Identity | None = None


class FrameRefused(Exception):
    """The peer's frame header was refused; ``frame`` says why (write it, then close)."""

    def __init__(self, frame: bytes, reason: str) -> None:
        super().__init__(reason)
        self.frame = frame


class ByteBudget:
    """Bytes of frame bodies being read at once, across all streams: the bound on what
    a plaintext agent (which cannot authenticate a frame before reading it) buffers."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


async def read_frame(stream: trio.abc.ReceiveStream, core: Membership, source: Address,
                     budget: ByteBudget | None = None) -> bytes | None:
    """One frame's body, or None if the peer closed before sending one. The core
    decides from the header how much may be read (see ``Membership.frame_length``),
    so nothing is buffered before that; a refused header raises ``FrameRefused``."""
    header = await _read_exactly(stream, FRAME_HEADER.size)
    while header is not None:
        step = core.frame_length(trio.current_time(), source, header)
        if isinstance(step, Refuse):
            raise FrameRefused(step.frame, step.reason)
        if isinstance(step, ReadBody):
            if budget is None:
                return await _read_exactly(stream, step.n)
            if not budget.take(step.n):
                core.stats["streams_refused_busy"] += 1
                why = "too many bytes in flight on this agent's streams; retry later"
                raise FrameRefused(refusal_frame(why), why)
            try:
                return await _read_exactly(stream, step.n)
            finally:
                budget.give(step.n)
        more = await _read_exactly(stream, step.n)
        header = None if more is None else header + more
    return None


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 65536))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class Node:
    """A running gossip member (async context manager). See the module docstring."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.name = config.name
        self._core: Membership | None = None
        self._parts: NodeParts | None = None
        self._queries: ClusterQueries | None = None
        self._executor = EffectExecutor(self, on_error=self._effect_failed)
        self._outbox: list[SendPacket] = []
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._udp: trio.socket.SocketType | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._subscribers: list[trio.MemorySendChannel[MemberEvent]] = []
        self._join_lock = trio.Lock()  # one join at a time: the core tracks one
        self._join_done: trio.Event | None = None
        self._join_result: JoinFinished | None = None
        self._left = trio.Event()
        self._started_wall = time.time()
        self._pending_delegates: list[Delegate] = []
        #: Streams read and answered at once; more wait (their bytes unread) for a slot.
        self._streams = trio.CapacityLimiter(MAX_STREAMS)
        self._inflight = ByteBudget(STREAM_BYTES)
        self._error_logged: dict[str, float] = {}
        self.stats_dropped_events = 0

    # ---- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Node:
        try:
            try:
                udp, listeners = await self._bind()
            except OSError as e:
                raise BindError(e.errno, f"cannot bind gossip address "
                                f"{format_address(self.config.bind)}: {e.strerror or e}") from e
            self._udp = udp
            bound = udp.getsockname()
            advertise = await _ip_address(self.config.advertise
                                          or (self.config.bind[0], bound[1]))
            if advertise[0] in ("0.0.0.0", "::"):
                raise BindError(errno.EADDRNOTAVAIL, "binding a wildcard address needs "
                                "an advertise address (--advertise HOST:PORT)")
            rng = random.Random(self.config.seed if self.config.seed is not None
                                else int.from_bytes(os.urandom(8), "big"))
            now = trio.current_time()
            spec = NodeSpec(self.name, advertise, self.config.gossip,
                            meta=dict(self.config.tags), seal=self.config.seal,
                            wall_offset=time.time() - now, extras=self.config.extras,
                            identity=self.config.identity, release=release())
            self._parts = assemble(spec, now, rng, new_id=lambda: os.urandom(8).hex())
            self._core = self._parts.core
            self._core.history.on_record = _log_record
            self._queries = ClusterQueries(self._parts.queries, self.wake)
            for d in self._pending_delegates:
                self._core.register(d)
            self._nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._nursery.start_soon(self._udp_loop)
            self._nursery.start_soon(self._timer_loop)
            self._nursery.start_soon(self._serve_streams, listeners)
        except BaseException:
            await self._stack.aclose()
            if self._udp is not None:
                self._udp.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        """Stop without a leave (to others it looks like a crash); call ``leave()`` first
        for a graceful departure."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            for ch in self._subscribers:
                ch.close()
            if self._udp is not None:
                self._udp.close()

    async def _bind(self) -> tuple[trio.socket.SocketType, list[trio.SocketListener]]:
        return await bind_udp_and_tcp(*self.config.bind)

    # ---- public API ----------------------------------------------------------------------

    @property
    def core(self) -> Membership:
        if self._core is None:
            raise RuntimeError("the node is not running (use `async with Node(...)`)")
        return self._core

    @property
    def parts(self) -> NodeParts:
        """The assembled core and delegates (the catalog, the keyring commands, ...)."""
        if self._parts is None:
            raise RuntimeError("the node is not running (use `async with Node(...)`)")
        return self._parts

    @property
    def queries(self) -> ClusterQueries:
        """Cluster-wide queries from this node (``cluster_query.py``)."""
        if self._queries is None:
            raise RuntimeError("the node is not running")
        return self._queries

    @property
    def address(self) -> Address:
        return self.core.addr

    def register(self, delegate: Delegate) -> None:
        if self._core is None:
            self._pending_delegates.append(delegate)
        else:
            self._core.register(delegate)

    def subscribe(self) -> trio.MemoryReceiveChannel[MemberEvent]:
        """A channel of membership events from now on. A subscriber that falls more than
        EVENT_BUFFER events behind loses events (counted), never stalls the protocol."""
        send, recv = trio.open_memory_channel[MemberEvent](EVENT_BUFFER)
        self._subscribers.append(send)
        return recv

    async def join(self, seeds: Sequence[str | Address], attempts: int | None = None) -> int:
        """Join through ``seeds``; returns how many answered, raises JoinError if none.
        ``attempts``: rounds to try (default the profile's ``join_attempts``)."""
        addrs = [parse_address(s) if isinstance(s, str) else s for s in seeds]
        async with self._join_lock:
            self._join_done = trio.Event()
            self._join_result = None
            self.core.join(trio.current_time(), addrs, attempts)
            await self._flush()
            await self._join_done.wait()
            res = self._join_result
        assert res is not None
        if not res.contacted:
            raise JoinError("could not join: " + ("; ".join(res.errors) or "no seed answered"))
        return res.contacted

    async def leave(self) -> None:
        """Announce a graceful leave and wait (bounded) until it has been gossiped."""
        self.core.leave(trio.current_time())
        await self._flush()
        with trio.move_on_after(self.config.gossip.leave_propagate + 1.0):
            await self._left.wait()

    def wake(self) -> None:
        """Flush effects now: call after driving the core (or a delegate) from outside
        the node's own tasks, e.g. a policy published through the API."""
        self._kick()

    def set_tags(self, tags: Meta) -> None:
        self.core.set_meta(trio.current_time(), tags)
        self._kick()

    def broadcast(self, channel: str, payload: bytes, key: str | None = None) -> None:
        self.core.broadcast(trio.current_time(), channel, payload, key)
        self._kick()

    def members(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        return [self._member_json(m.name, now) for m in
                sorted(self.core.members.values(), key=lambda m: m.name)]

    def self_info(self) -> dict[str, Any]:
        info = self._member_json(self.name, trio.current_time())
        info.update({"profile": self.config.profile, "version": release(),
                     "protocol": PROTOCOL_VERSION,
                     "uptime_s": round(time.time() - self._started_wall, 1)})
        return info

    def health(self) -> dict[str, Any]:
        core = self.core
        counts = {name: 0 for name in Status.NAMES.values()}
        for m in core.members.values():
            counts[Status.NAMES[m.status]] += 1
        # One missed nack raises the Lifeguard score for a probe or two; a load balancer
        # polling /v1/health should see "degraded" only when the agent is really
        # struggling (half the maximum multiplier) or leaving.
        degraded = core.awareness.score >= core.awareness.max // 2 or core.leaving
        doc: dict[str, Any] = {"status": "degraded" if degraded else "ok",
                               "awareness": core.awareness.score,
                               "members": counts,
                               "incarnation": core.incarnation,
                               "stats": dict(core.stats)}
        if self._parts is not None:
            cat = self._parts.catalog
            doc["catalog"] = {**cat.footprint(), "stats": dict(cat.stats)}
        if isinstance(core.seal, KeyringSeal):
            doc["encryption"] = {"keys": len(core.seal.keyring.keys),
                                 "refused": dict(core.seal.stats)}
        return doc

    def _member_json(self, name: str, now: float) -> dict[str, Any]:
        m = self.core.members[name]
        return {"name": m.name, "addr": format_address(m.addr),
                "status": Status.NAMES[m.status], "incarnation": m.incarnation,
                "tags": dict(m.meta),
                "rtt_ms": None if m.rtt is None else round(m.rtt * 1000, 3),
                "since": round(max(0.0, now - m.since), 3),
                # Whose key its word is checked against (None: unsigned, version 1).
                "key_id": None if m.cred is None else m.cred.key_id,
                "credential": None if m.cred is None else m.cred.kind}

    # ---- effect execution ------------------------------------------------------------------

    def _kick(self) -> None:
        """Inputs arrived outside a task that flushes: let the timer task do it now."""
        if self._timer_scope is not None:
            self._timer_scope.deadline = -math.inf

    async def _flush(self) -> None:
        core = self.core
        self._executor.run(core.take_effects())
        # Datagrams wait for the socket here, in order, after the batch's other effects
        # (which only schedule or record) are done.
        outbox, self._outbox = self._outbox, []
        for e in outbox:
            try:
                await self._send_packet(e)
            except Exception as err:
                self._effect_failed(e, err)
        if self._timer_scope is not None:
            self._timer_scope.deadline = core.next_deadline()

    def _effect_failed(self, e: Effect, err: Exception) -> None:
        # One effect that cannot be carried out costs that effect only: the others of
        # the batch still run and the agent keeps serving.
        self._internal_error("effect", type(e).__name__, err)

    # The EffectHandler methods (see executor.py).

    def send_packet(self, e: SendPacket) -> None:
        self._outbox.append(e)

    def open_stream(self, e: StreamRequest) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._exchange, e)

    def member_event(self, e: MemberEvent) -> None:
        self._publish(e)

    def join_finished(self, e: JoinFinished) -> None:
        self._join_result = e
        if self._join_done is not None:
            self._join_done.set()

    def leave_finished(self, e: LeaveFinished) -> None:
        self._left.set()

    def notice(self, e: Notice) -> None:
        log.warning(e.message, extra={"event": "notice", "code": e.code, "member": e.member})

    async def _send_packet(self, e: SendPacket) -> None:
        assert self._udp is not None
        try:
            await self._udp.sendto(e.data, e.addr)
        except (OSError, ValueError, UnicodeError) as err:
            # A full buffer or unreachable host loses one datagram; SWIM tolerates it.
            # (Addresses are IP literals checked at decode; ValueError is a last line.)
            self.core.stats["send_errors"] += 1
            log.debug("send to %s failed: %s", format_address(e.addr), err)

    def _internal_error(self, where: str, what: str, err: BaseException | None = None) -> None:
        """A bug met an input: count it, log its traceback (at most once a minute per
        place, so a flood of one bad input cannot fill the log), and carry on. Called
        while handling the exception (or with it as ``err``)."""
        self.core.stats["internal_errors"] += 1
        now = trio.current_time()
        if now - self._error_logged.get(where, -math.inf) >= 60.0:
            self._error_logged[where] = now
            log.error("internal error in gossip %s (%s); the input was dropped",
                      where, what, exc_info=err or True,
                      extra={"event": "internal_error", "where": where})

    def _publish(self, e: MemberEvent) -> None:
        for ch in list(self._subscribers):
            try:
                ch.send_nowait(e)
            except trio.WouldBlock:
                self.stats_dropped_events += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(ch)

    # ---- tasks -------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        core = self.core
        while True:
            with trio.CancelScope(deadline=core.next_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            try:
                core.tick(trio.current_time())
            except Exception:
                self._internal_error("tick", "timer")
                await trio.sleep(0.05)  # never spin on a deadline that keeps failing
            await self._flush()

    async def _udp_loop(self) -> None:
        assert self._udp is not None
        core = self.core
        while True:
            data, src = await self._udp.recvfrom(MAX_PACKET)
            try:
                core.receive(trio.current_time(), (src[0], src[1]), data)
            except Exception:
                self._internal_error("receive", f"{len(data)}-byte datagram")
            await self._flush()

    async def _serve_streams(self, listeners: list[trio.SocketListener]) -> None:
        await serve_listeners(self._handle_stream, listeners, pool=self.config.fds,
                              limits=ListenerLimits(max_per_client=MAX_STREAMS_PER_HOST),
                              what="gossip")

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        timeout = self.config.gossip.stream_timeout
        peer = stream.socket.getpeername()
        source: Address = (peer[0], peer[1])
        try:
            with trio.move_on_after(timeout):
                async with self._streams:  # bounded work at once; the rest wait unread
                    await self._serve_stream(stream, source)
        except FrameRefused as e:
            with trio.move_on_after(1.0):
                await stream.send_all(e.frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            # A peer that resets costs only its own stream.
            self.core.stats["streams_failed"] += 1
            log.debug("inbound stream failed: %s", e)
        finally:
            await stream.aclose()

    async def _serve_stream(self, stream: trio.SocketStream, source: Address) -> None:
        body = await read_frame(stream, self.core, source, self._inflight)
        if body is None:
            return
        try:
            reply = self.core.handle_stream(trio.current_time(), source, body)
        except Exception:
            self._internal_error("stream", f"{len(body)}-byte frame")
            reply = None
        await self._flush()
        if reply is not None:
            await stream.send_all(reply.frame)

    async def _exchange(self, e: StreamRequest) -> None:
        reply: bytes | None = None
        pool = self.config.fds
        try:
            with trio.fail_after(max(e.timeout, 0.001)):
                if pool is not None:
                    await pool.acquire()
                try:
                    host, port = e.addr
                    stream = await trio.open_tcp_stream(host, port)
                    async with stream:
                        await stream.send_all(e.header + e.data)
                        reply = await read_frame(stream, self.core, e.addr) \
                            if e.expect_reply else b""
                finally:
                    if pool is not None:
                        pool.release()
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, FrameRefused) as err:
            log.debug("stream to %s failed: %r", format_address(e.addr), err)
            reply = None
        if self._core is not None:
            try:
                self._core.stream_reply(trio.current_time(), e.exchange, reply)
            except Exception:
                self._internal_error("stream reply", f"exchange {e.exchange}")
            await self._flush()


def _log_record(r: Record) -> None:
    """A history record (``history.py``) as a structured log line: the rare membership
    events (failed probes, suspicions, confirmations, failures, refutations, health
    changes) that an operator greps for, at INFO."""
    if log.isEnabledFor(logging.INFO):
        log.info("%s", r.describe(), extra=r.to_json())


async def _ip_address(addr: Address) -> Address:
    """``addr`` with its host as an IP literal: members gossip IP addresses only (see
    ``fields.py``), so a name given for ``--bind``/``--advertise`` is resolved once."""
    host, port = addr
    literal = ip_literal(host)
    if literal is not None:
        return (literal, port)
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=pysocket.SOCK_DGRAM)
    except OSError as e:
        raise BindError(errno.EADDRNOTAVAIL, f"cannot resolve the advertised address "
                        f"{format_address(addr)}: {e}") from e
    return (str(infos[0][4][0]), port)


__all__ = ["BindError", "FrameRefused", "JoinError", "Node", "NodeConfig", "read_frame"]
