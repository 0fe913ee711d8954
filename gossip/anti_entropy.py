"""Anti-entropy and the table's life cycle: push-pull, join, reconnect, reap.

A periodic full-state exchange over a stream with one random member repairs whatever
gossip missed; a join is a push-pull with each seed, retried with back-off; failed
members are retried now and then so a healed partition merges back; failed and left
members are forgotten after a while.

*Anti-entropy on demand.* The periodic exchange alone leaves a member that the
epidemic missed (no copy was ever sent to it, or every copy was lost) behind for up to
a push-pull period. So every datagram also carries a ``Digest``: a 32-bit summary of
the sender's application state (each delegate's ``state_digest``) and how long it has
been unchanged. A difference alone means nothing while a change spreads; a difference
between two summaries that have both been stable for ``repair_after(n)`` (the
epidemic's reach) means one side missed something. The side whose state has been
stable longer is the likelier to be behind, so it starts a push-pull with the other
at once; the exchange repairs both directions. A member starts at most one repair per
``repair_interval``, and never twice for the same pair of summaries (a difference a
push-pull cannot settle, such as documents one side does not trust, is not retried).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .core_base import INF, CoreBase
from .effects import (
    JoinFinished,
)
from .members import Member
from .signed_state import IDENTITY_CHANNEL
from .trace import GossipTrace
from .wire import (
    EMPTY_META,
    MAX_FRAME,
    Address,
    Alive,
    Dead,
    Digest,
    PushPull,
    Status,
    Suspect,
    encode_push_pull,
)

#: Room left in a push-pull frame for the seal and the frame header.
FRAME_MARGIN = 64 * 1024
_COUNT_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class _Join:
    seeds: list[Address]
    #: Rounds to try before giving up.
    attempts: int
    attempt: int = 0
    pending: set[int] = field(default_factory=set)
    contacted: int = 0
    errors: list[str] = field(default_factory=list)
    retry_at: float = INF


class AntiEntropy(CoreBase):
    """Push-pull, join, reconnect and reap (a part of ``Membership``)."""

    #: The join in progress, if any.
    _join: _Join | None
    #: Our last state summary and when it last changed; the earliest next repair and
    #: the (theirs, ours) summaries of the last one.
    _summary: int
    _summary_since: float
    _repair_at: float
    _repaired: tuple[int, int]
    trace: GossipTrace | None

    def _merge(self, now: float, pp: PushPull, host: str) -> None:
        """Merge a push-pull from ``host``: first its signed statements (``identity``
        channel), then the plain rows, then the delegates' states."""
        signed = pp.user.get(IDENTITY_CHANNEL)
        if self._quiet:
            # A driver installing state it trusts (the simulator's warm start): the
            # rows in one batch, then each member's signed word binds it in place.
            self._merge_rows(now, pp)
            if signed is not None:
                self._merge_identity(now, signed, host, pp.source)
        else:
            if signed is not None:
                self._merge_identity(now, signed, host, pp.source)
            self._merge_rows(now, pp)
        if self.trace is not None:
            self.trace("push-pull", pp.source, [])
        for channel, data in pp.user.items():
            d = self._delegates.get(channel)
            if d is not None:
                d.merge_remote_state(now, data, pp.join, pp.source)

    def _merge_rows(self, now: float, pp: PushPull) -> None:
        # Most rows of a push-pull repeat what we hold, and a warm start learns every
        # member at once, so both are cut short here: an alive row no newer than our
        # record is dropped exactly as _on_alive would drop it, and new members are
        # learnt as _on_alive would learn them (roster and probe order in one batch).
        # Anything else takes the general path, after the batch is flushed, so the
        # random draws keep their order. (Delegates hear of each join at once; they
        # never draw from the generator, see delegate.py, so the order holds.)
        members, me, quiet = self.members, self.name, self._quiet
        # New names take the general path (which may hold them for admission or
        # refuse them unsigned) unless they are the sender's own or nothing gates them.
        gated = not quiet and (self._admission_needed() or self.identity.mode == "require")
        fresh: list[str] = []
        for s in pp.states:
            if s.status == Status.ALIVE:
                name = s.name
                m = members.get(name)
                if m is None and not (gated and name != pp.source):
                    if not self._room_for_one() or not (
                            quiet or self.identity.accepts_unsigned(name)):
                        continue
                    m = members[name] = Member(name, s.addr, s.incarnation, Status.ALIVE, now,
                                               dict(s.meta) if s.meta else EMPTY_META)
                    fresh.append(name)
                    if not quiet:
                        self._queue_member(Alive(s.incarnation, name, s.addr, s.meta))
                    self._emit(now, m, "join")
                    continue
                if m is not None and s.incarnation <= m.incarnation and name != me:
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
                self._on_suspect(now, Suspect(s.incarnation, s.name, self.name),
                                 via="push-pull")
        if fresh:
            self._learnt(fresh)

    def _learnt(self, names: list[str]) -> None:
        """The rest of ``_on_alive`` for members ``_merge`` has just added."""
        self._roster += names
        self._add_many_to_probe_order(names)

    def _push_pull_body(self, join: bool) -> bytes:
        user = {c: d.local_state(join) for c, d in self._delegates.items()}
        signed = self._identity_state()
        if signed is not None:
            user[IDENTITY_CHANNEL] = signed
        rows = [(m.name, m.addr, m.incarnation, m.status, m.meta)
                for m in self.members.values()]
        body = encode_push_pull(join, self.name, rows, {c: s for c, s in user.items() if s})
        room = MAX_FRAME - FRAME_MARGIN
        if len(body) > room and signed is not None:
            # The signed statements give way (gossip and later exchanges carry them):
            # a join must never fail because of what we hold.
            smaller = self._identity_state(max(0, len(signed) - (len(body) - room)))
            if smaller is None:
                del user[IDENTITY_CHANNEL]
            else:
                user[IDENTITY_CHANNEL] = smaller
            body = encode_push_pull(join, self.name, rows,
                                    {c: s for c, s in user.items() if s})
        return body

    # ---- anti-entropy on demand -----------------------------------------------------

    def _state_summary(self, now: float) -> int:
        """The delegates' state digests, the live members' tags and how many members
        are live, folded to 32 bits; notes when it changed. The count costs nothing
        and catches a member that missed a join: on a plaintext cluster a name waits
        for its admission ping before it is relayed (``admission.py``), and without
        the count one member in a third of 60-node cold starts missed a few joins
        until the periodic push-pull (``rumor sim converge --loss 0.02``: 17-40 s
        instead of 4-5 s)."""
        s = self._member_sum ^ ((self.num_live() * _COUNT_MIX) & _MASK64)
        for d in self._delegates.values():
            s ^= d.state_digest()
        s = (s ^ (s >> 32)) & 0xFFFFFFFF
        if s != self._summary:
            self._summary = s
            self._summary_since = now
        return s

    def _digest(self, now: float) -> Digest:
        summary = self._state_summary(now)
        return Digest(self.name, summary, int((now - self._summary_since) * 1000))

    def _on_digest(self, now: float, m: Digest) -> None:
        """A peer's summary arrived (after the rest of its datagram was applied)."""
        ours = self._state_summary(now)
        if m.summary == ours or m.node == self.name or not self.config.state_repair:
            return
        settle = self.config.repair_after(self.num_members())
        ours_stable, theirs_stable = now - self._summary_since, m.stable_ms / 1000
        if ours_stable < settle or theirs_stable < settle:
            return  # a change may still be spreading: give the epidemic its time
        if (ours_stable, m.node) < (theirs_stable, self.name):
            return  # their state is the older one: they will ask us
        pair = (m.summary, ours)
        if now < self._repair_at or pair == self._repaired:
            return
        peer = self.members.get(m.node)
        if peer is None or peer.status > Status.SUSPECT:
            return
        self._repair_at = now + self.config.repair_interval
        self._repaired = pair
        self.stats["state_repairs"] += 1
        self._stream(now, peer, "push_pull", self._push_pull_body(False), True)

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
            if ok:
                # We are in: one dead seed must not hold the join (and the agent's
                # readiness) for a whole stream timeout. Late answers still merge.
                j.retry_at = min(j.retry_at, now + self.config.join_grace)
            return
        if j.contacted or j.attempt >= j.attempts:
            self._finish_join()
            return
        j.retry_at = now + self.config.join_backoff * 2 ** (j.attempt - 1)

    def _finish_join(self) -> None:
        j = self._join
        assert j is not None
        self._join = None
        errors = tuple(f"{e} after {j.attempt} attempt(s)" for e in j.errors)
        self._effects.append(JoinFinished(j.contacted, errors))
        if j.contacted:
            self._queue_self(credential=True)  # a life's first word binds the name

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
                if m.cred is not None and len(self._remembered) < 1 << 16:
                    self._remembered[name] = m.cred  # never unsigned again
                self._roster.remove(name)
                self._down.discard(name)
                self._emit(now, m, "reap")
