"""The SWIM + Lifeguard membership state machine (sans-IO).

``Membership`` holds one node's view of the cluster and advances it only through its
inputs:

* ``receive(now, source, datagram)`` – a UDP datagram arrived;
* ``handle_stream(now, source, frame_body)`` – a peer opened a stream (push-pull, TCP
  ping, large broadcast); returns a ``StreamReply`` or None;
* ``stream_reply(now, exchange, reply)`` – a stream exchange we asked for finished;
* ``tick(now)`` – time passed; call it at ``next_deadline()``;
* commands: ``join``, ``leave``, ``set_meta``, ``broadcast``.

Outputs are effects (``take_effects()``): datagrams and stream exchanges to carry
out, membership events, join/leave completion, operator notices. Time comes only
from ``now`` and randomness only from the injected ``random.Random``, so the trio
runtime and the simulator drive exactly this code, and a simulation replays from its
seed.

The protocol follows memberlist (probe, indirect probe, suspicion, refutation,
piggybacked and periodic gossip, push-pull) with Lifeguard's three additions: local
health scaling the probe window, suspicion timeouts that shrink with independent
confirmations, and the buddy system (a suspect hears of its suspicion in the very
probe that tests it, so it can refute at once).

The class is a facade over one file per concern (see ``core_base.py``): the state
rules (``rules.py``), probing (``probing.py``), dissemination
(``dissemination.py``) and anti-entropy (``anti_entropy.py``).
"""

from __future__ import annotations

import math
import random
from collections import Counter

from .address import format_address
from .admission import Admission
from .anti_entropy import AntiEntropy, _Join
from .awareness import Awareness
from .config import GossipConfig
from .delegate import Delegate
from .dissemination import Dissemination
from .effects import (
    Effect,
    JoinFinished,
    StreamReply,
)
from .history import MemberHistory
from .identity import Identity
from .members import Member
from .node_key import decode_credential
from .probing import Probing, _Probe, _Relay
from .queue import BroadcastQueue
from .rules import MemberRules
from .security import (
    FrameStep,
    Plaintext,
    Refuse,
    Seal,
    SealError,
    refusal_reason,
    refusal_reply,
)
from .signed_state import SignedState
from .suspicion import Suspicion
from .trace import GossipTrace, digest
from .wire import (
    Ack,
    Address,
    Alive,
    Dead,
    DecodeError,
    Digest,
    IndirectPing,
    Message,
    Meta,
    Nack,
    Ping,
    PushPull,
    SignedAlive,
    SignedLeave,
    Skipped,
    Status,
    Suspect,
    UserMessage,
    UserRequest,
    decode_frame_body,
    decode_packet,
    encode_packet,
    own_meta,
    pack_message,
)

INF = math.inf
#: What a bare probe datagram holds (see ``Probing._on_ping``).
_PROBE_TYPES = frozenset({Ping, IndirectPing, Ack, Nack, Digest})


