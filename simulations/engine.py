"""The discrete-event engine: real nodes on a virtual clock.

Each simulated node is built by the agent's own assembly (``gossip/assembly.py``: the
core with the catalog and any extra delegates, such as policy replication) and its
effects are carried out through the same ``EffectExecutor``; only the clock and the
network are the simulator's.

One heap holds every future event (datagram arrivals, stream steps, node timers,
scheduled faults), ordered by (time, sequence number) so ties break the same way in
every run. Node timers are entries in that heap with lazy invalidation: after every
input a node's ``next_deadline()`` is read and, if it moved, a new timer entry is
pushed; entries that no longer match the node's current deadline are skipped when
popped. Nothing is ever O(n) per event, which is what makes 10,000 nodes possible.

The engine carries out the cores' effects as the trio runtime does: datagrams
through the network model, stream exchanges as request/reply with latency (or a
timeout when partitioned, a refusal when the peer is down), member events to the
metrics listener. Randomness: one ``random.Random`` for the network and one per
node life (plus one for its command ids), all derived from the seed.

Streams under loss. While the network loses anything (and ``reliable_streams`` is
off) every exchange goes through the TCP model of ``network.py``: handshake with SYN
and SYN-ACK retransmissions, request and reply segments with RTO retransmissions.
No segment is an event: the request's arrival is computed when the exchange opens
(handshake plus the request's worst segment repair) and the reply's when the server
answers (its size is known only then), so an exchange costs the same two heap
entries as a reliable one, plus its timeout. The core's stream timeout is the
exchange's deadline as before: an exchange that loss delays past it times out, as
``trio.fail_after`` ends it in the agent. Partitions: an exchange opened across one
is black-holed (both modes); under the TCP model a partition that began meanwhile is
checked again where the model has events, when the request arrives and when the reply
arrives (a partition that starts and heals between the two is not seen, and one that
heals mid-exchange does not un-blackhole it, as TCP's retransmissions would). The
server gives up reading a request that takes longer than its ``stream_timeout`` after
the handshake (the shell's ``move_on_after``). Counters: ``stream_syn_retransmits``
(SYN, SYN-ACK and refused-SYN copies), ``stream_retransmits`` (data segments),
``streams_failed_loss`` (exchanges that failed while the model had pushed them past
their deadline or the connection never came up); ``stream_bytes_out`` stays payload.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import heapq
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from nacl.signing import SigningKey

from ..gossip.assembly import DelegateFactory, NodeParts, NodeSpec, assemble
from ..gossip.config import GossipConfig
from ..gossip.effects import (
    JoinFinished,
    LeaveFinished,
    MemberEvent,
    Notice,
    SendPacket,
    StreamRequest,
)
from ..gossip.executor import EffectExecutor
from ..gossip.identity import Identity
from ..gossip.membership import Membership
from ..gossip.node_key import Ed25519Authority, NodeKey, sign_ed25519_credential
from ..gossip.wire import Address, Meta
from .network import CONNECT_GIVES_UP, Network, tcp_handshake, tcp_refusal, tcp_transfer

INF = math.inf
#: The calendar time the virtual clock's 0 stands for (catalog epochs, policy expiry).
CALENDAR_AT_ZERO = 1_800_000_000.0

# Event kinds (small ints: the heap compares tuples, and dispatch is a list index).
_PACKET, _TIMER, _SERVE, _REPLY, _TIMEOUT, _CALL = range(6)

MemberListener = Callable[[float, int, MemberEvent], None]


class SimIdentities:
    """Node keys and credentials for a simulated cluster, derived from the seed: a
    restarted node keeps its key (as its data dir would), and each credential is
    signed once per run by an authority key of the seed's own."""

    CLUSTER = "sim"

    def __init__(self, seed: int, mode: str) -> None:
        self.mode = mode
        self.seed = seed
        self._signer = SigningKey(hashlib.blake2b(f"authority:{seed}".encode(),
                                                  digest_size=32).digest())
        self.authority = Ed25519Authority.of(self.CLUSTER, [bytes(self._signer.verify_key)])
        self._keys: dict[str, tuple[NodeKey, bytes]] = {}

    def of(self, name: str) -> Identity | None:
        if self.mode == "off":
            return None
        got = self._keys.get(name)
        if got is None:
            key = NodeKey.from_seed(f"{self.seed}:{name}".encode())
            cred = sign_ed25519_credential([self._signer], self.CLUSTER, name, key.public, 1)
            got = self._keys[name] = (key, cred)
        return Identity(mode=self.mode, key=got[0], credential=got[1],
                        authority=self.authority)


