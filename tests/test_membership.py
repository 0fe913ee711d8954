"""Unit tests of the SWIM/Lifeguard core on a deterministic virtual clock."""

from __future__ import annotations

import math
import random

import pytest

from rumor.gossip.config import LAN, LOCAL
from rumor.gossip.delegate import Delegate
from rumor.gossip.membership import Membership
from rumor.gossip.queue import BroadcastQueue
from rumor.gossip.suspicion import Suspicion
from rumor.gossip.wire import (
    EMPTY_META,
    Dead,
    MemberState,
    Ping,
    PushPull,
    Status,
    Suspect,
    decode_packet,
)

from .fakenet import FakeNet

CFG = LAN.with_overrides(reconnect_interval=5.0)


def test_cluster_converges_and_probes_measure_rtt() -> None:
    net = FakeNet(CFG, latency=0.002)
    cores = net.cluster(5)
    net.run(10)
    for c in cores:
        assert all(m.status == Status.ALIVE for m in c.members.values())
        peers = [m for m in c.members.values() if m.name != c.name]
        # 10 probe periods over 4 peers: every peer probed, RTT is two one-way hops.
        assert all(m.rtt is not None and m.rtt == pytest.approx(0.004) for m in peers)
        assert c.stats["probes_failed"] == 0


def test_probe_order_is_round_robin() -> None:
    """SWIM's time-bounded completeness: every member is probed once per round."""
    net = FakeNet(CFG)
    cores = net.cluster(6)
    c = cores[0]
    pings: list[str] = []
    original = net._send

    def spy(src, e):  # type: ignore[no-untyped-def]
        if src == c.name:
            for m in decode_packet(e.data):
                if isinstance(m, Ping) and m.source == c.name:
                    pings.append(m.target)
        original(src, e)
    net._send = spy  # type: ignore[method-assign]
    net.run(25)
    rounds = [pings[i:i + 5] for i in range(0, 20, 5)]
    assert len(pings) >= 20
    for r in rounds:
        assert sorted(r) == ["n1", "n2", "n3", "n4", "n5"]


def test_indirect_probe_keeps_member_alive_when_direct_path_fails() -> None:
    cfg = CFG.with_overrides(tcp_fallback_probe=False)
    net = FakeNet(cfg)
    net.cluster(5)
    # n0 and n4 cannot exchange datagrams directly; the others relay.
    net.drop_udp = lambda s, d: {s, d} == {"n0", "n4"}
    net.run(30)
    assert net.status("n0", "n4") == "alive"
    assert net.nodes["n0"].stats["probes_failed"] == 0
    assert not [e for _, _, e in net.events if e.kind in ("suspect", "failed")]


def test_tcp_ping_rescues_member_whose_udp_is_blocked() -> None:
    net = FakeNet(CFG.with_overrides(indirect_checks=0))
    net.cluster(4)
    net.drop_udp = lambda s, d: "n3" in (s, d)
    net.run(20)
    for n in ("n0", "n1", "n2"):
        assert net.status(n, "n3") == "alive"
    assert any(nt.code == "udp-blocked" and nt.member == "n3" for _, _, nt in net.notices)


def test_crash_is_suspected_then_failed_everywhere_within_bound() -> None:
    net = FakeNet(CFG)
    net.cluster(8)
    net.run(5)
    net.crash("n7")
    n = 8
    # Wait for one full probe round of the slowest prober, then the longest
    # suspicion timeout, plus gossip time.
    bound = (n - 1) * CFG.probe_interval + CFG.suspicion_max(n) + 2
    took = net.run_until(lambda: all(net.status(o, "n7") == "failed"
                                     for o in net.live_names()), limit=bound)
    kinds = [e.kind for _, _, e in net.events if e.name == "n7"]
    assert "suspect" in kinds and "failed" in kinds
    # Independent confirmations shrink the timeout: far below the maximum.
    assert took < CFG.suspicion_max(n)


