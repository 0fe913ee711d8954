"""The SWIM + Lifeguard membership state machine (sans-IO).

``Membership`` holds one node's view of the cluster and advances it only through its
inputs:

* ``receive(now, source, datagram)`` – a UDP datagram arrived;
* ``handle_stream(now, source, frame_body)`` – a peer opened a stream (push-pull, TCP
  ping, large broadcast); returns the reply frame body or None;
* ``stream_reply(now, exchange, reply)`` – a stream exchange we asked for finished;
* ``tick(now)`` – time passed; call it at ``next_deadline()``;
* commands: ``join``, ``leave``, ``set_meta``, ``broadcast``.

Outputs are effects (``take_effects()``): datagrams and stream exchanges to carry
out, membership events, join/leave completion. Time comes only from ``now`` and
randomness only from the injected ``random.Random``, so the trio runtime and the
simulator drive exactly this code, and a simulation replays from its seed.

The protocol follows memberlist (probe, indirect probe, suspicion, refutation,
piggybacked and periodic gossip, push-pull) with Lifeguard's three additions: local
health scaling the probe window, suspicion timeouts that shrink with independent
confirmations, and the buddy system (a suspect hears of its suspicion in the very
probe that tests it, so it can refute at once).
"""

from __future__ import annotations

import math
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field

from .awareness import Awareness
from .config import GossipConfig
from .delegate import Delegate
from .effects import (
    Effect,
    JoinFinished,
    LeaveFinished,
    MemberEvent,
    Notice,
    SendPacket,
    StreamReply,
    StreamRequest,
)
from .fields import MAX_COUNTER, MAX_INCARNATION_JUMP, valid_text
from .members import Member
from .queue import BroadcastQueue
from .security import (
    FrameStep,
    Plaintext,
    Refuse,
    Seal,
    SealError,
    refusal_reason,
    refusal_reply,
)
from .suspicion import Suspicion
from .wire import (
    EMPTY_META,
    MAX_META_ENTRIES,
    MAX_META_TEXT,
    PACKET_OVERHEAD,
    Ack,
    Address,
    Alive,
    Dead,
    DecodeError,
    IndirectPing,
    Message,
    Meta,
    Nack,
    Ping,
    PushPull,
    Status,
    Suspect,
    UserMessage,
    decode_frame_body,
    decode_packet,
    encode_packet,
    encode_packet_raw,
    encode_push_pull,
    own_meta,
    pack_message,
)

INF = math.inf
#: Indirect probes we perform for others at once (each lasts one probe timeout).
MAX_RELAYS = 1024


@dataclass(slots=True)
class _Probe:
    """The probe in flight (at most one per node, as in SWIM)."""

    seq: int
    target: str
    sent: float
    #: End of the direct phase: no ack by then means indirect probes + TCP ping.
    direct_deadline: float
    #: End of the whole probe (probe interval scaled by local health).
    deadline: float
    indirect: bool = False
    acked: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    tcp_exchange: int | None = None
    tcp_ok: bool = False


@dataclass(slots=True)
class _Relay:
    """An indirect probe we perform for someone else."""

    requester: Address
    requester_name: str
    seq: int
    want_nack: bool
    deadline: float


@dataclass(slots=True)
class _Join:
    seeds: list[Address]
    attempt: int = 0
    pending: set[int] = field(default_factory=set)
    contacted: int = 0
    errors: list[str] = field(default_factory=list)
    retry_at: float = INF


