"""Push-pull, join, leave, reconnect and reap."""

from __future__ import annotations

import hashlib
import random

import pytest

from rumor.gossip.config import LAN
from rumor.gossip.delegate import Delegate
from rumor.gossip.membership import Membership
from rumor.gossip.wire import (
    Dead,
    MemberState,
    PushPull,
    Status,
)

from ..fakenet import FakeNet

# The rules are tested on names taken as given; admission has its own tests.
CFG = LAN.with_overrides(reconnect_interval=5.0, admit_by_ping=False)


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


def _core(seed: int, name: str = "me") -> Membership:
    return Membership(name, ("10.0.0.1", 1), CFG, random.Random(seed))


def _snapshot(c: Membership) -> tuple[object, ...]:
    members = [(m.name, m.addr, m.incarnation, m.status, m.since, dict(m.meta))
               for m in c.members.values()]
    return (members, list(c._roster), list(c._probe_order), c._probe_index,
            sorted(c._down), c.num_live(), c.incarnation, len(c._member_q),
            sorted(c._suspicions), c.rng.getstate(), c.take_effects())


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


# ---- anti-entropy on demand -------------------------------------------------------------


class _SetDelegate(Delegate):
    """A replicated set of words: broadcast on add, exchanged whole in push-pull."""

    channel = "words"

    def __init__(self, core: Membership) -> None:
        self.core = core
        self.words: set[str] = set()

    def add(self, now: float, word: str, spread: bool = True) -> None:
        self.words.add(word)
        if spread:
            self.core.broadcast(now, self.channel, word.encode())

    def state_digest(self) -> int:
        d = 0
        for w in self.words:
            d ^= int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "big")
        return d

    def local_state(self, join: bool) -> bytes:
        return "\n".join(sorted(self.words)).encode()

    def merge_remote_state(self, now: float, data: bytes, join: bool, peer: str) -> None:
        self.words.update(w for w in data.decode().split("\n") if w)

    def notify_message(self, now: float, payload: bytes) -> None:
        if payload.decode() not in self.words:
            self.add(now, payload.decode())


def _word_cluster(cfg: object, n: int = 5) -> tuple[FakeNet, dict[str, _SetDelegate]]:
    net = FakeNet(cfg)  # type: ignore[arg-type]
    sets = {}
    for core in net.cluster(n):
        sets[core.name] = _SetDelegate(core)
        core.register(sets[core.name])
    net.run(2)
    return net, sets


def test_a_member_the_epidemic_missed_is_repaired_within_a_second_or_two() -> None:
    """Everyone but n4 holds a word (as if no copy had reached it): the digests in the
    probes tell, and n4 pulls at once instead of waiting for the 30 s push-pull."""
    net, sets = _word_cluster(CFG)
    started = net.now
    for name in ("n0", "n1", "n2", "n3"):
        sets[name].add(net.now, "late", spread=False)
    took = net.run_until(lambda: "late" in sets["n4"].words, limit=10)
    assert took < 1.0 + CFG.repair_after(5) + CFG.probe_interval
    repairs = {n: c.stats["state_repairs"] for n, c in net.nodes.items()}
    assert repairs["n4"] >= 1, repairs  # the one behind asked (its state was older)
    assert net.now - started < 30


def test_without_repair_the_straggler_waits_for_the_periodic_push_pull() -> None:
    net, sets = _word_cluster(CFG.with_overrides(state_repair=False))
    for name in ("n0", "n1", "n2", "n3"):
        sets[name].add(net.now, "late", spread=False)
    net.run(10)
    assert "late" not in sets["n4"].words
    assert all(c.stats["state_repairs"] == 0 for c in net.nodes.values())


def test_a_spreading_change_starts_no_repair() -> None:
    """Differences while a broadcast is still on its way are the epidemic's business:
    a word added normally reaches everyone with no repair exchange."""
    net, sets = _word_cluster(CFG)
    for i in range(5):
        sets[f"n{i}"].add(net.now, f"w{i}")
        net.flush(f"n{i}")
        net.run(3)
    assert all(s.words == {f"w{i}" for i in range(5)} for s in sets.values())
    assert sum(c.stats["state_repairs"] for c in net.nodes.values()) == 0