def test_paused_member_refutes_suspicion_with_higher_incarnation() -> None:
    net = FakeNet(CFG)
    net.cluster(6)
    net.run(3)
    before = net.nodes["n5"].incarnation
    net.pause("n5")
    net.run_until(lambda: any(net.status(o, "n5") == "suspect" for o in net.nodes
                              if o != "n5"), limit=20)
    net.run(1.0)  # well below the minimum suspicion timeout (4 s)
    net.resume("n5")
    net.run(10)
    assert net.nodes["n5"].incarnation > before
    for o in net.nodes:
        assert net.status(o, "n5") == "alive"
    assert not [e for _, _, e in net.events if e.name == "n5" and e.kind == "failed"]


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    s = Suspicion(start=0.0, incarnation=1, accuser="a", k=3, min_timeout=2.0,
                  max_timeout=12.0)
    assert s.timeout() == 12.0
    assert not s.confirm("a"), "the accuser does not confirm itself"
    timeouts = []
    for src in ("b", "c", "d"):
        assert s.confirm(src)
        timeouts.append(s.timeout())
    assert not s.confirm("b") and not s.confirm("e"), "duplicates and extras ignored"
    assert timeouts[0] == pytest.approx(12 - 10 * math.log(2) / math.log(4))
    assert timeouts == sorted(timeouts, reverse=True)
    assert timeouts[-1] == 2.0


def test_core_counts_confirmations_from_distinct_accusers() -> None:
    c = Membership("me", ("10.0.0.1", 1), CFG, random.Random(1))
    from rumor.gossip.wire import Alive
    for i in range(6):
        c._on_alive(0.0, Alive(1, f"p{i}", ("10.0.0.9", i + 10), {}))
    c._on_suspect(0.0, Suspect(1, "p0", "p1"))
    s = c.suspicion("p0")
    assert s is not None
    first = s.deadline()
    c._on_suspect(0.1, Suspect(1, "p0", "p2"))
    c._on_suspect(0.2, Suspect(1, "p0", "p2"))  # same source: no extra effect
    assert s.confirmations == 1 and s.deadline() < first


def test_graceful_leave_is_seen_as_left() -> None:
    net = FakeNet(CFG)
    net.cluster(5)
    net.nodes["n2"].leave(net.now)
    net.flush("n2")
    net.run_until(lambda: "n2" in net.left, limit=5)
    net.crash("n2")  # the process exits after leaving
    net.run(3)
    for o in net.live_names():
        assert net.status(o, "n2") == "left"
    assert not [e for _, _, e in net.events if e.name == "n2" and e.kind == "failed"]


def test_failed_member_is_reaped_after_timeout() -> None:
    cfg = CFG.with_overrides(reap_failed_after=60.0, reconnect_interval=5.0)
    net = FakeNet(cfg)
    net.cluster(4)
    net.crash("n3")
    net.run_until(lambda: all(net.status(o, "n3") == "failed" for o in net.live_names()),
                  limit=40)
    net.run(70)
    for o in net.live_names():
        assert net.status(o, "n3") is None
    assert any(e.kind == "reap" and e.name == "n3" for _, _, e in net.events)


def test_restarted_member_rejoins_with_higher_incarnation() -> None:
    net = FakeNet(CFG)
    net.cluster(4)
    net.crash("n3")
    net.run_until(lambda: all(net.status(o, "n3") == "failed" for o in net.live_names()),
                  limit=40)
    old = net.nodes["n0"].members["n3"].incarnation
    # Same name and address, fresh state.
    addr = net.nodes["n3"].addr
    fresh = Membership("n3", addr, CFG, random.Random(99), now=net.now)
    net.nodes["n3"] = fresh
    net.crashed.discard("n3")
    fresh.join(net.now, [net.nodes["n0"].addr])
    net.flush("n3")
    net.run_until(lambda: all(net.status(o, "n3") == "alive" for o in net.nodes), limit=10)
    assert fresh.incarnation > old
    assert net.joins["n3"].contacted == 1


def test_partition_heals_through_reconnect() -> None:
    net = FakeNet(CFG.with_overrides(reconnect_interval=2.0))
    net.cluster(6)
    left, right = {"n0", "n1", "n2"}, {"n3", "n4", "n5"}

    def split(s: str, d: str) -> bool:
        return (s in left) != (d in left)
    net.drop_udp = split
    net.drop_tcp = split
    net.run_until(lambda: all(net.status(a, b) == "failed" for a in left for b in right)
                  and all(net.status(b, a) == "failed" for a in left for b in right),
                  limit=120)
    net.drop_udp = lambda s, d: False
    net.drop_tcp = lambda s, d: False
    took = net.run_until(lambda: all(net.status(a, b) == "alive"
                                     for a in net.nodes for b in net.nodes), limit=120)
    assert took < 60