class Membership:
    """One node's SWIM/Lifeguard state machine. See the module docstring."""

    def __init__(self, name: str, addr: Address, config: GossipConfig, rng: random.Random,
                 *, meta: Meta | None = None, seal: Seal | None = None,
                 now: float = 0.0) -> None:
        self.name = name
        self.addr = addr
        self.config = config
        self.rng = rng
        self.seal: Seal = seal or Plaintext()
        self.awareness = Awareness(config.awareness_max_multiplier if config.lifeguard else 1)
        self.stats: Counter[str] = Counter()
        self.members: dict[str, Member] = {}
        self.incarnation = 1
        self.leaving = False
        self._quiet = False  # merge_state(quiet=True) in progress: queue nothing
        self._check_meta(meta or {})
        self.members[name] = Member(name, addr, self.incarnation, Status.ALIVE, now,
                                    own_meta(meta or {}))
        #: Member names in an indexable list, for O(k) random sampling.
        self._roster: list[str] = [name]
        #: Names of the members that are failed or left, so that counting the live
        #: ones and the periodic reconnect and reap need not scan every member.
        self._down: set[str] = set()

        self._effects: list[Effect] = []
        self._member_q = BroadcastQueue()
        self._user_q = BroadcastQueue()
        self._delegates: dict[str, Delegate] = {}
        self._seq = rng.randrange(1 << 31)
        self._exchange = 0
        self._exchanges: dict[int, str] = {}  # id -> kind
        self._refused: set[str] = set()  # hosts whose gossip we refused (noticed once)
        #: Per source host: (tokens, last refill) of its budget of new member names.
        self._new_names: dict[str, tuple[float, float]] = {}
        self._exchange_peer: dict[int, str] = {}

        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._join: _Join | None = None
        self._leave_deadline = INF

        # Stagger periodic work so a cluster started at once does not beat in step.
        self._probe_at = now + rng.uniform(0, config.probe_interval)
        self._gossip_at = now + rng.uniform(0, config.gossip_interval)
        self._push_pull_at = now + rng.uniform(0.5, 1.5) * config.push_pull_interval
        self._reconnect_at = now + config.reconnect_interval

    # ---- driver interface ----------------------------------------------------------

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    def next_deadline(self) -> float:
        """When ``tick`` must next be called (absolute, on the caller's clock)."""
        if self.leaving:
            if self._leave_deadline == -INF:
                return INF
            return min(self._leave_deadline, self._gossip_at)
        d = min(self._probe_at, self._push_pull_at, self._reconnect_at)
        if self._member_q or self._user_q:
            d = min(d, self._gossip_at)
        p = self._probe
        if p is not None:
            d = min(d, p.deadline if p.indirect or p.acked else p.direct_deadline)
        for r in self._relays.values():
            d = min(d, r.deadline)
        for s in self._suspicions.values():
            d = min(d, s.deadline())
        if self._join is not None:
            d = min(d, self._join.retry_at)
        return d

    def tick(self, now: float) -> None:
        if self.leaving:
            # Only the leave announcement still goes out; finish once it has been
            # sent its full retransmit count or the grace period is over.
            if now >= self._gossip_at and self._member_q:
                self._gossip(now)
                self._gossip_at = now + self.config.gossip_interval
            if now >= self._leave_deadline or not self._member_q.contains(self.name):
                self._finish_leave()
            return
        self._expire_relays(now)
        self._advance_probe(now)
        if now >= self._probe_at:
            self._start_probe(now)
        if now >= self._gossip_at and (self._member_q or self._user_q):
            self._gossip(now)
            self._gossip_at = now + self.config.gossip_interval
        self._expire_suspicions(now)
        if now >= self._push_pull_at:
            self._periodic_push_pull(now)
        if now >= self._reconnect_at:
            self._reconnect_at = now + self.config.reconnect_interval
            self._reconnect(now)
            self._reap(now)
        if self._join is not None and now >= self._join.retry_at:
            self._join_round(now)

    def receive(self, now: float, source: Address, data: bytes) -> None:
        """A datagram arrived from ``source``."""
        self.stats["packets_in"] += 1
        self.stats["bytes_in"] += len(data)
        try:
            messages = decode_packet(self.seal.open(now, data, self.name))
        except SealError:
            self.stats["packets_unauthenticated"] += 1
            return
        except DecodeError:
            self.stats["packets_malformed"] += 1
            return
        members = self.members
        probes = 0
        for m in messages:
            t = type(m)
            if t is Alive and not self.leaving:
                assert isinstance(m, Alive)
                # Most of a join storm: news we already have, dropped here exactly as
                # _on_alive would drop it.
                known = members.get(m.node)
                if known is not None:
                    if m.incarnation <= known.incarnation and m.node != self.name:
                        continue
                elif not self._may_learn(now, source[0]):
                    continue
                self._on_alive(now, m)
                continue
            if t is Ping or t is IndirectPing:
                # One probe answered per datagram: an honest packet carries one, and each
                # answer is a packet we send (to an address the sender may have chosen).
                probes += 1
                if probes > 1:
                    self.stats["probes_dropped_extra"] += 1
                    continue
            self._dispatch(now, source, m)

    def frame_length(self, now: float, source: Address, header: bytes) -> FrameStep:
        """A stream's frame header (or its first ``FRAME_HEADER.size`` bytes) arrived:
        read more header, read a body of some length, or refuse. The driver asks this
        before buffering anything, so an encrypted agent reads at most a small frame
        from a stream that has not authenticated."""
        step = self.seal.read_frame_header(now, header, self.name)
        if isinstance(step, Refuse):
            self.stats["streams_unauthenticated"] += 1
            self._notice_refused(source, step.reason)
        return step

    def handle_stream(self, now: float, source: Address, body: bytes) -> StreamReply | None:
        """A peer sent one frame on a stream; returns the reply frame, if any."""
        self.stats["streams_in"] += 1
        try:
            plain, addressed = self.seal.open_stream(now, body, self.name)
            msg = decode_frame_body(plain)
        except SealError as e:
            # Say why, so that a misconfigured joiner fails with a reason, not a silence;
            # and tell our operator once per address.
            self.stats["streams_unauthenticated"] += 1
            self._notice_refused(source, str(e))
            return refusal_reply(str(e))
        except DecodeError:
            self.stats["streams_malformed"] += 1
            return None
        if not addressed and not (isinstance(msg, PushPull) and msg.join):
            # Only a joiner may not know our name; anything else sealed for nobody in
            # particular could be a recording of another agent's traffic.
            self.stats["streams_unaddressed"] += 1
            return None
        if isinstance(msg, PushPull):
            reply = self._push_pull_body(msg.join)  # our state before the merge
            self._merge(now, msg)
            return self._frame(now, reply, msg.source)
        if isinstance(msg, Ping):
            if msg.target != self.name:
                self.stats["pings_misdirected"] += 1
                return None
            return self._frame(now, encode_packet([Ack(msg.seq)]), msg.source)
        if isinstance(msg, UserMessage):
            self._deliver_user(now, msg)
            return None
        # Anything else arriving on a stream is treated as gossip.
        self._dispatch(now, source, msg)
        return None

    def stream_reply(self, now: float, exchange: int, reply: bytes | None) -> None:
        """Outcome of a ``StreamRequest``: the reply frame's body, ``b""`` for a one-way
        success, or None if the exchange failed (refused, timed out, reset)."""
        kind = self._exchanges.pop(exchange, None)
        peer = self._exchange_peer.pop(exchange, "")
        if kind is None:
            return
        msg: Message | None = None
        why = "no answer"
        if reply:
            refused = refusal_reason(reply)
            try:
                if refused is not None:
                    raise SealError(f"refused our gossip: {refused}")
                msg = decode_frame_body(self.seal.open(now, reply, self.name))
            except SealError as e:
                self.stats["streams_unauthenticated"] += 1
                why = str(e)
            except DecodeError as e:
                self.stats["streams_malformed"] += 1
                why = f"malformed answer: {e}"
        if kind in ("join", "push_pull", "reconnect"):
            ok = isinstance(msg, PushPull)
            if ok:
                assert isinstance(msg, PushPull)
                self._merge(now, msg)
            else:
                self.stats[f"{kind}_failed"] += 1
            if kind == "join":
                self._join_answer(now, exchange, ok, peer, why)
        elif kind == "tcp_ping":
            p = self._probe
            if p is not None and p.tcp_exchange == exchange and isinstance(msg, Ack):
                p.tcp_ok = True
        elif kind == "user" and reply is None:
            self.stats["user_stream_failed"] += 1

    # ---- commands -------------------------------------------------------------------

    def join(self, now: float, seeds: list[Address]) -> None:
        """Join through ``seeds`` (push-pull with each); ends in ``JoinFinished``.

        Rounds that reach nobody are retried ``join_attempts`` times with doubling
        back-off, so agents started together need not start in order."""
        if not seeds:
            self._effects.append(JoinFinished(0, ("no seed addresses given",)))
            return
        self._join = _Join(list(seeds))
        self._join_round(now)

    def leave(self, now: float) -> None:
        """Announce a graceful departure; ends in ``LeaveFinished``."""
        if self.leaving:
            return
        me = self.members[self.name]
        msg = Dead(self.incarnation, self.name, self.name)
        self.leaving = True
        self._set_status(now, me, Status.LEFT, "left")
        self._queue_member(msg)
        peers = [m for m in self.members.values() if m.live and m.name != self.name]
        if not peers:
            self._finish_leave()
            return
        # Push the news out now rather than at the next gossip tick, then give the
        # retransmissions a moment before the caller shuts the sockets.
        self._gossip(now)
        self._leave_deadline = now + self.config.leave_propagate

    def set_meta(self, now: float, meta: Meta) -> None:
        """Change our metadata; raises the incarnation so the change wins everywhere."""
        self._check_meta(meta)
        self.members[self.name].meta = own_meta(meta)
        self._set_incarnation(self.incarnation + 1)
        self._queue_member(self._self_alive())

    def merge_state(self, now: float, states: PushPull, *, quiet: bool = False) -> None:
        """Merge a full member list exactly as a push-pull exchange would.

        ``quiet`` skips the broadcasts the merge would queue (one alive per new member)
        and the member events it would emit (delegates are still told): for drivers that
        build a cluster which has long known these facts, such as the simulator's warm
        start. Without it this is the push-pull merge itself."""
        self._quiet = quiet
        try:
            self._merge(now, states)
        finally:
            self._quiet = False

    def spread_push_pull(self, now: float) -> None:
        """Schedule the next push-pull at a random point of the period the current
        cluster size implies, as in a cluster that has been running for a while (a node
        created just now would schedule it within 0.5–1.5 base intervals)."""
        period = self.config.push_pull_period(self.num_members())
        self._push_pull_at = now + self.rng.uniform(0.0, period)

    def register(self, delegate: Delegate) -> None:
        if not delegate.channel or delegate.channel in self._delegates:
            raise ValueError(f"delegate channel {delegate.channel!r} is empty or taken")
        self._delegates[delegate.channel] = delegate

    @property
    def delegates(self) -> dict[str, Delegate]:
        """The registered delegates by channel, in registration order (a copy)."""
        return dict(self._delegates)

    def broadcast(self, now: float, channel: str, payload: bytes,
                  key: str | None = None) -> None:
        """Disseminate a delegate's message to every member.

        Small messages are piggybacked (``key`` replaces an older queued message with
        the same key); messages too large for a datagram go by stream to a few random
        members, whose delegates re-broadcast what is new to them, and push-pull
        repairs whatever is still missed."""
        msg = UserMessage(channel, payload)
        data = pack_message(msg)
        if len(data) <= self._datagram_budget():
            self._user_q.push(data, None if key is None else f"{channel}:{key}")
            return
        body = encode_packet([msg])
        for m in self._random_members(self.config.gossip_nodes):
            self._stream(now, m, "user", body, expect_reply=False)

    def send_to(self, now: float, member: str, channel: str, payload: bytes) -> bool:
        """Send a delegate's message to one member only, over a stream (reliable, any
        size): how a delegate answers a digest with what the peer is missing. False if
        ``member`` is unknown. Its status is not checked: a peer that just pushed its
        state is reachable even if we still list it failed (a restart not yet refuted)."""
        m = self.members.get(member)
        if m is None or member == self.name:
            return False
        self._stream(now, m, "user", encode_packet([UserMessage(channel, payload)]),
                     expect_reply=False)
        return True

    # ---- queries ----------------------------------------------------------------------

    def num_members(self) -> int:
        """Members we count for timeouts and retransmits (all but the forgotten)."""
        return len(self.members)

    def num_live(self) -> int:
        return len(self.members) - len(self._down)

    def suspicion(self, name: str) -> Suspicion | None:
        return self._suspicions.get(name)

    # ---- message dispatch ---------------------------------------------------------------

    def _dispatch(self, now: float, source: Address, m: Message) -> None:
        if self.leaving and not isinstance(m, (Ping, Ack)):
            return
        if isinstance(m, Ping):
            self._on_ping(now, source, m)
        elif isinstance(m, Ack):
            self._on_ack(now, m)
        elif isinstance(m, Nack):
            p = self._probe
            if p is not None and p.seq == m.seq:
                p.nacks += 1
        elif isinstance(m, IndirectPing):
            self._on_indirect_ping(now, source, m)
        elif isinstance(m, Alive):
            self._on_alive(now, m)
        elif isinstance(m, Suspect):
            self._on_suspect(now, m)
        elif isinstance(m, Dead):
            self._on_dead(now, m)
        elif isinstance(m, UserMessage):
            self._deliver_user(now, m)
        else:  # PushPull belongs on streams
            self.stats["messages_unexpected"] += 1

    def _on_ping(self, now: float, source: Address, m: Ping) -> None:
        if m.target != self.name:
            self.stats["pings_misdirected"] += 1
            return
        self._send(now, source, m.source, [Ack(m.seq)])

    def _on_ack(self, now: float, m: Ack) -> None:
        relay = self._relays.pop(m.seq, None)
        if relay is not None:
            self._send(now, relay.requester, relay.requester_name, [Ack(relay.seq)])
            return
        p = self._probe
        if p is None or p.seq != m.seq or p.acked:
            return
        p.acked = True
        target = self.members.get(p.target)
        if not p.indirect and target is not None:
            target.observe_rtt(now - p.sent)
        self._finish_probe(now, p)

    def _on_indirect_ping(self, now: float, source: Address, m: IndirectPing) -> None:
        target = self.members.get(m.target)
        if target is None or not target.live or target.addr != m.target_addr \
                or m.target == self.name or len(self._relays) >= MAX_RELAYS:
            # We probe only members we know, at the address we know: otherwise a
            # ping-req would make us send to any address its sender picked.
            self.stats["indirect_pings_refused"] += 1
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(source, m.requester, m.seq,
                                   m.want_nack and self.config.lifeguard,
                                   now + self.config.probe_timeout)
        self._send(now, target.addr, target.name, [Ping(seq, target.name, self.name)])

    def _deliver_user(self, now: float, m: UserMessage) -> None:
        self.stats["user_messages_in"] += 1
        d = self._delegates.get(m.channel)
        if d is None:
            self.stats["user_unknown_channel"] += 1
            return
        d.notify_message(now, m.payload)

    # ---- alive / suspect / dead ----------------------------------------------------------

    def _on_alive(self, now: float, a: Alive) -> None:
        if a.node == self.name:
            me = self.members[self.name]
            if self._absurd(me, a.incarnation):
                return
            if a.incarnation < self.incarnation or (
                    a.incarnation == self.incarnation and a.meta == me.meta
                    and a.addr == self.addr):
                return
            # Someone spreads an alive about us that is newer or differs from what we
            # are (a previous life of this name): override it.
            self._refute(a.incarnation)
            return
        m = self.members.get(a.node)
        if m is None:
            if not self._room_for_one():
                return
            m = Member(a.node, a.addr, a.incarnation, Status.ALIVE, now, own_meta(a.meta))
            self.members[a.node] = m
            self._roster.append(a.node)
            self._add_to_probe_order(a.node)
            self._queue_member(a)
            self._emit(now, m, "join")
            return
        if a.incarnation <= m.incarnation or self._absurd(m, a.incarnation):
            return
        if a.addr != m.addr and m.live:
            self.stats["name_conflicts"] += 1
            self._effects.append(Notice(
                "name-conflict",
                f"member {a.node} is at {m.addr[0]}:{m.addr[1]} but "
                f"{a.addr[0]}:{a.addr[1]} claims the same name", a.node))
            return
        self._suspicions.pop(a.node, None)
        was, old_meta = m.status, m.meta
        m.incarnation, m.addr, m.meta = a.incarnation, a.addr, own_meta(a.meta)
        self._queue_member(a)
        if was != Status.ALIVE:
            if not m.live:
                self._add_to_probe_order(a.node)
            self._set_status(now, m, Status.ALIVE, "alive")
        elif old_meta != m.meta:
            self._emit(now, m, "update")

    def _on_suspect(self, now: float, s: Suspect) -> None:
        m = self.members.get(s.node)
        if m is None or s.incarnation < m.incarnation or self._absurd(m, s.incarnation):
            return
        existing = self._suspicions.get(s.node)
        if existing is not None:
            if s.incarnation == existing.incarnation and existing.confirm(s.source):
                # Re-gossip so others count this independent confirmation too.
                self._queue_member(s)
            return
        if m.status != Status.ALIVE:
            return
        if s.node == self.name:
            self._refute(s.incarnation)
            return
        self._queue_member(s)
        m.incarnation = s.incarnation
        self._set_status(now, m, Status.SUSPECT, "suspect")
        n = self.num_members()
        cfg = self.config
        k = cfg.suspicion_confirmations if cfg.lifeguard else 0
        if n - 2 < k:
            k = 0
        self._suspicions[s.node] = Suspicion(
            start=now, incarnation=s.incarnation, accuser=s.source, k=k,
            min_timeout=cfg.suspicion_min(n),
            max_timeout=cfg.suspicion_max(n) if cfg.lifeguard else cfg.suspicion_min(n))

    def _on_dead(self, now: float, d: Dead) -> None:
        m = self.members.get(d.node)
        if m is None or d.incarnation < m.incarnation or self._absurd(m, d.incarnation):
            return
        if not m.live:
            return
        if d.node == self.name:
            if not self.leaving:
                self._refute(d.incarnation)
            return
        self._suspicions.pop(d.node, None)
        self._queue_member(d)
        m.incarnation = d.incarnation
        if d.source == d.node:
            self._set_status(now, m, Status.LEFT, "left")
        else:
            self._set_status(now, m, Status.DEAD, "failed")

    def _refute(self, accused: int) -> None:
        """We are accused (suspect/dead) or misrepresented: outbid the accusation."""
        self._set_incarnation(max(self.incarnation, accused) + 1)
        self.stats["refutations"] += 1
        self.awareness.apply(1)
        self._queue_member(self._self_alive())

    def _expire_suspicions(self, now: float) -> None:
        for name, s in list(self._suspicions.items()):
            if now < s.deadline():
                continue
            del self._suspicions[name]
            m = self.members.get(name)
            if m is not None and m.status == Status.SUSPECT and m.incarnation == s.incarnation:
                self.stats["failures_declared"] += 1
                self._on_dead(now, Dead(s.incarnation, name, self.name))

    # ---- probing ---------------------------------------------------------------------------

    def _start_probe(self, now: float) -> None:
        cfg = self.config
        if self._probe is not None:
            # A probe stretched by local health is still running; SWIM probes one
            # member at a time, so skip this tick like memberlist's ticker does.
            self._probe_at = self._probe.deadline
            return
        self._probe_at = now + cfg.probe_interval
        target = self._next_probe_target(now)
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(seq, target.name, now, now + cfg.probe_timeout,
                             now + self.awareness.scale(cfg.probe_interval))
        msgs: list[Message] = [Ping(seq, target.name, self.name)]
        if target.status == Status.SUSPECT and cfg.lifeguard:
            # Buddy system: tell the suspect first, so it can refute right away.
            msgs.append(Suspect(target.incarnation, target.name, self.name))
        self.stats["probes"] += 1
        self._send(now, target.addr, target.name, msgs)

    def _advance_probe(self, now: float) -> None:
        p = self._probe
        if p is None:
            return
        if not p.indirect and now >= p.direct_deadline:
            self._go_indirect(now, p)
        if now >= p.deadline:
            self._finish_probe(now, p)

    def _go_indirect(self, now: float, p: _Probe) -> None:
        cfg = self.config
        p.indirect = True
        target = self.members.get(p.target)
        if target is None or not target.live:
            return
        helpers = [m for m in self.members.values()
                   if m.status == Status.ALIVE and m.name not in (self.name, p.target)]
        chosen = self.rng.sample(helpers, min(cfg.indirect_checks, len(helpers)))
        for h in chosen:
            self._send(now, h.addr, h.name, [IndirectPing(p.seq, p.target, target.addr, self.name,
                                             cfg.lifeguard)])
        p.expected_nacks = len(chosen) if cfg.lifeguard else 0
        if cfg.tcp_fallback_probe:
            body = encode_packet([Ping(p.seq, p.target, self.name)])
            timeout = max(0.0, p.deadline - now)
            p.tcp_exchange = self._stream(now, target, "tcp_ping", body, True, timeout)

    def _finish_probe(self, now: float, p: _Probe) -> None:
        self._probe = None
        if p.tcp_exchange is not None:
            self._exchanges.pop(p.tcp_exchange, None)
        if p.acked:
            self.awareness.apply(-1)
            return
        target = self.members.get(p.target)
        if target is None or not target.live:
            return
        if p.tcp_ok:
            self.stats["probes_rescued_by_tcp"] += 1
            self._effects.append(Notice(
                "udp-blocked",
                f"member {p.target} answered a TCP ping but no UDP probe: "
                "is UDP blocked on its port?", p.target))
            return
        self.stats["probes_failed"] += 1
        if self.config.lifeguard:
            delta = p.expected_nacks - p.nacks if p.expected_nacks > 0 else 1
            self.awareness.apply(max(delta, 0))
        self._on_suspect(now, Suspect(target.incarnation, target.name, self.name))

    def _next_probe_target(self, now: float) -> Member | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                name = self._probe_order[self._probe_index]
                self._probe_index += 1
                m = self.members.get(name)
                if m is not None and m.live and name != self.name:
                    return m
            # One full round done: reshuffle (SWIM's time-bounded completeness).
            self._probe_order = [n for n, m in self.members.items()
                                 if m.live and n != self.name]
            self.rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _add_to_probe_order(self, name: str) -> None:
        """Insert a new member at a random point of the remaining round."""
        lo = self._probe_index
        pos = self.rng.randint(lo, len(self._probe_order))
        self._probe_order.insert(pos, name)

    def _add_many_to_probe_order(self, names: list[str]) -> None:
        """``_add_to_probe_order`` for each name in turn: the same random draws and the
        same resulting order, without a list insertion per name (each moves half the
        round: O(n²) for a table of n members learnt at once, as in a warm start).

        The insertions are replayed on an array of small indices (a quarter of the
        bytes to move) and the names put in place once. ``randint(lo, size)`` is
        CPython's rejection sampling on ``getrandbits`` for a plain ``Random``; it is
        done inline here, which skips three layers of argument checks per name, and
        ``tests/test_membership.py`` checks that both draw the same."""
        order, lo, rng = self._probe_order, self._probe_index, self.rng
        if len(names) < 16 or type(rng) is not random.Random:
            for name in names:
                self._add_to_probe_order(name)
            return
        pool = order[lo:]
        base = len(pool)
        pool += names
        idx = array("H" if len(pool) <= 0xFFFF else "I", range(base))
        insert, bits = idx.insert, rng.getrandbits
        k = len(order) - lo + 1  # choices for the next position: lo..len(order)
        for j in range(base, len(pool)):
            width = k.bit_length()
            r = bits(width)
            while r >= k:
                r = bits(width)
            insert(r, j)
            k += 1
        order[lo:] = [pool[i] for i in idx]

    def _expire_relays(self, now: float) -> None:
        for seq, r in list(self._relays.items()):
            if now >= r.deadline:
                del self._relays[seq]
                if r.want_nack:
                    self._send(now, r.requester, r.requester_name, [Nack(r.seq)])

    # ---- gossip ----------------------------------------------------------------------------

    def _gossip(self, now: float) -> None:
        cfg = self.config
        for m in self._random_members(cfg.gossip_nodes, now, include_recent_dead=True):
            if not (self._member_q or self._user_q):
                break
            self._send(now, m.addr, m.name, [])

    def _random_members(self, k: int, now: float = 0.0,
                        include_recent_dead: bool = False) -> list[Member]:
        """Up to ``k`` distinct random live members (and, if asked, ones that failed or
        left within ``gossip_to_the_dead``: a member accused falsely — a forged leave
        included — hears of it that way and refutes).

        Called on every gossip tick, so it samples the roster by rejection (O(k) when
        most members qualify) and scans all members only in small clusters or when
        few qualify (after a mass failure)."""
        ttd = self.config.gossip_to_the_dead

        def eligible(m: Member) -> bool:
            return m.name != self.name and (
                m.status <= Status.SUSPECT or (include_recent_dead and now - m.since < ttd))
        roster = self._roster
        chosen: list[Member] = []
        if len(roster) > 4 * k + 8:
            tried: set[int] = set()
            for _ in range(8 * k):
                i = self.rng.randrange(len(roster))
                if i in tried:
                    continue
                tried.add(i)
                m = self.members[roster[i]]
                if eligible(m):
                    chosen.append(m)
                    if len(chosen) == k:
                        return chosen
        cands = [m for m in self.members.values() if eligible(m) and m not in chosen]
        need = k - len(chosen)
        return chosen + (cands if len(cands) <= need else self.rng.sample(cands, need))

    def _datagram_budget(self) -> int:
        return self.config.max_datagram - self.seal.overhead - PACKET_OVERHEAD

    def _send(self, now: float, addr: Address, to: str, msgs: list[Message]) -> None:
        """Send ``msgs`` in one datagram to member ``to`` at ``addr``, filling the rest
        with broadcasts.

        Application broadcasts get up to half of the free space first, so catalog and
        policy updates are never starved by membership churn; membership updates fill
        the rest, then application broadcasts take whatever is still free."""
        parts = [pack_message(m) for m in msgs]
        budget = self._datagram_budget() - sum(map(len, parts))
        limit = self.config.retransmit_limit(self.num_members())
        user_seen: set[int] = set()  # never the same application message twice per packet
        if self._user_q:
            got = self._user_q.take(budget // 2, limit, user_seen)
            parts += got
            budget -= sum(map(len, got))
        if self._member_q:
            got = self._member_q.take(budget, limit)
            parts += got
            budget -= sum(map(len, got))
        if self._user_q:
            parts += self._user_q.take(budget, limit, user_seen)
        self.stats["user_messages_out"] += len(user_seen)
        if not parts:
            return
        data = self.seal.seal(now, encode_packet_raw(parts), to)
        self.stats["packets_out"] += 1
        self.stats["bytes_out"] += len(data)
        self._effects.append(SendPacket(addr, data))

    def _queue_member(self, msg: Alive | Suspect | Dead) -> None:
        if self._quiet:
            return
        self._member_q.push(pack_message(msg), msg.node)

    def _self_alive(self) -> Alive:
        return Alive(self.incarnation, self.name, self.addr, dict(self.members[self.name].meta))

    # ---- push-pull, join, reconnect, reap ------------------------------------------------

    def _merge(self, now: float, pp: PushPull) -> None:
        # Most rows of a push-pull repeat what we hold, and a warm start learns every
        # member at once, so both are cut short here: an alive row no newer than our
        # record is dropped exactly as _on_alive would drop it, and new members are
        # learnt as _on_alive would learn them (roster and probe order in one batch).
        # Anything else takes the general path, after the batch is flushed, so the
        # random draws keep their order. (Delegates hear of each join at once; they
        # never draw from the generator, see delegate.py, so the order holds.)
        members, me, quiet = self.members, self.name, self._quiet
        fresh: list[str] = []
        for s in pp.states:
            if s.status == Status.ALIVE:
                name = s.name
                m = members.get(name)
                if m is None:
                    if not self._room_for_one():
                        continue
                    m = members[name] = Member(name, s.addr, s.incarnation, Status.ALIVE, now,
                                               dict(s.meta) if s.meta else EMPTY_META)
                    fresh.append(name)
                    if not quiet:
                        self._queue_member(Alive(s.incarnation, name, s.addr, s.meta))
                    self._emit(now, m, "join")
                    continue
                if s.incarnation <= m.incarnation and name != me:
                    continue
            if fresh:
                self._learnt(fresh)
                fresh = []
            if s.status == Status.ALIVE:
                self._on_alive(now, Alive(s.incarnation, s.name, s.addr, s.meta))
            elif s.status == Status.LEFT:
                self._on_dead(now, Dead(s.incarnation, s.name, s.name))
            else:
                # memberlist's rule: a remote "dead" is only a suspicion here, so one
                # peer's stale view cannot fail a member outright.
                self._on_suspect(now, Suspect(s.incarnation, s.name, self.name))
        if fresh:
            self._learnt(fresh)
        for channel, data in pp.user.items():
            d = self._delegates.get(channel)
            if d is not None:
                d.merge_remote_state(now, data, pp.join, pp.source)

    def _learnt(self, names: list[str]) -> None:
        """The rest of ``_on_alive`` for members ``_merge`` has just added."""
        self._roster += names
        self._add_many_to_probe_order(names)

    def _push_pull_body(self, join: bool) -> bytes:
        user = {c: d.local_state(join) for c, d in self._delegates.items()}
        rows = [(m.name, m.addr, m.incarnation, m.status, m.meta)
                for m in self.members.values()]
        return encode_push_pull(join, self.name, rows, {c: s for c, s in user.items() if s})

    def _periodic_push_pull(self, now: float) -> None:
        self._push_pull_at = now + self.config.push_pull_period(self.num_members())
        peers = self._random_members(1)
        if peers:
            self._stream(now, peers[0], "push_pull", self._push_pull_body(False), True)

    def _join_round(self, now: float) -> None:
        j = self._join
        assert j is not None
        j.retry_at = INF
        j.attempt += 1
        j.errors.clear()  # report only the last round's failures
        body = self._push_pull_body(True)
        for seed in j.seeds:
            # A seed is known by address only: the join is sealed for nobody in
            # particular (see security.py), the one frame a peer accepts that way.
            ex = self._stream_to(now, seed, "", f"{seed[0]}:{seed[1]}", "join", body, True)
            j.pending.add(ex)

    def _join_answer(self, now: float, exchange: int, ok: bool, peer: str,
                     why: str = "no answer") -> None:
        j = self._join
        if j is None or exchange not in j.pending:
            return
        j.pending.discard(exchange)
        if ok:
            j.contacted += 1
        else:
            j.errors.append(f"{peer}: {why}")
        if j.pending:
            return
        if j.contacted or j.attempt >= self.config.join_attempts:
            self._join = None
            errors = tuple(f"{e} after {j.attempt} attempt(s)" for e in j.errors)
            self._effects.append(JoinFinished(j.contacted, errors))
            if j.contacted:
                self._queue_member(self._self_alive())
            return
        j.retry_at = now + self.config.join_backoff * 2 ** (j.attempt - 1)

    def _reconnect(self, now: float) -> None:
        """Try to merge with one failed member, so a healed partition joins back."""
        members = self.members
        n_failed = sum(1 for name in self._down if members[name].status == Status.DEAD)
        if not n_failed:
            return
        alive = max(1, self.num_live())
        if self.rng.random() > n_failed / alive:
            return
        # Picked in table order, as ever, so a run replays from its seed.
        failed = [m for m in members.values() if m.status == Status.DEAD]
        m = self.rng.choice(failed)
        self.stats["reconnect_attempts"] += 1
        self._stream(now, m, "reconnect", self._push_pull_body(True), True)

    def _reap(self, now: float) -> None:
        cfg = self.config

        def due(m: Member) -> bool:
            limit = cfg.reap_failed_after if m.status == Status.DEAD else (
                cfg.reap_left_after if m.status == Status.LEFT else INF)
            return now - m.since >= limit
        if not any(name != self.name and due(self.members[name]) for name in self._down):
            return
        for name, m in list(self.members.items()):
            if name == self.name:
                continue
            limit = cfg.reap_failed_after if m.status == Status.DEAD else (
                cfg.reap_left_after if m.status == Status.LEFT else INF)
            if now - m.since >= limit:
                del self.members[name]
                self._roster.remove(name)
                self._down.discard(name)
                self._emit(now, m, "reap")

    # ---- helpers -----------------------------------------------------------------------------

    def _stream(self, now: float, m: Member, kind: str, packet: bytes, expect_reply: bool,
                timeout: float | None = None) -> int:
        return self._stream_to(now, m.addr, m.name, m.name, kind, packet, expect_reply,
                               timeout)

    def _stream_to(self, now: float, addr: Address, to: str, peer: str, kind: str,
                   packet: bytes, expect_reply: bool, timeout: float | None = None) -> int:
        """Ask the driver for a stream exchange carrying ``packet`` sealed for member
        ``to`` (``peer`` names the other end in errors)."""
        self._exchange += 1
        ex = self._exchange
        self._exchanges[ex] = kind
        self._exchange_peer[ex] = peer
        self.stats[f"stream_{kind}"] += 1
        frame = self._frame(now, packet, to)
        self._effects.append(StreamRequest(
            ex, addr, frame.body, expect_reply,
            self.config.stream_timeout if timeout is None else timeout, frame.header))
        return ex

    def _frame(self, now: float, packet: bytes, to: str) -> StreamReply:
        """``packet`` sealed for ``to`` with its frame header."""
        body = self.seal.seal(now, packet, to)
        return StreamReply(body, self.seal.frame_header(now, len(body), to))

    def _notice_refused(self, source: Address, why: str) -> None:
        """Tell our operator once per host (every stream comes from a new port)."""
        if source[0] not in self._refused and len(self._refused) < 1024:
            self._refused.add(source[0])
            self._effects.append(Notice("gossip_refused",
                                        f"refused gossip from {source[0]}: {why}"))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _set_status(self, now: float, m: Member, status: int, kind: str) -> None:
        m.status = status
        m.since = now
        if status >= Status.DEAD:
            self._down.add(m.name)
        else:
            self._down.discard(m.name)
        self._emit(now, m, kind)

    def _emit(self, now: float, m: Member, kind: str) -> None:
        if self._quiet and not self._delegates:
            return
        ev = MemberEvent(kind, m.name, m.status, m.incarnation, m.addr, dict(m.meta))
        if not self._quiet:
            self._effects.append(ev)
        for d in self._delegates.values():
            d.notify_member(now, ev)

    def _finish_leave(self) -> None:
        if self._leave_deadline == -INF:
            return
        self._leave_deadline = -INF  # finished; never fire again
        self._effects.append(LeaveFinished())

    def _set_incarnation(self, incarnation: int) -> None:
        """Our new incarnation, never past the wire's cap (which the jump rule keeps out
        of reach: see ``_absurd``)."""
        self.incarnation = min(incarnation, MAX_COUNTER)
        self.members[self.name].incarnation = self.incarnation

    def _absurd(self, m: Member, incarnation: int) -> bool:
        """True (and counted) if ``incarnation`` jumps implausibly far above what we
        hold for ``m`` (us included). Such a message can only be forged: accepting it
        would let its sender push a member's counter to the cap, where the member can
        no longer outbid it and stays failed, so it is dropped like a malformed one."""
        if incarnation > m.incarnation + MAX_INCARNATION_JUMP:
            self.stats["incarnations_absurd"] += 1
            return True
        return False

    def _room_for_one(self) -> bool:
        """Whether the member table may grow (counted when it may not)."""
        if len(self.members) < self.config.max_members:
            return True
        self.stats["members_refused_table_full"] += 1
        return False

    def _may_learn(self, now: float, host: str) -> bool:
        """Whether a datagram from ``host`` may introduce one more new member name: a
        token bucket per source host (``new_member_rate`` per second, bursts of
        ``new_member_burst``), so one sender cannot fill the table with names that
        every probe round must then visit (each fake member costs a probe period)."""
        cfg = self.config
        bucket = self._new_names.get(host)
        if bucket is None:
            if len(self._new_names) >= 4096:
                self._new_names.clear()  # bounded; a flood from many hosts resets it
            tokens = float(cfg.new_member_burst)
        else:
            tokens = min(float(cfg.new_member_burst),
                         bucket[0] + (now - bucket[1]) * cfg.new_member_rate)
        if tokens < 1.0:
            self._new_names[host] = (tokens, now)
            self.stats["new_members_throttled"] += 1
            return False
        self._new_names[host] = (tokens - 1.0, now)
        return True

    def _check_meta(self, meta: Meta) -> None:
        for k, v in meta.items():
            if not (valid_text(k, MAX_META_TEXT) and k and valid_text(v, MAX_META_TEXT)):
                raise ValueError(f"tag {k!r}: keys and values are printable text within "
                                 f"the {MAX_META_TEXT}-character limit")
        if len(meta) > MAX_META_ENTRIES:
            raise ValueError(f"{len(meta)} tags; the limit is {MAX_META_ENTRIES}")
        size = len(pack_message(Alive(0, "", ("", 0), meta)))
        if size > self.config.max_meta_bytes:
            raise ValueError(f"metadata takes {size} bytes; the limit is "
                             f"{self.config.max_meta_bytes}")