def test_a_difference_no_exchange_settles_is_not_retried() -> None:
    """n4 refuses one word (as an agent refuses a document it does not trust): one
    repair is tried for that pair of summaries, then no more."""
    net, sets = _word_cluster(CFG)
    original = sets["n4"].merge_remote_state

    def picky(now: float, data: bytes, join: bool, peer: str) -> None:
        original(now, data.replace(b"untrusted", b""), join, peer)
    sets["n4"].merge_remote_state = picky  # type: ignore[method-assign]
    for name in ("n0", "n1", "n2", "n3"):
        sets[name].add(net.now, "untrusted", spread=False)
    net.run(20)
    assert "untrusted" not in sets["n4"].words
    assert net.nodes["n4"].stats["state_repairs"] == 1
    assert sum(c.stats["state_repairs"] for c in net.nodes.values()) <= 2


def test_a_member_that_missed_a_tag_change_is_repaired_too() -> None:
    """n0 changes its tags while every datagram to n4 is lost: once they flow again,
    the live members' tags in the digest tell n4 it is behind, long before the
    periodic push-pull."""
    net, _ = _word_cluster(CFG)
    net.drop_udp = lambda s, d: d == "n4"
    net.nodes["n0"].set_meta(net.now, {"role": "db"})
    net.flush("n0")
    net.run_until(lambda: all(net.nodes[o].members["n0"].meta.get("role") == "db"
                              for o in ("n1", "n2", "n3")), limit=5)
    net.run(2)  # the retransmits are spent
    assert net.nodes["n4"].members["n0"].meta.get("role") is None
    net.drop_udp = lambda s, d: False
    took = net.run_until(lambda: net.nodes["n4"].members["n0"].meta.get("role") == "db",
                         limit=10)
    assert took < 1.0 + CFG.repair_after(5) + CFG.probe_interval
    assert net.nodes["n4"].stats["state_repairs"] >= 1


def test_the_membership_summary_ignores_suspicion_and_refutation() -> None:
    """Only liveness and tags count: a suspect is still live, and a refutation raises
    the incarnation without changing the summary, so neither starts a repair."""
    net, _ = _word_cluster(CFG)
    n1 = net.nodes["n1"]
    before = n1._member_sum
    n1._refute(n1.incarnation)
    assert n1._member_sum == before
    n0 = net.nodes["n0"]
    from rumor.gossip.wire import Suspect
    start = n0._member_sum
    n0._on_suspect(net.now, Suspect(n0.members["n2"].incarnation, "n2", "n3"))
    assert n0.members["n2"].status == Status.SUSPECT
    assert n0._member_sum == start


@pytest.mark.parametrize("seed", range(12))
def test_members_leaving_together_are_all_seen_leaving(seed: int) -> None:
    """Four of five agents leave at the same moment (a host shutting down): nobody is
    left to relay, so each leaver tells the others directly; the one that stays must
    list every one of them as left, never suspect or failed."""
    cfg = CFG.with_overrides(retransmit_mult=3)  # the local profile's count
    net = FakeNet(cfg, seed=seed)
    net.cluster(5)
    leavers = ["n1", "n2", "n3", "n4"]
    for name in leavers:
        net.nodes[name].leave(net.now)
        net.flush(name)
    net.run_until(lambda: all(n in net.left for n in leavers), limit=5)
    for name in leavers:
        net.crash(name)  # the processes exit once their leave is sent
    net.run(30)
    assert {n: net.status("n0", n) for n in leavers} == dict.fromkeys(leavers, "left")


def test_a_dead_seed_does_not_hold_a_join_that_another_seed_answered() -> None:
    """One seed answers at once, the other never (a host that is down): the join
    reports after ``join_grace``, not after the dead seed's stream timeout."""
    net = FakeNet(CFG)
    net.cluster(3)
    net.pause("n2")  # its TCP accepts, then nothing: the exchange runs to its timeout
    c = net.add("late")
    c.join(net.now, [net.nodes["n2"].addr, net.nodes["n0"].addr])
    net.flush("late")
    took = net.run_until(lambda: "late" in net.joins, limit=30)
    assert net.joins["late"].contacted == 1
    assert took <= CFG.join_grace + 0.1 < CFG.stream_timeout
    net.resume("n2")
    net.run_until(lambda: all(net.status(o, "late") == "alive" for o in net.nodes), limit=20)