def test_join_retries_with_backoff_then_reports_failure() -> None:
    cfg = CFG.with_overrides(join_attempts=3, join_backoff=1.0)
    net = FakeNet(cfg)
    c = net.add("lonely")
    c.join(net.now, [("10.9.9.9", 7946)])
    net.flush("lonely")
    net.run_until(lambda: "lonely" in net.joins, limit=10)
    res = net.joins["lonely"]
    assert res.contacted == 0 and res.errors == ("10.9.9.9:7946: no answer after 3 attempt(s)",)
    assert net.now == pytest.approx(1.0 + 2.0 + 3 * net.latency, abs=0.01)


def test_join_reaches_seed_started_late() -> None:
    net = FakeNet(CFG.with_overrides(join_backoff=1.0))
    a = net.add("a")
    b = net.add("b")
    net.crash("a")
    b.join(net.now, [a.addr])
    net.flush("b")
    net.run(0.5)
    net.crashed.discard("a")
    net.run_until(lambda: "b" in net.joins, limit=10)
    assert net.joins["b"].contacted == 1


def test_metadata_change_raises_incarnation_and_spreads() -> None:
    net = FakeNet(CFG)
    net.cluster(4)
    inc = net.nodes["n1"].incarnation
    net.nodes["n1"].set_meta(net.now, {"zone": "b"})
    net.flush("n1")
    net.run_until(lambda: all(net.nodes[o].members["n1"].meta == {"zone": "b"}
                              for o in net.nodes), limit=5)
    assert net.nodes["n1"].incarnation == inc + 1
    with pytest.raises(ValueError, match="limit"):
        net.nodes["n1"].set_meta(net.now, {"x": "y" * 600})


class _Echo(Delegate):
    """Re-broadcasts what is new to it, as real delegates (catalog, policy) do."""

    channel = "echo"

    def __init__(self, core: Membership | None = None) -> None:
        self.core = core
        self.got: list[bytes] = []
        self.state = b""
        self.merged: list[bytes] = []

    def notify_message(self, now: float, payload: bytes) -> None:
        if payload not in self.got and self.core is not None:
            self.core.broadcast(now, self.channel, payload, key=payload[:8].hex())
        self.got.append(payload)

    def local_state(self, join: bool) -> bytes:
        return self.state

    def merge_remote_state(self, now: float, data: bytes, join: bool, peer: str) -> None:
        self.merged.append(data)


def test_delegate_broadcasts_small_and_large_and_push_pull_state() -> None:
    net = FakeNet(CFG.with_overrides(push_pull_interval=5.0))
    cores = net.cluster(4)
    ds = {}
    for c in cores:
        d = _Echo(c)
        c.register(d)
        ds[c.name] = d
    ds["n0"].state = b"state-of-n0"
    cores[0].broadcast(net.now, "echo", b"small")
    cores[0].broadcast(net.now, "echo", b"L" * 5000)  # too big for a datagram
    net.flush("n0")
    net.run(12)
    assert all(b"small" in ds[n].got for n in ("n1", "n2", "n3"))
    # Large messages go by stream to gossip_nodes members (3 of 3 here).
    assert all(b"L" * 5000 in ds[n].got for n in ("n1", "n2", "n3"))
    assert any(b"state-of-n0" in ds[n].merged for n in ("n1", "n2", "n3"))
    with pytest.raises(ValueError):
        cores[0].register(_Echo())


def test_application_broadcasts_get_a_fair_share_of_packets() -> None:
    c = Membership("me", ("10.0.0.1", 1), CFG, random.Random(1))
    from rumor.gossip.wire import Alive
    for i in range(200):  # flood the membership queue
        c._on_alive(0.0, Alive(1, f"member-with-a-long-name-{i:04d}", ("10.0.0.9", i), {}))
    c.register(_Echo())
    c.broadcast(0.0, "echo", b"x" * 100)
    c.take_effects()
    c._send(0.0, ("10.0.0.2", 1), "peer", [])
    (pkt,) = [e for e in c.take_effects() if hasattr(e, "data")]
    msgs = decode_packet(pkt.data)  # type: ignore[union-attr]
    assert any(getattr(m, "channel", None) == "echo" for m in msgs)
    assert len(pkt.data) <= CFG.max_datagram  # type: ignore[union-attr]