class SimNode:
    """One simulated host: its current parts and what the network sees of it."""

    __slots__ = ("addr", "bytes_in", "bytes_out", "core", "deaf", "executor", "held",
                 "held_packets", "idx", "join_result", "left", "life", "meta", "name",
                 "packets_in", "packets_out", "parts", "paused", "stream_bytes_out",
                 "streams_out", "timer_at", "up")

    def __init__(self, idx: int, name: str, addr: Address, parts: NodeParts,
                 meta: Meta | None) -> None:
        self.idx = idx
        self.name = name
        self.addr = addr
        self.meta = meta
        self.parts = parts
        #: ``parts.core``, kept as a slot: the event handlers read it millions of times.
        self.core: Membership = parts.core
        #: Set by the simulator (it carries out this node's effects).
        self.executor: EffectExecutor | None = None
        self.up = True
        self.paused = False
        #: Input handling stalled while timers run (a starved message handler).
        self.deaf = False
        #: Inputs that arrived while paused, replayed in order on resume.
        self.held: list[tuple[Any, ...]] = []
        self.held_packets = 0
        #: The deadline the newest timer entry in the heap was pushed for.
        self.timer_at = INF
        #: Bumped on crash and restart, so timers and replies of a former life are void.
        self.life = 0
        self.join_result: JoinFinished | None = None
        self.left = False
        self.packets_out = self.bytes_out = self.packets_in = self.bytes_in = 0
        self.streams_out = self.stream_bytes_out = 0


class _Call:
    """A stream exchange in flight; ``done`` once the reply or the timeout won.

    Under the TCP model (``tcp``) it also carries its deadline, the RTT its RTOs
    derive from, and ``late``: loss pushed it past the deadline (or its connection
    never came up), so a failure is the loss's."""

    __slots__ = ("data", "deadline", "done", "dst", "exchange", "expect_reply", "landed",
                 "late", "life", "rtt", "src", "tcp")

    def __init__(self, src: int, life: int, dst: int, e: StreamRequest,
                 deadline: float) -> None:
        self.src = src
        self.life = life
        self.dst = dst
        self.exchange = e.exchange
        self.data = e.data
        self.expect_reply = e.expect_reply
        self.done = False
        self.deadline = deadline
        self.tcp = False
        self.late = False
        self.rtt = 0.0
        #: 1 once the request, 2 once the reply got past the partition check at its
        #: arrival (a held event replayed on resume was already in the kernel).
        self.landed = 0

    def arrives(self, at: float, extra: float) -> float:
        """Note whether loss (``extra`` of the time ``at``) made it miss its deadline."""
        if at > self.deadline >= at - extra:
            self.late = True
        return at


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Suspend the cyclic garbage collector: millions of long-lived member records
    make every full collection rescan them all (about a third of the run time at
    1,000 nodes), and the cores build almost no reference cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            # What was allocated meanwhile is still "young": the next collections would
            # walk all of it (10^8 member records at 10,000 nodes). Promote it to the
            # oldest generation unvisited instead (freeze, then unfreeze into it).
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def node_address(i: int) -> Address:
    n = i + 1
    return (f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}", 7946)


