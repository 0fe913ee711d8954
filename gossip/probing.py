"""Failure detection: one probe per period, indirect probes, relays for others.

SWIM's probe in a shuffled round-robin order (time-bounded completeness), with
Lifeguard's local-health scaling of the probe window, nacks from the indirect
helpers, and the buddy system (a suspect is told in the very ping that tests it). A
probe that gets no ack starts a suspicion (``rules.py``).
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass

from .core_base import CoreBase
from .effects import (
    Notice,
)
from .history import PROBE_DIRECT_FAILED, PROBE_INDIRECT_FAILED, PROBE_TCP_ONLY
from .members import Member
from .wire import (
    Ack,
    Address,
    IndirectPing,
    Message,
    Nack,
    Ping,
    Status,
    Suspect,
    encode_packet,
)

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
    #: The members asked to probe indirectly (for the history).
    helpers: tuple[str, ...] = ()


@dataclass(slots=True)
class _Relay:
    """An indirect probe we perform for someone else."""

    requester: Address
    requester_name: str
    seq: int
    want_nack: bool
    deadline: float


class Probing(CoreBase):
    """Probes, indirect probes and relays (a part of ``Membership``)."""

    #: This round's shuffled probe order, and how far the round has got.
    _probe_order: list[str]
    _probe_index: int
    #: The probe in flight, and the indirect probes we run for others (by our seq).
    _probe: _Probe | None
    _relays: dict[int, _Relay]

    def _on_ping(self, now: float, source: Address, m: Ping, news: bool = True) -> None:
        """Answer a ping; the answer carries broadcasts only if the ping did (``news``).
        A member pinged by many at once (a new one that everyone admits, which pings
        bare, ``admission.py``) would otherwise spend its broadcasts' transmits on
        whoever pinged it, rather than on random members, and an epidemic needs
        random targets: a 60-node cold start took 20-40 s instead of 2 s in a third
        of the seeds (``rumor sim converge --loss 0.02``). A probe that carries news
        (a suspicion: Lifeguard's buddy system) still gets the refutation back in the
        ack."""
        if m.target != self.name:
            self.stats["pings_misdirected"] += 1
            return
        if not news:
            self.stats["acks_bare"] += 1
        self._send(now, source, m.source, [Ack(m.seq)], piggyback=news)

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

    def _start_probe(self, now: float) -> None:
        cfg = self.config
        self.history.clock = now
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
        p.helpers = tuple(h.name for h in chosen)
        self.history.record(PROBE_DIRECT_FAILED, now, p.target, self.name,
                            self.awareness.score, after=now - p.sent, helpers=p.helpers)
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
            if self.awareness.score:
                self._health(now, -1, f"probe of {p.target} acked")
            return
        target = self.members.get(p.target)
        if target is None or not target.live:
            return
        if p.tcp_ok:
            self.stats["probes_rescued_by_tcp"] += 1
            self.history.record(PROBE_TCP_ONLY, now, p.target, self.name,
                                self.awareness.score, after=now - p.sent)
            self._effects.append(Notice(
                "udp-blocked",
                f"member {p.target} answered a TCP ping but no UDP probe: "
                "is UDP blocked on its port?", p.target))
            return
        self.stats["probes_failed"] += 1
        self.history.record(PROBE_INDIRECT_FAILED, now, p.target, self.name,
                            self.awareness.score, after=now - p.sent, helpers=p.helpers,
                            nacks=p.nacks, expected_nacks=p.expected_nacks,
                            tcp=int(p.tcp_exchange is not None))
        if self.config.lifeguard:
            delta = p.expected_nacks - p.nacks if p.expected_nacks > 0 else 1
            self._health(now, max(delta, 0), f"probe of {p.target} failed "
                         f"({p.nacks} of {p.expected_nacks} nacks)")
        self._on_suspect(now, Suspect(target.incarnation, target.name, self.name), "probe")

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
        ``tests/gossip/test_probing.py`` checks that both draw the same."""
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