# ---- broadcast queue ------------------------------------------------------------------


def test_queue_retransmit_limit_and_least_sent_first() -> None:
    q = BroadcastQueue()
    q.push(b"a" * 10, "a")
    assert q.take(100, limit=3) == [b"a" * 10]
    q.push(b"b" * 10, "b")
    # b was never sent: it goes first.
    assert q.take(15, limit=3) == [b"b" * 10]
    assert q.take(100, limit=3) == [b"b" * 10, b"a" * 10]
    assert q.take(100, limit=3) == [b"b" * 10, b"a" * 10]  # a hits its limit here
    assert q.take(100, limit=3) == []
    assert len(q) == 0


def test_queue_newer_update_replaces_older_and_capacity_is_bounded() -> None:
    q = BroadcastQueue(max_items=3)
    q.push(b"old-x", "x")
    q.push(b"new-x", "x")
    assert len(q) == 1 and q.take(100, 5) == [b"new-x"]
    q.push(b"y", "y")
    q.push(b"z", "z")
    q.push(b"w", None)
    assert len(q) == 3 and q.dropped == 1
    assert b"new-x" not in q.take(100, 5), "the most-sent item is dropped first"


def test_retransmit_limit_formula() -> None:
    assert LAN.retransmit_limit(1) == 4
    assert LAN.retransmit_limit(9) == 4
    assert LAN.retransmit_limit(10) == 8
    assert LAN.retransmit_limit(1000) == 16
    assert LAN.suspicion_min(10) == 4.0
    assert LAN.suspicion_max(100) == 48.0
    assert LAN.push_pull_period(32) == 30.0
    assert LAN.push_pull_period(64) == 60.0
    assert LOCAL.probe_interval < LAN.probe_interval


def test_lifeguard_off_uses_fixed_suspicion_and_no_awareness() -> None:
    cfg = CFG.with_overrides(lifeguard=False)
    net = FakeNet(cfg)
    net.cluster(6)
    net.crash("n5")
    net.run_until(lambda: any(net.status(o, "n5") == "suspect" for o in net.live_names()),
                  limit=20)
    c = next(net.nodes[o] for o in net.live_names() if net.status(o, "n5") == "suspect")
    s = c.suspicion("n5")
    assert s is not None and s.timeout() == cfg.suspicion_min(6)
    assert all(net.nodes[o].awareness.score == 0 for o in net.live_names())


def test_quiet_merge_learns_members_without_queueing_broadcasts() -> None:
    c = Membership("me", ("10.0.0.1", 1), CFG, random.Random(1))
    states = tuple(MemberState(f"p{i}", ("10.0.0.9", i + 10), 1, Status.ALIVE, {})
                   for i in range(40))
    c.merge_state(0.0, PushPull(False, "p0", states, {}), quiet=True)
    assert c.num_live() == 41 and len(c._member_q) == 0
    c.merge_state(0.0, PushPull(False, "p0", (MemberState("q", ("10.0.0.8", 1), 1,
                                                        Status.ALIVE, {}),), {}))
    assert len(c._member_q) == 1, "a normal merge spreads what it learnt"
    c.spread_push_pull(0.0)
    assert 0.0 <= c._push_pull_at <= CFG.push_pull_period(42)


# ---- fast paths: each must behave exactly like the general code it shortcuts ----------


def _core(seed: int, name: str = "me") -> Membership:
    return Membership(name, ("10.0.0.1", 1), CFG, random.Random(seed))


def _snapshot(c: Membership) -> tuple[object, ...]:
    members = [(m.name, m.addr, m.incarnation, m.status, m.since, dict(m.meta))
               for m in c.members.values()]
    return (members, list(c._roster), list(c._probe_order), c._probe_index,
            sorted(c._down), c.num_live(), c.incarnation, len(c._member_q),
            sorted(c._suspicions), c.rng.getstate(), c.take_effects())


