"""Dissemination: broadcasts piggybacked on every datagram and gossiped to a few
random members each gossip interval, retransmitted a bounded number of times
(memberlist's ``retransmit_mult * ceil(log10(n + 1))``), with application broadcasts
given a fair share of every packet.
"""

from __future__ import annotations

from .core_base import CoreBase
from .effects import (
    SendPacket,
)
from .members import Member
from .trace import GossipTrace, digest
from .wire import (
    PACKET_OVERHEAD,
    Address,
    Alive,
    Dead,
    Message,
    Status,
    Suspect,
    encode_packet_raw,
    pack_message,
)


class Dissemination(CoreBase):
    """Gossip and packet packing (a part of ``Membership``)."""

    trace: GossipTrace | None

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

    def _send(self, now: float, addr: Address, to: str, msgs: list[Message],
              piggyback: bool = True) -> None:
        """Send ``msgs`` in one datagram to member ``to`` at ``addr``, filling the rest
        with broadcasts (unless ``piggyback`` is off: an admission ping goes to a name
        nobody vouched for, and would spend the broadcasts' transmits on it).

        Application broadcasts get up to half of the free space first, so catalog and
        policy updates are never starved by membership churn; membership updates fill
        the rest, then application broadcasts take whatever is still free."""
        parts = [pack_message(m) for m in msgs]
        if self._delegates and self.config.state_repair:
            parts.append(pack_message(self._digest(now)))
        if not piggyback:
            self._put_datagram(now, addr, parts, to)
            return
        budget = self._datagram_budget() - sum(map(len, parts))
        n = self.num_members()
        limit = self.config.retransmit_limit(n)
        user_limit = self.config.user_retransmit_limit(n)
        user_seen: set[int] = set()  # never the same application message twice per packet
        user: list[bytes] = []
        if self._user_q:
            user = self._user_q.take(budget // 2, user_limit, user_seen)
            parts += user
            budget -= sum(map(len, user))
        if self._member_q:
            got = self._member_q.take(budget, limit)
            parts += got
            budget -= sum(map(len, got))
        if self._user_q:
            more = self._user_q.take(budget, user_limit, user_seen)
            parts += more
            user += more
        if user:
            self.stats["user_messages_out"] += len(user)
            if self.trace is not None:
                self.trace("out", to, [digest(u) for u in user])
        self._put_datagram(now, addr, parts, to)

    def _put_datagram(self, now: float, addr: Address, parts: list[bytes],
                      to: str = "") -> None:
        if not parts:
            return
        data = self.seal.seal(now, encode_packet_raw(parts), to)
        self.stats["packets_out"] += 1
        self.stats["bytes_out"] += len(data)
        self._effects.append(SendPacket(addr, data))

    def _queue_member(self, msg: Alive | Suspect | Dead, news: bool = False) -> None:
        """Queue a membership message. ``news`` (new tags, which an operator waits on
        like a registration) goes halfway from the membership count to the
        application one: with the digest repair behind it that keeps a cluster-wide
        tag change under a second, and the full application count would take packet
        room from the catalog changes that usually come with it (measured in
        ``rumor sim``: 30 nodes retagging and re-registering at once, 100 rounds)."""
        if self._quiet:
            return
        self._member_q.push(pack_message(msg), msg.node, self._news_extra() if news else 0)

    def _news_extra(self) -> int:
        """The extra transmits of membership news (see ``_queue_member``)."""
        n = self.num_members()
        return max(0, self.config.user_retransmit_limit(n)
                   - self.config.retransmit_limit(n)) // 2

    def _self_alive(self) -> Alive:
        return Alive(self.incarnation, self.name, self.addr, dict(self.members[self.name].meta))
