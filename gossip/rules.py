"""What a node believes about each member, and how news changes it (sans-IO).

The alive / suspect / dead rules of SWIM with incarnation numbers: newer news wins, a
suspicion starts a Lifeguard timer that independent confirmations shorten, a node
accused or misrepresented refutes by outbidding the accusation. Also the table's
guards: absurd incarnation jumps, the member cap, the rate of new names per host.
"""

from __future__ import annotations

from .core_base import CoreBase
from .effects import (
    Notice,
)
from .fields import MAX_INCARNATION_JUMP, valid_text
from .history import (
    DEAD_HEARD,
    DECLARED_DEAD,
    LEFT_HEARD,
    REFUTE_SEEN,
    REFUTED,
    SUSPECT_CONFIRMED,
    SUSPECT_HEARD,
    SUSPECT_RAISED,
)
from .members import Member
from .node_key import Credential
from .suspicion import Suspicion
from .wire import (
    MAX_META_ENTRIES,
    MAX_META_TEXT,
    Alive,
    Dead,
    Meta,
    SignedAlive,
    Status,
    Suspect,
    own_meta,
    pack_message,
)


class MemberRules(CoreBase):
    """The alive / suspect / dead / refute rules (a part of ``Membership``)."""

    def _on_alive(self, now: float, a: Alive) -> None:
        """A plain (unsigned) alive: the word of whoever sent it."""
        if a.node == self.name:
            me = self.members[self.name]
            if self._absurd(me, a.incarnation) or self.identity.mode == "require":
                return
            if a.incarnation < self.incarnation or (
                    a.incarnation == self.incarnation and a.meta == me.meta
                    and a.addr == self.addr):
                return
            # Someone spreads an alive about us that is newer or differs from what we
            # are (a previous life of this name): override it.
            self._refute(a.incarnation, now)
            return
        if not self.identity.accepts_unsigned(a.node):
            # Its signed word is the only one that counts (or all must be signed).
            self.stats["alives_unsigned_refused"] += 1
            return
        if a.node not in self.members and self._admission_needed():
            self._admit_later(now, a)
            return
        self._accept_alive(now, a, None, None)

    def _accept_alive(self, now: float, a: Alive, sa: SignedAlive | None,
                      cred: Credential | None) -> None:
        """Apply an alive: a plain one we may take, or a signed one that verified
        against ``cred`` (which may bind the name, or bind it anew)."""
        m = self.members.get(a.node)
        if m is None:
            if not self._room_for_one():
                return
            m = Member(a.node, a.addr, a.incarnation, Status.ALIVE, now, own_meta(a.meta))
            m.cred, m.signed = cred, sa
            self.members[a.node] = m
            self._roster.append(a.node)
            self._add_to_probe_order(a.node)
            self._relay_alive(a, sa, False)
            self._emit(now, m, "join")
            if sa is None and self.identity.signing and not self._quiet:
                # Taken at its unsigned word (prefer: maybe a version-1 member): ask
                # for its own push-pull, which binds it if it signs; gossip carries a
                # member's credential only in its life's first alive, long gone by now.
                self._pin_later(now, a.node, a.addr)
            return
        if sa is None:
            if a.incarnation <= m.incarnation or self._absurd(m, a.incarnation):
                return
            if a.addr != m.addr and m.live:
                self.stats["name_conflicts"] += 1
                self._effects.append(Notice(
                    "name-conflict",
                    f"member {a.node} is at {m.addr[0]}:{m.addr[1]} but "
                    f"{a.addr[0]}:{a.addr[1]} claims the same name", a.node))
                return
        else:
            rebind = m.cred is not cred
            if a.incarnation <= m.incarnation and not rebind:
                return
            m.cred, m.signed = cred, sa
            if a.incarnation == m.incarnation and a.addr == m.addr and a.meta == m.meta:
                # Bound at the incarnation we hold: the same facts, now signed. A
                # suspicion at it stays (only a higher incarnation refutes).
                self._relay_alive(a, sa, False)
                return
            # Otherwise the signed word wins: over a newer-looking unsigned one (which
            # only a forger could have sent), and, bound anew by a newer credential,
            # over the previous key's.
        self._suspicions.pop(a.node, None)
        was, old_meta = m.status, m.meta
        m.incarnation, m.addr, m.meta = a.incarnation, a.addr, own_meta(a.meta)
        self._relay_alive(a, sa, old_meta != m.meta)
        if was != Status.ALIVE:
            self.history.record(REFUTE_SEEN, now, a.node, a.node, self.awareness.score,
                                incarnation=a.incarnation, was=Status.NAMES[was])
            if not m.live:
                self._add_to_probe_order(a.node)
            self._set_status(now, m, Status.ALIVE, "alive")
        elif old_meta != m.meta:
            self._emit(now, m, "update")

    def _on_suspect(self, now: float, s: Suspect, via: str = "gossip") -> None:
        """A suspicion; ``via`` says how it reached us (``probe``: our own failed probe,
        ``push-pull``, ``dead``: a dead taken as a suspicion, ``gossip``), for the
        history."""
        m = self.members.get(s.node)
        if m is None or s.incarnation < m.incarnation or self._absurd(m, s.incarnation) \
                or self._above_signed(m, s.incarnation):
            return
        existing = self._suspicions.get(s.node)
        if existing is not None:
            if s.incarnation == existing.incarnation and existing.confirm(s.source):
                self.history.record(SUSPECT_CONFIRMED, now, s.node, s.source,
                                    self.awareness.score, incarnation=s.incarnation,
                                    confirmations=existing.confirmations,
                                    timeout=existing.timeout(), via=via)
                # Re-gossip so others count this independent confirmation too.
                self._queue_member(s)
            return
        if m.status != Status.ALIVE:
            return
        if s.node == self.name:
            self._refute(s.incarnation, now, s.source)
            return
        self._queue_member(s)
        m.incarnation = s.incarnation
        self._set_status(now, m, Status.SUSPECT, "suspect")
        # Counted for /metrics: our own failed probes' accusations apart from the heard.
        self.stats["suspicions_raised" if s.source == self.name else "suspicions_heard"] += 1
        n = self.num_members()
        cfg = self.config
        k = cfg.suspicion_confirmations if cfg.lifeguard else 0
        if n - 2 < k:
            k = 0
        sus = self._suspicions[s.node] = Suspicion(
            start=now, incarnation=s.incarnation, accuser=s.source, k=k,
            min_timeout=cfg.suspicion_min(n),
            max_timeout=cfg.suspicion_max(n) if cfg.lifeguard else cfg.suspicion_min(n))
        self.history.record(SUSPECT_RAISED if s.source == self.name else SUSPECT_HEARD,
                            now, s.node, s.source, self.awareness.score,
                            incarnation=s.incarnation, confirmations=0,
                            timeout=sus.timeout(), via=via)

    def _on_dead(self, now: float, d: Dead, local: bool = False) -> None:
        """A dead (``local``: our own suspicion of the member expired)."""
        m = self.members.get(d.node)
        if m is None or d.incarnation < m.incarnation or self._absurd(m, d.incarnation):
            return
        # A leave of ours above what we signed is a previous life's, as version-1
        # members hold it after a graceful restart: while they may still be around
        # (prefer), outbid it as they expect. Anything else above it is forged.
        previous_life = (d.node == d.source == self.name and self.identity.mode == "prefer")
        if not previous_life and self._above_signed(m, d.incarnation):
            return
        if not m.live:
            return
        if d.source == d.node and m.cred is not None and d.node != self.name:
            # A leave is the member's own word: only its signed leave counts.
            self.stats["leaves_unsigned_refused"] += 1
            return
        if d.node == self.name:
            if not self.leaving:
                self._refute(d.incarnation, now, d.source)
            return
        if m.cred is not None and not local and d.source != d.node:
            s = self._suspicions.get(d.node)
            if s is None or now - s.start < s.min:
                # A bound member is failed only by a suspicion that ran its course: a
                # third party's dead before our own suspicion's minimum is one more
                # accusation, so repeating it cannot keep the member down.
                self.stats["deads_taken_as_suspicion"] += 1
                self._on_suspect(now, Suspect(d.incarnation, d.node, d.source), "dead")
                return
        self._suspicions.pop(d.node, None)
        self._queue_member(d)
        m.incarnation = d.incarnation
        if d.source == d.node:
            self.history.record(LEFT_HEARD, now, d.node, d.source, self.awareness.score,
                                incarnation=d.incarnation)
            self._set_status(now, m, Status.LEFT, "left")
        else:
            if not local:
                self.history.record(DEAD_HEARD, now, d.node, d.source,
                                    self.awareness.score, incarnation=d.incarnation)
            self._set_status(now, m, Status.DEAD, "failed")

    def _refute(self, accused: int, now: float | None = None, by: str = "") -> None:
        """We are accused (suspect/dead) or misrepresented: outbid the accusation.
        Within a datagram the refutation waits for its end (``receive``), so one packet
        of rising accusations costs one refutation and one signature, not hundreds.
        ``now`` and ``by`` (the accuser) are for the history; the deferred call at the
        datagram's end has neither and uses those its accusations left."""
        if self._refute_in_packet is not None:
            if accused >= self._refute_in_packet:
                self._refute_at, self._refute_by = self.history.clock, by
                if now is not None:
                    self._refute_at = now
            self._refute_in_packet = max(self._refute_in_packet, accused)
            return
        if now is None:
            now, by = self._refute_at, self._refute_by
        self._set_incarnation(max(self.incarnation, accused) + 1, now, "refuted")
        self.stats["refutations"] += 1
        self.history.record(REFUTED, now, self.name, self.name, self.awareness.score,
                            accused=accused, accuser=by, incarnation=self.incarnation)
        self._health(now, 1, "refuted an accusation")
        self._queue_self()

    def _expire_suspicions(self, now: float) -> None:
        for name, s in list(self._suspicions.items()):
            if now < s.deadline():
                continue
            del self._suspicions[name]
            m = self.members.get(name)
            if m is not None and m.status == Status.SUSPECT and m.incarnation == s.incarnation:
                self.stats["failures_declared"] += 1
                self.history.record(DECLARED_DEAD, now, name, self.name,
                                    self.awareness.score, incarnation=s.incarnation,
                                    after=now - s.start, confirmations=s.confirmations)
                self._on_dead(now, Dead(s.incarnation, name, self.name), local=True)

    def _above_signed(self, m: Member, incarnation: int) -> bool:
        """True (and counted) if an accusation about ``m`` names an incarnation above
        the highest one ``m`` signed: only a forger can have sent it, and taking it
        would leave ``m`` unable to refute by one (it never signed that number)."""
        if m.cred is not None and incarnation > m.incarnation:
            self.stats["accusations_above_signed"] += 1
            return True
        return False

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
