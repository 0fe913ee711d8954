"""Probing: round-robin order, RTTs, indirect probes, the TCP fallback."""

from __future__ import annotations

import random

import pytest

from rumor.gossip.config import LAN
from rumor.gossip.membership import Membership
from rumor.gossip.wire import (
    Ping,
    Status,
    decode_packet,
)

from ..fakenet import FakeNet

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


def _core(seed: int, name: str = "me") -> Membership:
    return Membership(name, ("10.0.0.1", 1), CFG, random.Random(seed))


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
