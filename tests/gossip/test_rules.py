"""The alive / suspect / dead / refute rules, on cores and a virtual network."""

from __future__ import annotations

import random

import pytest

from rumor.gossip.config import LAN
from rumor.gossip.membership import Membership
from rumor.gossip.wire import (
    EMPTY_META,
    MemberState,
    PushPull,
    Status,
    Suspect,
)

from ..fakenet import FakeNet

# The rules are tested on names taken as given; admission has its own tests.
CFG = LAN.with_overrides(reconnect_interval=5.0, admit_by_ping=False)


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


def test_core_counts_suspicions_it_raised_apart_from_those_it_heard() -> None:
    c = Membership("me", ("10.0.0.1", 1), CFG, random.Random(1))
    from rumor.gossip.wire import Alive
    for i in range(4):
        c._on_alive(0.0, Alive(1, f"p{i}", ("10.0.0.9", i + 10), {}))
    c._on_suspect(0.0, Suspect(1, "p0", "me"), "probe")
    c._on_suspect(0.0, Suspect(1, "p1", "p2"))
    c._on_suspect(0.1, Suspect(1, "p1", "p3"))  # a confirmation, not a new suspicion
    c._on_suspect(0.1, Suspect(1, "me", "p2"))  # of us: refuted, not counted
    assert (c.stats["suspicions_raised"], c.stats["suspicions_heard"]) == (1, 1)
    assert c.stats["refutations"] == 1


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


def _core(seed: int, name: str = "me") -> Membership:
    return Membership(name, ("10.0.0.1", 1), CFG, random.Random(seed))


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