class Simulator:
    """Nodes, the event heap and the fault primitives (crash, restart, pause, resume)."""

    #: Datagrams a paused node's socket buffer holds (about 200 KiB of small packets);
    #: the rest are dropped by the kernel, as for a real stopped process.
    RECV_BUFFER_PACKETS = 256

    def __init__(self, config: GossipConfig, network: Network, seed: int = 1,
                 extras: Sequence[DelegateFactory] = (), node_identity: str = "off") -> None:
        self.config = config
        self.network = network
        self.seed = seed
        #: Signed membership (``gossip/identity.py``): every node's key and credential
        #: derive from the seed, as if each had its data dir and the CA had signed it.
        self.identities = SimIdentities(seed, node_identity)
        #: Further delegates of every node (``NodeSpec.extras``), as an agent's options.
        self.extras = tuple(extras)
        self.rng = random.Random(f"net:{seed}")
        self.now = 0.0
        self.nodes: list[SimNode] = []
        self.by_addr: dict[Address, int] = {}
        self.by_name: dict[str, int] = {}
        self.on_member: MemberListener | None = None
        self.on_join: Callable[[float, int, JoinFinished], None] | None = None
        self.events = 0
        self.counters: Counter[str] = Counter()
        self._heap: list[tuple[Any, ...]] = []
        self._seq = 0
        self._handlers: list[Callable[[tuple[Any, ...]], None]] = [
            self._on_packet, self._on_timer, self._on_serve, self._on_reply,
            self._on_timeout, self._on_call]

    # ---- building the cluster -----------------------------------------------------------

    def add_node(self, name: str | None = None, meta: Meta | None = None) -> int:
        idx = len(self.nodes)
        name = name or f"n{idx}"
        addr = node_address(idx)
        node = SimNode(idx, name, addr, self._assemble(name, addr, 0, meta), meta)
        node.executor = EffectExecutor(_SimEffects(self, node))
        self.nodes.append(node)
        self.by_addr[addr] = idx
        self.by_name[name] = idx
        self._reschedule(node)
        return idx

    def _assemble(self, name: str, addr: Address, life: int, meta: Meta | None) -> NodeParts:
        """A node as an agent builds it (``gossip/assembly.py``), on the virtual clock."""
        rng = random.Random(f"{self.seed}:{name}:{life}")
        ids = random.Random(f"{self.seed}:{name}:{life}:ids")
        spec = NodeSpec(name, addr, self.config, meta=dict(meta or {}),
                        wall_offset=CALENDAR_AT_ZERO, extras=self.extras,
                        identity=self.identities.of(name))
        return assemble(spec, self.now, rng, new_id=lambda: f"{ids.getrandbits(64):016x}")

    def join(self, idx: int, seeds: list[int]) -> None:
        node = self.nodes[idx]
        node.core.join(self.now, [self.nodes[s].addr for s in seeds])
        self._after(node)

    # ---- scheduling ---------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: Any, b: Any = None, c: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b, c))

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at virtual time ``t`` (faults, measurements)."""
        self._push(max(t, self.now), _CALL, fn)

    def run_until(self, t_end: float, progress: Callable[[float], None] | None = None) -> None:
        """Process every event up to ``t_end``; the clock then reads ``t_end``."""
        heap, pop, handlers = self._heap, heapq.heappop, self._handlers
        n = 0
        with gc_paused():
            while heap and heap[0][0] <= t_end:
                ev = pop(heap)
                self.now = ev[0]
                handlers[ev[2]](ev)
                n += 1
                if progress is not None and not n & 0x3FFF:
                    progress(self.now)
        self.events += n
        self.now = max(self.now, t_end)

    def run_while(self, cond: Callable[[], bool], limit: float, step: float = 0.05) -> float:
        """Run in ``step`` slices while ``cond()`` holds, at most ``limit`` seconds;
        returns the virtual time spent."""
        start = self.now
        while cond() and self.now - start < limit:
            self.run_until(self.now + step)
        return self.now - start

    # ---- effects --------------------------------------------------------------------------

    def drive(self, idx: int, fn: Callable[[Membership], object]) -> None:
        """Call ``fn(core)`` on node ``idx`` now and carry out what it asked for: how a
        scenario acts through a delegate (e.g. publishes a policy) as a shell would."""
        node = self.nodes[idx]
        fn(node.core)
        self._after(node)

    def _after(self, node: SimNode) -> None:
        """Carry out what the core asked for, then file its next timer."""
        effects = node.core.take_effects()
        if effects:
            assert node.executor is not None
            node.executor.run(effects)
        self._reschedule(node)

    def _reschedule(self, node: SimNode) -> None:
        d = node.core.next_deadline()
        if d != node.timer_at:
            node.timer_at = d
            if d < INF:
                self._push(d if d > self.now else self.now, _TIMER, node.idx, d, node.life)

    def _send(self, node: SimNode, e: SendPacket) -> None:
        size = len(e.data)
        node.packets_out += 1
        node.bytes_out += size
        dst = self.by_addr.get(e.addr)
        if dst is None:
            self.counters["packets_unroutable"] += 1
            return
        delay = self.network.datagram(self.rng, node.idx, dst)
        if delay is None:
            self.counters["packets_lost"] += 1
            return
        self._push(self.now + delay, _PACKET, dst, node.idx, e.data)

    def _stream(self, node: SimNode, e: StreamRequest) -> None:
        node.streams_out += 1
        node.stream_bytes_out += len(e.data)
        dst = self.by_addr.get(e.addr)
        call = _Call(node.idx, node.life, -1 if dst is None else dst, e,
                     self.now + e.timeout)
        self._push(self.now + e.timeout, _TIMEOUT, call)
        if dst is None:
            return  # nobody at that address: the SYN goes unanswered
        net, rng = self.network, self.rng
        if net.partitions and (net.blocked(node.idx, dst) or net.blocked(dst, node.idx)):
            self.counters["streams_blackholed"] += 1
            return
        # Handshake plus the frame: three one-way trips before the peer reads it.
        there = net.delay(rng, node.idx, dst)
        back = net.delay(rng, dst, node.idx)
        if net.tcp_streams():
            self._stream_tcp(call, e, there, back)
            return
        if not self.nodes[dst].up:
            self._push(self.now + there + back, _REPLY, call, None)  # refused (RST)
            return
        self._push(self.now + 2 * there + back, _SERVE, call)

    def _stream_tcp(self, call: _Call, e: StreamRequest, there: float,
                    back: float) -> None:
        """Open ``call`` under the TCP model (``network.py``): when, if ever, the
        request reaches the server, or the refusal the client."""
        net, rng = self.network, self.rng
        src, dst = call.src, call.dst
        p_fwd, p_back = net.loss_rate(src, dst), net.loss_rate(dst, src)
        call.tcp = True
        call.rtt = there + back
        if not self.nodes[dst].up:
            ref = tcp_refusal(rng, p_fwd, p_back)
            self._count("stream_syn_retransmits", ref.retransmits)
            if ref.extra is None:
                self._connect_failed(call)
            else:
                self._push(call.arrives(self.now + ref.extra + there + back, ref.extra),
                           _REPLY, call, None)
            return
        hs = tcp_handshake(rng, p_fwd, p_back, budget=e.timeout)
        self._count("stream_syn_retransmits", hs.retransmits)
        if hs.extra is None:
            self._connect_failed(call)
            return
        req = tcp_transfer(rng, len(e.header) + len(e.data), p_fwd, call.rtt)
        self._count("stream_retransmits", req.retransmits)
        if req.extra is None or req.extra > self.config.stream_timeout:
            # Aborted, or the server's read gave up first: the request is never served.
            call.late = True
            return
        extra = hs.extra + req.extra
        self._push(call.arrives(self.now + 2 * there + back + extra, extra), _SERVE, call)

    def _count(self, name: str, k: int) -> None:
        if k:  # no key for nothing: a loss-free run's counters stay as they were
            self.counters[name] += k

    def _connect_failed(self, call: _Call) -> None:
        """Every SYN (or SYN-ACK) copy lost: ``connect`` reports ETIMEDOUT at 127 s,
        unless the core's deadline came first (it always does in the profiles)."""
        call.late = True
        self._push(self.now + CONNECT_GIVES_UP, _REPLY, call, None)

    # ---- event handlers ---------------------------------------------------------------------

    def _on_packet(self, ev: tuple[Any, ...]) -> None:
        node = self.nodes[ev[3]]
        if not node.up:
            self.counters["packets_to_down"] += 1
            return
        if node.paused or node.deaf:
            if node.held_packets >= self.RECV_BUFFER_PACKETS:
                self.counters["packets_overflow"] += 1
                return
            node.held_packets += 1
            node.held.append(ev)
            return
        data: bytes = ev[5]
        node.packets_in += 1
        node.bytes_in += len(data)
        node.core.receive(self.now, self.nodes[ev[4]].addr, data)
        self._after(node)

    def _on_timer(self, ev: tuple[Any, ...]) -> None:
        node = self.nodes[ev[3]]
        if node.timer_at != ev[4] or node.life != ev[5] or not node.up or node.paused:
            return  # superseded, a former life, or frozen (rescheduled on resume)
        node.timer_at = INF
        node.core.tick(self.now)
        self._after(node)

    def _on_serve(self, ev: tuple[Any, ...]) -> None:
        call: _Call = ev[3]
        node = self.nodes[call.dst]
        net = self.network
        if call.tcp and call.landed < 1:
            if net.partitions and net.blocked(call.src, call.dst):
                return  # a partition began while the request was on its way
            call.landed = 1
        if not node.up:
            self._push(self.now + net.delay(self.rng, call.dst, call.src), _REPLY, call, None)
            return
        if node.paused or node.deaf:
            node.held.append(ev)  # the kernel accepted; the process will read it later
            return
        served = node.core.handle_stream(self.now, self.nodes[call.src].addr, call.data)
        reply = None if served is None else served.body
        self._after(node)
        if net.partitions and net.blocked(call.dst, call.src):
            return  # the reply is black-holed: the requester times out
        if not call.expect_reply:
            reply = b""
        elif reply is not None:
            node.stream_bytes_out += len(reply)
        # A server with nothing to say closes the stream: the requester reads EOF (None).
        at = self.now + net.delay(self.rng, call.dst, call.src)
        if call.tcp and call.expect_reply:
            # The reply frame (or the FIN of a server with nothing to say) under loss;
            # a one-way request's "reply" is the ACK, never lost in the model.
            size = 0 if served is None else len(served.header) + len(served.body)
            rep = tcp_transfer(self.rng, size, net.loss_rate(call.dst, call.src), call.rtt)
            self._count("stream_retransmits", rep.retransmits)
            if rep.extra is None:
                call.late = True
                return
            at = call.arrives(at + rep.extra, rep.extra)
        self._push(at, _REPLY, call, reply)

    def _on_reply(self, ev: tuple[Any, ...]) -> None:
        call: _Call = ev[3]
        net = self.network
        if call.tcp and call.landed < 2 and not call.done:
            if net.partitions and net.blocked(call.dst, call.src):
                return  # a partition began while the reply was on its way
            call.landed = 2
        self._finish_call(ev, call, ev[4])

    def _on_timeout(self, ev: tuple[Any, ...]) -> None:
        self._finish_call(ev, ev[3], None)

    def _finish_call(self, ev: tuple[Any, ...], call: _Call, reply: bytes | None) -> None:
        if call.done:
            return
        node = self.nodes[call.src]
        if node.life != call.life or not node.up:
            call.done = True
            return
        if node.paused or node.deaf:
            node.held.append(ev)
            return
        call.done = True
        if reply is None and call.late:
            self.counters["streams_failed_loss"] += 1
        node.core.stream_reply(self.now, call.exchange, reply)
        self._after(node)

    def _on_call(self, ev: tuple[Any, ...]) -> None:
        ev[3]()

    # ---- faults -------------------------------------------------------------------------------

    def crash(self, idx: int) -> None:
        """The process dies: nothing more is processed, its address refuses streams."""
        node = self.nodes[idx]
        node.up = False
        node.paused = node.deaf = False
        node.held.clear()
        node.held_packets = 0
        node.life += 1
        node.timer_at = INF

    def restart(self, idx: int, seeds: list[int]) -> None:
        """Same name and address, fresh state, joining through ``seeds``."""
        node = self.nodes[idx]
        if node.up:
            self.crash(idx)
        node.life += 1
        node.parts = self._assemble(node.name, node.addr, node.life, node.meta)
        node.core = node.parts.core
        node.up = True
        node.join_result = None
        node.left = False
        node.timer_at = INF
        self.counters["restarts"] += 1
        if seeds:
            self.join(idx, seeds)
        else:
            self._reschedule(node)

    def pause(self, idx: int) -> None:
        """SIGSTOP: the node processes nothing; its inbound traffic waits in the kernel."""
        node = self.nodes[idx]
        if node.up:
            node.paused = True

    def stall(self, idx: int) -> None:
        """The node's message handling stalls while its timers keep firing (a CPU-starved
        or blocked receive path, Lifeguard's slow member): its probes time out because
        it cannot read the acks, and it cannot hear that it is suspected."""
        node = self.nodes[idx]
        if node.up:
            node.deaf = True

    def resume(self, idx: int) -> None:
        """SIGCONT (or the end of a stall): queued input is handled now. After a full
        pause trio runs the timer task and the socket tasks in an unspecified order; a
        coin from the seed decides which goes first."""
        node = self.nodes[idx]
        if not node.up or not (node.paused or node.deaf):
            return
        stopped = node.paused
        node.paused = node.deaf = False
        held, node.held, node.held_packets = node.held, [], 0
        if stopped and self.rng.random() < 0.5 and node.core.next_deadline() <= self.now:
            node.core.tick(self.now)
            self._after(node)
        for i, ev in enumerate(held):
            if node.paused or node.deaf or not node.up:
                # A fault handler stopped or crashed it again: keep the rest queued.
                if node.up:
                    node.held.extend(held[i:])
                break
            self._handlers[ev[2]](ev)
        node.timer_at = math.nan  # never equal: forces a fresh timer entry
        self._reschedule(node)

    def leave(self, idx: int) -> None:
        node = self.nodes[idx]
        node.core.leave(self.now)
        self._after(node)

    # ---- queries ---------------------------------------------------------------------------------

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up]


class _SimEffects:
    """The simulator's ``EffectHandler`` for one node (see ``gossip/executor.py``)."""

    __slots__ = ("node", "sim")

    def __init__(self, sim: Simulator, node: SimNode) -> None:
        self.sim = sim
        self.node = node

    def send_packet(self, e: SendPacket) -> None:
        self.sim._send(self.node, e)

    def open_stream(self, e: StreamRequest) -> None:
        self.sim._stream(self.node, e)

    def member_event(self, e: MemberEvent) -> None:
        sim = self.sim
        if sim.on_member is not None:
            sim.on_member(sim.now, self.node.idx, e)

    def join_finished(self, e: JoinFinished) -> None:
        self.node.join_result = e
        if self.sim.on_join is not None:
            self.sim.on_join(self.sim.now, self.node.idx, e)

    def leave_finished(self, e: LeaveFinished) -> None:
        self.node.left = True

    def notice(self, e: Notice) -> None:
        self.sim.counters[f"notice_{e.code}"] += 1
