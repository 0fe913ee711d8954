"""The state every part of the membership core shares, and the small steps all of
them take: record a status change and tell the delegates, ask the driver for a stream,
seal a frame. ``Membership`` (membership.py) is this state plus its parts, one file
per concern as in memberlist:

* ``rules.py`` – the alive / suspect / dead rules, refutation, the table's limits;
* ``probing.py`` – probes, indirect probes and the relays we run for others;
* ``dissemination.py`` – piggybacked and periodic gossip, packing datagrams;
* ``anti_entropy.py`` – push-pull, join, reconnect and reaping.

The parts call each other through ``self``; the declarations at the end of the class
tell the type checker what each one may use of the others.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .awareness import Awareness
from .config import GossipConfig
from .delegate import Delegate
from .effects import (
    Effect,
    LeaveFinished,
    MemberEvent,
    Notice,
    StreamReply,
    StreamRequest,
)
from .fields import MAX_COUNTER
from .history import HEALTH, INCARNATION, MemberHistory
from .identity import Identity
from .members import Member
from .node_key import Credential
from .queue import BroadcastQueue
from .security import Seal
from .suspicion import Suspicion
from .wire import (
    Address,
    Alive,
    Dead,
    Digest,
    Message,
    SignedAlive,
    SignedLeave,
    Status,
    Suspect,
)

INF = math.inf


class CoreBase:
    """Attributes are set by ``Membership.__init__``; see there."""

    name: str
    addr: Address
    config: GossipConfig
    rng: random.Random
    seal: Seal
    identity: Identity
    awareness: Awareness
    #: The membership events this node took part in (``history.py``).
    history: MemberHistory
    stats: Counter[str]
    members: dict[str, Member]
    incarnation: int
    leaving: bool
    _quiet: bool
    _roster: list[str]
    _down: set[str]
    _effects: list[Effect]
    _member_q: BroadcastQueue
    _user_q: BroadcastQueue
    _delegates: dict[str, Delegate]
    _seq: int
    _exchange: int
    _exchanges: dict[int, str]
    _refused: set[str]
    _new_names: dict[str, tuple[float, float]]
    _exchange_peer: dict[int, str]
    #: The host each exchange went to (whose own push-pull may pin its key).
    _exchange_host: dict[int, str]
    _suspicions: dict[str, Suspicion]
    #: Bindings of members no longer in the table (``signed_state.py``).
    _remembered: dict[str, Credential]
    #: Names whose own push-pull we asked for to pin their key, by exchange.
    _pinning: set[str]
    _pin_exchanges: dict[int, str]
    #: The admission pings' token bucket (shared with pin exchanges): (tokens, at).
    _admission_tokens: tuple[float, float]
    #: XOR of every live member's (name, tags) hash and each one's part of it: the
    #: membership half of the anti-entropy summary (``anti_entropy.py``).
    _member_sum: int
    _member_parts: dict[str, int]
    _leave_deadline: float
    #: While a datagram is applied: the highest accusation to refute at its end.
    _refute_in_packet: int | None
    #: ... and when, by whom (for the history's record of the refutation).
    _refute_at: float = 0.0
    _refute_by: str = ""
    _probe_at: float
    _gossip_at: float
    _push_pull_at: float
    _reconnect_at: float

    def num_members(self) -> int:
        """Members we count for timeouts and retransmits (all but the forgotten)."""
        return len(self.members)

    def num_live(self) -> int:
        return len(self.members) - len(self._down)

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
        self._exchange_host[ex] = addr[0]
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
        self._note_member(m)
        ev = MemberEvent(kind, m.name, m.status, m.incarnation, m.addr, dict(m.meta))
        if not self._quiet:
            self._effects.append(ev)
        for d in self._delegates.values():
            d.notify_member(now, ev)

    def _note_member(self, m: Member) -> None:
        """Fold ``m``'s tags, while it is live, into ``_member_sum``. Every change of
        either passes ``_emit`` (set_meta calls this for our own), so the sum stays
        exact without a scan; the incarnation is left out, since a refutation raises
        it without an event. Members without tags add nothing and are not stored, so
        a 10,000-node simulation (no tags) pays nothing for it."""
        new = _member_hash(m.name, m.meta) if m.meta and m.status <= Status.SUSPECT else 0
        old = self._member_parts.pop(m.name, 0) if self._member_parts else 0
        if new:
            self._member_parts[m.name] = new
        self._member_sum ^= old ^ new

    def _finish_leave(self) -> None:
        if self._leave_deadline == -INF:
            return
        self._leave_deadline = -INF  # finished; never fire again
        self._effects.append(LeaveFinished())

    def _set_incarnation(self, incarnation: int, now: float | None = None,
                         why: str = "metadata changed") -> None:
        """Our new incarnation, never past the wire's cap (which the jump rule keeps out
        of reach: see ``_absurd``). ``now``: when (a command without one records at the
        history's latest time)."""
        old = self.incarnation
        self.incarnation = min(incarnation, MAX_COUNTER)
        self.members[self.name].incarnation = self.incarnation
        if self.incarnation != old:
            h = self.history
            h.record(INCARNATION, h.clock if now is None else now, self.name, self.name,
                     self.awareness.score, old=old, new=self.incarnation, why=why)

    def _health(self, now: float, delta: int, why: str) -> None:
        """Apply ``delta`` to our Lifeguard local-health score; a change is recorded
        (a successful probe at score 0, the usual case, records nothing)."""
        aw = self.awareness
        old = aw.score
        aw.apply(delta)
        if aw.score != old:
            self.history.record(HEALTH, now, self.name, self.name, aw.score,
                                old=old, new=aw.score, why=why)

    if TYPE_CHECKING:  # what the parts use of each other (defined in their files)

        def _send(self, now: float, addr: Address, to: str, msgs: list[Message],
                  piggyback: bool = True) -> None:
            raise NotImplementedError

        def _queue_member(self, msg: Alive | Suspect | Dead, news: bool = False) -> None:
            raise NotImplementedError

        def _digest(self, now: float) -> Digest:
            raise NotImplementedError

        def _self_alive(self) -> Alive:
            raise NotImplementedError

        def _random_members(self, k: int, now: float = 0.0,
                            include_recent_dead: bool = False) -> list[Member]:
            raise NotImplementedError

        def _on_alive(self, now: float, a: Alive) -> None:
            raise NotImplementedError

        def _on_suspect(self, now: float, s: Suspect, via: str = "gossip") -> None:
            raise NotImplementedError

        def _on_dead(self, now: float, d: Dead, local: bool = False) -> None:
            raise NotImplementedError

        def _room_for_one(self) -> bool:
            raise NotImplementedError

        def _accept_alive(self, now: float, a: Alive, sa: SignedAlive | None,
                          cred: Credential | None) -> None:
            raise NotImplementedError

        def _relay_alive(self, a: Alive, sa: SignedAlive | None, news: bool) -> None:
            raise NotImplementedError

        def _queue_self(self, news: bool = False, credential: bool = False) -> None:
            raise NotImplementedError

        def _queue_signed(self, m: SignedAlive | SignedLeave, news: bool = False) -> None:
            raise NotImplementedError

        def _pending_done(self, name: str) -> None:
            raise NotImplementedError

        def _admission_needed(self) -> bool:
            raise NotImplementedError

        def _admit_later(self, now: float, a: Alive) -> None:
            raise NotImplementedError

        def _identity_state(self, budget: int = ...) -> bytes | None:
            raise NotImplementedError

        def _merge_identity(self, now: float, data: bytes, host: str, source: str) -> None:
            raise NotImplementedError

        def _signed_leave(self, d: Dead) -> SignedLeave | None:
            raise NotImplementedError

        def _push_pull_body(self, join: bool) -> bytes:
            raise NotImplementedError

        def _news_extra(self) -> int:
            raise NotImplementedError

        def _pin_later(self, now: float, name: str, addr: Address) -> None:
            raise NotImplementedError

        def _add_to_probe_order(self, name: str) -> None:
            raise NotImplementedError

        def _add_many_to_probe_order(self, names: list[str]) -> None:
            raise NotImplementedError


def _member_hash(name: str, meta: Mapping[str, str]) -> int:
    """A stable 64-bit hash of a member's name and tags (the same in every process:
    Python's own ``hash`` is salted per process)."""
    h = hashlib.blake2b(name.encode(), digest_size=8)
    for k in sorted(meta):
        h.update(b"\0" + k.encode() + b"=" + meta[k].encode())
    return int.from_bytes(h.digest(), "big") or 1