class Membership(MemberRules, SignedState, Admission, Probing, Dissemination, AntiEntropy):
    """One node's SWIM/Lifeguard state machine: the facade that takes the inputs and
    dispatches them to its parts. See the module docstring."""

    def __init__(self, name: str, addr: Address, config: GossipConfig, rng: random.Random,
                 *, meta: Meta | None = None, seal: Seal | None = None,
                 identity: Identity | None = None, now: float = 0.0) -> None:
        self.name = name
        self.addr = addr
        self.config = config
        self.rng = rng
        self.seal: Seal = seal or Plaintext()
        self.awareness = Awareness(config.awareness_max_multiplier if config.lifeguard else 1)
        #: The membership events this node took part in (``history.py``): bounded in
        #: bytes, read by the ``explain`` query and logged by the shell (``on_record``).
        self.history = MemberHistory(name)
        self.history.clock = now
        self.stats: Counter[str] = Counter()
        self.members: dict[str, Member] = {}
        self.incarnation = 1
        self.leaving = False
        self._quiet = False  # merge_state(quiet=True) in progress: queue nothing
        self._check_meta(meta or {})
        self.members[name] = Member(name, addr, self.incarnation, Status.ALIVE, now,
                                    own_meta(meta or {}))
        self.identity = identity or Identity()
        self.identity.key_of = self._bound_key
        if self.identity.signing and self.identity.credential is not None:
            self.members[name].cred = decode_credential(self.identity.credential)
        self._own_signed = None
        self._remembered = {}
        self._pending = {}
        self._pending_by_seq = {}
        self._refute_in_packet = None
        self._pinning = set()
        self._pin_exchanges = {}
        self._admission_tokens = (float(config.admission_burst), now)
        self._member_sum = 0
        self._member_parts: dict[str, int] = {}
        self._note_member(self.members[name])
        #: Member names in an indexable list, for O(k) random sampling.
        self._roster: list[str] = [name]
        #: Names of the members that are failed or left, so that counting the live
        #: ones and the periodic reconnect and reap need not scan every member.
        self._down: set[str] = set()

        self._effects: list[Effect] = []
        self._member_q = BroadcastQueue()
        self._user_q = BroadcastQueue()
        self._delegates: dict[str, Delegate] = {}
        #: The delegates with timers of their own (``Delegate.timer_deadline``).
        self._timed: list[Delegate] = []
        self._seq = rng.randrange(1 << 31)
        self._exchange = 0
        self._exchanges: dict[int, str] = {}  # id -> kind
        self._refused: set[str] = set()  # hosts whose gossip we refused (noticed once)
        #: Per source host: (tokens, last refill) of its budget of new member names.
        self._new_names: dict[str, tuple[float, float]] = {}
        self._exchange_peer: dict[int, str] = {}
        self._exchange_host: dict[int, str] = {}
        #: Observer of application messages sent and received (``trace.py``); None
        #: unless a diagnostic run asks for it.
        self.trace: GossipTrace | None = None
        self._summary = 0
        self._summary_since = now
        self._repair_at = now
        self._repaired = (0, 0)
        self._gossiped_at = -INF

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
        for t in self._timed:
            d = min(d, t.timer_deadline())
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
            self._gossiped_at = now
            self._gossip_at = now + self.config.gossip_interval
        self._expire_suspicions(now)
        if self._pending:
            self._expire_pending(now)
        if now >= self._push_pull_at:
            self._periodic_push_pull(now)
        if now >= self._reconnect_at:
            self._reconnect_at = now + self.config.reconnect_interval
            self._reconnect(now)
            self._reap(now)
        if self._join is not None and now >= self._join.retry_at:
            if self._join.contacted:
                self._finish_join()  # the grace for slower seeds is over
            else:
                self._join_round(now)
        for t in self._timed:
            if now >= t.timer_deadline():
                t.on_timer(now)

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
        if self.trace is not None:
            self._trace_in("in", source, messages)
        self._refute_in_packet = -1
        try:
            self._apply_datagram(now, source, messages)
        finally:
            accused, self._refute_in_packet = self._refute_in_packet, None
        if accused >= 0:
            self._refute(accused)

    def _apply_datagram(self, now: float, source: Address, messages: list[Message]) -> None:
        members = self.members
        probes = 0
        digest: Digest | None = None
        news = False  # anything besides probes and the digest (see _on_ping)
        for m in messages:
            if type(m) not in _PROBE_TYPES:
                news = True
            # Signed statements first, so the plain twin beside one finds its member
            # bound and is dropped instead of admitted on its own.
            if type(m) is SignedAlive and not self.leaving:
                assert isinstance(m, SignedAlive)
                known = members.get(m.alive.node)
                if known is not None and m.alive.incarnation <= known.incarnation \
                        and known.signed is m:
                    continue  # the same statement again
                if known is None and not self._may_learn(now, source[0]):
                    continue  # a new name: the same budget per host as a plain one
                self._on_signed_alive(now, source[0], m)
            elif type(m) is SignedLeave and not self.leaving:
                assert isinstance(m, SignedLeave)
                self._on_signed_leave(now, source[0], m)
        for m in messages:
            t = type(m)
            if t is SignedAlive or t is SignedLeave:
                continue
            if t is Digest:
                assert isinstance(m, Digest)
                digest = m
                continue
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
                if t is Ping and not self.leaving:
                    assert isinstance(m, Ping)
                    self._on_ping(now, source, m, news)
                    continue
            self._dispatch(now, source, m)
        if digest is not None and not self.leaving:
            self._on_digest(now, digest)

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
            self._merge(now, msg, source[0])
            return self._frame(now, reply, msg.source)
        if isinstance(msg, Ping):
            if msg.target != self.name:
                self.stats["pings_misdirected"] += 1
                return None
            return self._frame(now, encode_packet([Ack(msg.seq)]), msg.source)
        if isinstance(msg, UserMessage):
            if self.trace is not None:
                self._trace_in("in-stream", source, [msg])
            self._deliver_user(now, msg)
            return None
        if isinstance(msg, UserRequest):
            d = self._delegates.get(msg.channel)
            if d is None:
                self.stats["user_unknown_channel"] += 1
                return None
            answer = d.handle_request(now, source[0], msg.payload)
            if answer is None:
                return None
            return self._frame(now, encode_packet([UserMessage(msg.channel, answer)]),
                               msg.source)
        # Anything else arriving on a stream is treated as gossip.
        self._dispatch(now, source, msg)
        return None

    def stream_reply(self, now: float, exchange: int, reply: bytes | None) -> None:
        """Outcome of a ``StreamRequest``: the reply frame's body, ``b""`` for a one-way
        success, or None if the exchange failed (refused, timed out, reset)."""
        kind = self._exchanges.pop(exchange, None)
        peer = self._exchange_peer.pop(exchange, "")
        host = self._exchange_host.pop(exchange, "")
        if self._pin_exchanges:
            self._pin_done(exchange)
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
        if kind in ("join", "push_pull", "reconnect", "pin"):
            ok = isinstance(msg, PushPull)
            if ok:
                assert isinstance(msg, PushPull)
                self._merge(now, msg, host)
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
        elif kind.startswith("request:"):
            d = self._delegates.get(kind[8:])
            if d is not None:
                d.notify_reply(now, exchange,
                               msg.payload if isinstance(msg, UserMessage) else None)

    # ---- commands -------------------------------------------------------------------

    def join(self, now: float, seeds: list[Address], attempts: int | None = None) -> None:
        """Join through ``seeds`` (push-pull with each); ends in ``JoinFinished``.

        Rounds that reach nobody are retried, ``attempts`` rounds in all (default
        ``join_attempts``) with doubling back-off, so agents started together need not
        start in order. A caller with its own schedule (``--retry-join``, the rejoin
        through a snapshot) asks for one round."""
        if not seeds:
            self._effects.append(JoinFinished(0, ("no seed addresses given",)))
            return
        self._join = _Join(list(seeds), max(1, attempts or self.config.join_attempts))
        self._join_round(now)

    def leave(self, now: float) -> None:
        """Announce a graceful departure; ends in ``LeaveFinished``."""
        if self.leaving:
            return
        me = self.members[self.name]
        msg = Dead(self.incarnation, self.name, self.name)
        signed = self._signed_leave(msg)
        self.leaving = True
        self._set_status(now, me, Status.LEFT, "left")
        said: list[Message] = []
        if signed is None or self.identity.plain_too:
            self._queue_member(msg)
            said.append(msg)
        if signed is not None:
            me.signed = signed
            self._queue_signed(signed)
            said.append(signed)
        peers = [m for m in self.members.values() if m.live and m.name != self.name]
        if not peers:
            self._finish_leave()
            return
        # Push the news out now rather than at the next gossip tick, tell some peers
        # directly, then give the retransmissions a moment before the sockets close.
        self._gossip(now)
        fanout = self.config.leave_fanout
        told = peers if len(peers) <= fanout else self.rng.sample(peers, fanout)
        for m in told:
            self._send(now, m.addr, m.name, said)
        self._leave_deadline = now + self.config.leave_propagate

    def set_meta(self, now: float, meta: Meta) -> None:
        """Change our metadata; raises the incarnation so the change wins everywhere."""
        self._check_meta(meta)
        self.members[self.name].meta = own_meta(meta)
        self._note_member(self.members[self.name])
        self._set_incarnation(self.incarnation + 1)
        self._queue_self(news=True)
        if self.config.gossip_on_news:
            self._gossip_soon(now)

    def merge_state(self, now: float, states: PushPull, *, quiet: bool = False) -> None:
        """Merge a full member list exactly as a push-pull exchange would.

        ``quiet`` skips the broadcasts the merge would queue (one alive per new member)
        and the member events it would emit (delegates are still told): for drivers that
        build a cluster which has long known these facts, such as the simulator's warm
        start. Without it this is the push-pull merge itself."""
        self._quiet = quiet
        try:
            self._merge(now, states, "")
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
        if type(delegate).timer_deadline is not Delegate.timer_deadline:
            self._timed.append(delegate)

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
            if self.config.gossip_on_news:
                self._gossip_soon(now)
            return
        body = encode_packet([msg])
        for m in self._random_members(self.config.gossip_nodes):
            self._stream(now, m, "user", body, expect_reply=False)

    def _gossip_soon(self, now: float) -> None:
        """Application news goes out now rather than at the next round: each hop of
        an epidemic would otherwise wait up to a gossip interval, which is most of a
        change's time to reach everyone. At most one early round per quarter interval,
        so a burst of changes still shares packets."""
        soon = max(now, self._gossiped_at + self.config.gossip_interval / 4)
        if soon < self._gossip_at:
            self._gossip_at = soon

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

    def send_datagram(self, now: float, member: str, channel: str, payload: bytes) -> bool:
        """Send a delegate's message to one live member in a datagram (with whatever
        broadcasts fit beside it): how a query's answer goes back. False if ``member``
        is not alive or the message does not fit one datagram."""
        m = self.members.get(member)
        if m is None or member == self.name or m.status != Status.ALIVE:
            return False
        msg = UserMessage(channel, payload)
        if len(pack_message(msg)) > self._datagram_budget() - 32:  # room for a digest
            return False
        self._send(now, m.addr, m.name, [msg])
        return True

    def request(self, now: float, member: str, channel: str, payload: bytes,
                timeout: float | None = None) -> int | None:
        """Ask one member's delegate something by stream; its reply reaches our
        delegate's ``notify_reply`` with the exchange number returned here (None:
        ``member`` is unknown)."""
        m = self.members.get(member)
        if m is None or member == self.name:
            return None
        return self._stream(now, m, f"request:{channel}",
                            encode_packet([UserRequest(channel, payload, self.name)]), True,
                            timeout)


    def suspicion(self, name: str) -> Suspicion | None:
        return self._suspicions.get(name)

    # ---- message dispatch ---------------------------------------------------------------

    def _dispatch(self, now: float, source: Address, m: Message) -> None:
        if self.leaving and not isinstance(m, (Ping, Ack)):
            return
        if isinstance(m, Ping):
            self._on_ping(now, source, m)
        elif isinstance(m, Ack):
            if not (self._pending_by_seq and self._on_admission_ack(now, source, m.seq)):
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
        elif isinstance(m, Skipped):
            self.stats["messages_skipped"] += 1
        else:  # PushPull belongs on streams, a Digest in datagrams
            self.stats["messages_unexpected"] += 1


    def _trace_in(self, direction: str, source: Address, messages: list[Message]) -> None:
        assert self.trace is not None
        user = [digest(pack_message(m)) for m in messages if isinstance(m, UserMessage)]
        if user:
            self.trace(direction, format_address(source), user)

    def _deliver_user(self, now: float, m: UserMessage) -> None:
        self.stats["user_messages_in"] += 1
        d = self._delegates.get(m.channel)
        if d is None:
            self.stats["user_unknown_channel"] += 1
            return
        d.notify_message(now, m.payload)


