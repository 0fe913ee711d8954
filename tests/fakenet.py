"""A tiny deterministic network for unit tests of the membership core.

It runs several bare ``Membership`` cores (a test registers the delegates it tests)
on a virtual clock over a lossless (or rule-filtered) network with fixed latency,
and carries out their effects through the agent's own ``EffectExecutor``. It is
deliberately minimal: the chaos simulator, which builds whole nodes as the agent
does, lives in ``rumor.simulations``; this file only lets unit tests state a
scenario in a few lines.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rumor.gossip.config import GossipConfig
from rumor.gossip.effects import (
    JoinFinished,
    LeaveFinished,
    MemberEvent,
    Notice,
    SendPacket,
    StreamRequest,
)
from rumor.gossip.executor import EffectExecutor
from rumor.gossip.membership import Membership
from rumor.gossip.wire import Address, Status


@dataclass
class FakeNet:
    config: GossipConfig
    seed: int = 1
    latency: float = 0.001
    now: float = 0.0
    nodes: dict[str, Membership] = field(default_factory=dict)
    by_addr: dict[Address, str] = field(default_factory=dict)
    crashed: set[str] = field(default_factory=set)
    paused: set[str] = field(default_factory=set)
    #: (src, dst) -> True to drop a datagram; streams are never dropped by it.
    drop_udp: Callable[[str, str], bool] = lambda s, d: False
    #: (src, dst) -> True to refuse a stream.
    drop_tcp: Callable[[str, str], bool] = lambda s, d: False
    events: list[tuple[float, str, MemberEvent]] = field(default_factory=list)
    notices: list[tuple[float, str, Notice]] = field(default_factory=list)
    joins: dict[str, JoinFinished] = field(default_factory=dict)
    left: set[str] = field(default_factory=set)
    _queue: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _held: dict[str, list[Callable[[], None]]] = field(default_factory=dict)
    _executors: dict[str, EffectExecutor] = field(default_factory=dict)
    _n: int = 0

    def add(self, name: str, **kw: Any) -> Membership:
        addr = (f"10.0.0.{len(self.nodes) + 1}", 7946)
        core = Membership(name, addr, self.config, random.Random(f"{self.seed}:{name}"),
                          now=self.now, **kw)
        self.nodes[name] = core
        self.by_addr[addr] = name
        self._executors[name] = EffectExecutor(_Effects(self, name))
        return core

    def cluster(self, n: int) -> list[Membership]:
        """n nodes, all joined through the first; run until everyone sees everyone."""
        cores = [self.add(f"n{i}") for i in range(n)]
        for c in cores[1:]:
            c.join(self.now, [cores[0].addr])
            self.flush(c.name)
        self.run_until(lambda: all(
            sum(1 for m in c.members.values() if m.status == Status.ALIVE) == n
            for c in cores), limit=60)
        return cores

    # ---- scheduling ----------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self._queue, (t, self._n, fn))

    def _deliver_to(self, name: str, fn: Callable[[], None]) -> None:
        if name in self.crashed:
            return
        if name in self.paused:
            self._held.setdefault(name, []).append(fn)
            return
        fn()
        self.flush(name)

    def flush(self, name: str) -> None:
        self._executors[name].run(self.nodes[name].take_effects())

    def _send(self, src: str, e: SendPacket) -> None:
        dst = self.by_addr.get(e.addr)
        if dst is None or self.drop_udp(src, dst):
            return
        src_addr = self.nodes[src].addr

        def deliver() -> None:
            self.nodes[dst].receive(self.now, src_addr, e.data)
        self.at(self.now + self.latency, lambda: self._deliver_to(dst, deliver))

    def _stream(self, src: str, e: StreamRequest) -> None:
        dst = self.by_addr.get(e.addr)
        src_addr = self.nodes[src].addr

        def reply(body: bytes | None, delay: float) -> None:
            def done() -> None:
                self.nodes[src].stream_reply(self.now, e.exchange, body)
            self.at(self.now + delay, lambda: self._deliver_to(src, done))

        if dst is None or dst in self.crashed or self.drop_tcp(src, dst):
            reply(None, self.latency)
            return
        if dst in self.paused:
            reply(None, e.timeout)
            return

        def serve() -> None:
            if dst in self.crashed or dst in self.paused:
                reply(None, e.timeout)
                return
            r = self.nodes[dst].handle_stream(self.now, src_addr, e.data)
            self.flush(dst)
            body = None if r is None else r.body
            reply(body if e.expect_reply else b"", self.latency)
        self.at(self.now + self.latency, serve)

    # ---- running ------------------------------------------------------------------

    def step(self) -> bool:
        t_queue = self._queue[0][0] if self._queue else float("inf")
        t_node, who = float("inf"), None
        for name, c in self.nodes.items():
            if name in self.crashed or name in self.paused:
                continue
            d = c.next_deadline()
            if d < t_node:
                t_node, who = d, name
        if t_queue == t_node == float("inf"):
            return False
        if t_queue <= t_node:
            t, _, fn = heapq.heappop(self._queue)
            self.now = max(self.now, t)
            fn()
        else:
            assert who is not None
            self.now = max(self.now, t_node)
            self.nodes[who].tick(self.now)
            self.flush(who)
        return True

    def run(self, duration: float) -> None:
        end = self.now + duration
        while True:
            t_queue = self._queue[0][0] if self._queue else float("inf")
            t_node = min((c.next_deadline() for n, c in self.nodes.items()
                          if n not in self.crashed and n not in self.paused),
                         default=float("inf"))
            if min(t_queue, t_node) > end:
                self.now = end
                return
            self.step()

    def run_until(self, cond: Callable[[], bool], limit: float) -> float:
        """Run until ``cond()`` holds; returns the virtual time it took."""
        start = self.now
        while not cond():
            if self.now - start > limit or not self.step():
                raise AssertionError(f"condition not reached within {limit} s")
        return self.now - start

    # ---- faults --------------------------------------------------------------------

    def crash(self, name: str) -> None:
        self.crashed.add(name)

    def pause(self, name: str) -> None:
        self.paused.add(name)

    def resume(self, name: str) -> None:
        self.paused.discard(name)
        for fn in self._held.pop(name, []):
            fn()
        self.flush(name)

    def status(self, observer: str, subject: str) -> str | None:
        m = self.nodes[observer].members.get(subject)
        return None if m is None else Status.NAMES[m.status]

    def live_names(self) -> list[str]:
        return [n for n in self.nodes if n not in self.crashed]


class _Effects:
    """FakeNet's ``EffectHandler`` for one node."""

    def __init__(self, net: FakeNet, name: str) -> None:
        self.net = net
        self.name = name

    def send_packet(self, e: SendPacket) -> None:
        self.net._send(self.name, e)

    def open_stream(self, e: StreamRequest) -> None:
        self.net._stream(self.name, e)

    def member_event(self, e: MemberEvent) -> None:
        self.net.events.append((self.net.now, self.name, e))

    def notice(self, e: Notice) -> None:
        self.net.notices.append((self.net.now, self.name, e))

    def join_finished(self, e: JoinFinished) -> None:
        self.net.joins[self.name] = e

    def leave_finished(self, e: LeaveFinished) -> None:
        self.net.left.add(self.name)