@pytest.mark.parametrize("lo,size,new", [(0, 0, 20), (0, 0, 700), (3, 10, 40), (7, 7, 100),
                                         (0, 50, 16), (2, 30, 5)])
def test_batched_probe_order_insertion_draws_and_places_like_one_by_one(
        lo: int, size: int, new: int) -> None:
    a, b = _core(5), _core(5)
    for c in (a, b):
        c._probe_order = [f"old{i}" for i in range(size)]
        c._probe_index = lo
    names = [f"new{i}" for i in range(new)]
    for name in names:
        a._add_to_probe_order(name)
    b._add_many_to_probe_order(names)
    assert a._probe_order == b._probe_order
    assert a.rng.getstate() == b.rng.getstate()


def test_merge_fast_path_matches_the_general_path() -> None:
    """Without delegates, ``_merge`` skips rows it already knows and learns new members
    in a batch; with one (which may draw from the generator) every row takes the
    general path. Both must leave the same tables, queue, effects and generator."""

    def run(with_delegate: bool, quiet: bool) -> tuple[object, ...]:
        c = _core(9)
        if with_delegate:
            c.register(type("D", (Delegate,), {"channel": "x"})())
        for _ in range(3):  # some probing first, so the round is under way
            c.merge_state(0.0, PushPull(False, "p", tuple(
                MemberState(f"p{i}", ("10.0.1.1", i), 2, Status.ALIVE, {})
                for i in range(30)), {}), quiet=quiet)
        c._probe_index = 4
        c._on_dead(1.0, Dead(2, "p3", "accuser"))
        rows = [MemberState(f"q{i}", ("10.0.2.1", i), 1, Status.ALIVE, {"k": str(i)} if i % 3
                            else {}) for i in range(40)]
        rows[5:5] = [MemberState("p1", ("10.0.1.1", 1), 1, Status.ALIVE, {}),  # stale
                     MemberState("p2", ("10.0.1.1", 2), 3, Status.ALIVE, {"v": "2"}),
                     MemberState("p3", ("10.0.1.1", 3), 4, Status.ALIVE, {}),  # revives
                     MemberState("p4", ("10.0.1.1", 4), 2, Status.DEAD, {}),
                     MemberState("p5", ("10.0.1.1", 5), 2, Status.LEFT, {}),
                     MemberState("me", ("10.0.0.1", 1), 1, Status.ALIVE, {}),
                     MemberState("me", ("10.0.0.1", 1), 5, Status.ALIVE, {}),  # refute
                     MemberState("q7", ("10.0.2.1", 7), 1, Status.ALIVE, {})]  # twice
        c.merge_state(2.0, PushPull(False, "p", tuple(rows), {}), quiet=quiet)
        return _snapshot(c)

    for quiet in (False, True):
        fast, general = run(False, quiet), run(True, quiet)
        assert fast == general


def test_live_count_and_down_set_follow_every_status_change() -> None:
    cfg = CFG.with_overrides(reap_failed_after=40.0)
    net = FakeNet(cfg)
    net.cluster(6)
    net.nodes["n1"].leave(net.now)
    net.flush("n1")
    net.run(2)
    net.crash("n1")
    net.crash("n4")
    for limit in (25, 60):
        net.run(limit)
        for o in net.live_names():
            c = net.nodes[o]
            assert c.num_live() == sum(1 for m in c.members.values() if m.live)
            assert c._down == {n for n, m in c.members.items() if not m.live}
    assert all(net.status(o, "n4") is None for o in net.live_names())  # reaped


def test_members_without_metadata_share_one_read_only_map() -> None:
    c = _core(1)
    c.merge_state(0.0, PushPull(False, "p", (
        MemberState("a", ("10.0.0.2", 1), 1, Status.ALIVE, {}),
        MemberState("b", ("10.0.0.3", 1), 1, Status.ALIVE, {"role": "db"})), {}))
    assert c.members["a"].meta is EMPTY_META and c.members["me"].meta is EMPTY_META
    assert c.members["b"].meta == {"role": "db"}
    with pytest.raises(TypeError):
        c.members["a"].meta["x"] = "y"
    assert EMPTY_META == {}
