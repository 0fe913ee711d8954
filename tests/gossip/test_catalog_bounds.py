"""The catalog holds only what live members say about themselves, within caps (issue 27,
finding 2): floods of records for invented names, oversized record sets for a real
member and a peer stuffed to the caps leave the catalog bounded, and a new node still
joins through the flooded one. Sans-IO: the cores on FakeNet, driven directly."""

from __future__ import annotations

import pytest

from rumor.gossip.catalog import (
    MSG_RECORDS,
    PEER_SLACK,
    STATE_SHARE,
    Catalog,
    CatalogLimitError,
    CatalogLimits,
    encode,
)
from rumor.gossip.config import LAN
from rumor.gossip.service_spec import parse_spec
from rumor.gossip.wire import MAX_FRAME, MemberState, PushPull, Status

from ..fakenet import FakeNet

CFG = LAN.with_overrides(reconnect_interval=5.0, push_pull_interval=30.0,
                         max_members=4096)


def _cluster(n: int, limits: CatalogLimits | None = None
             ) -> tuple[FakeNet, dict[str, Catalog]]:
    net = FakeNet(CFG)
    cats = {}
    for i, c in enumerate(net.cluster(n)):
        cat = Catalog(c, epoch=100 + i, now=net.now, limits=limits)
        c.register(cat)
        cats[c.name] = cat
    return net, cats


def _record(i: int, *, rev: int = 1, pad: int = 180) -> list[object]:
    """A plausible record of about ``pad`` + 40 bytes."""
    return [f"svc-{i}", f"svc-{i}", "", 1000 + i % 60000, ["t" * (pad // 2)],
            "v" * (pad // 2), 1, 0, [], rev, False]


def _records_msg(node: str, epoch: int, records: list[list[object]]) -> bytes:
    return encode([MSG_RECORDS, node, epoch, records])


def _admit(net: FakeNet, cat: Catalog, names: list[str]) -> None:
    """Make ``names`` members of ``cat``'s table, as a push-pull from a peer would."""
    rows = tuple(MemberState(n, (f"10.9.{i // 250}.{i % 250 + 1}", 7946), 1, Status.ALIVE)
                 for i, n in enumerate(names))
    cat.core.merge_state(net.now, PushPull(False, "n1", rows), quiet=True)


def _held(cat: Catalog) -> dict[str, int]:
    return cat.footprint()


def test_records_for_names_that_are_not_members_are_never_stored() -> None:
    """2,000 invented names, ~25 records each (far past the pending buffer of 64 names
    and 256 KiB): nothing of them is held, served, pushed or passed on."""
    net, cats = _cluster(3)
    n0 = cats["n0"]
    before = _held(n0)
    sent = 0
    for k in range(2000):
        msg = _records_msg(f"ghost-{k}", 5 + k, [_record(i) for i in range(25)])
        sent += len(msg)
        n0.notify_message(net.now, msg)
    assert sent > 10_000_000 and n0.stats["records_absurd"] == 0
    held = _held(n0)
    assert held["records"] == before["records"] and held["nodes"] == before["nodes"]
    assert held["pending_nodes"] <= n0.limits.pending_nodes
    assert held["pending_bytes"] <= n0.limits.pending_bytes
    assert len(n0.local_state(False)) < 1024
    assert n0.stats["records_pending"] == 2000 * 25
    # Nothing was broadcast on, and push-pull state of non-members is refused outright.
    assert not n0.core._user_q
    state = encode([2, [[f"ghost-{k}", 1, [_record(1)]] for k in range(100)]])
    n0.merge_remote_state(net.now, state, False, "n1")
    assert n0.stats["records_not_member"] == 100
    assert _held(n0)["records"] == before["records"]


def test_records_of_failed_members_are_refused_but_kept_ones_return_on_refute() -> None:
    net, cats = _cluster(3)
    cats["n2"].register(net.now, parse_spec("name=db,port=5432"))
    net.flush("n2")
    net.run_until(lambda: bool(cats["n0"].instances("db")), 5)
    n0 = cats["n0"]
    n0.core.members["n2"].status = Status.DEAD  # as a failure would leave it
    state = encode([2, [["n2", 102, [["x", "x", "", 1, [], "", 1, 0, [], 99, False]]]]])
    n0.merge_remote_state(net.now, state, False, "n1")
    assert n0.stats["records_not_member"] == 1
    n0.core.members["n2"].status = Status.ALIVE
    assert [i.node for i in n0.instances("db")] == ["n2"] and not n0.instances("x")


def test_a_broadcast_that_overtakes_its_nodes_alive_waits_for_it() -> None:
    """A join race: a node's records arrive before any alive of it. They wait in the
    pending buffer and are applied (and passed on) when the node joins."""
    net, cats = _cluster(3)
    n0 = cats["n0"]
    n0.notify_message(net.now, _records_msg("late", 5, [_record(1), _record(2)]))
    assert not n0.instances("svc-1") and _held(n0)["pending_nodes"] == 1
    _admit(net, n0, ["late"])
    assert [i.node for i in n0.instances("svc-1")] == ["late"]
    assert _held(n0)["pending_nodes"] == 0 and n0.core._user_q  # passed on


def test_an_oversized_record_set_for_a_real_member_is_capped() -> None:
    """1,000 records (four times the service cap, and ~220 KB, past the byte cap) for
    a real member: it holds at most the caps (times the peer slack), counts the rest."""
    net, cats = _cluster(3)
    n0 = cats["n0"]
    limits = n0.limits
    epoch = 101  # n1's own epoch
    for start in range(0, 1000, 100):
        n0.notify_message(net.now, _records_msg(
            "n1", epoch, [_record(i) for i in range(start, start + 100)]))
    held = _held(n0)
    entry = n0._nodes["n1"]
    assert entry.size <= limits.bytes_per_node * PEER_SLACK
    assert held["bytes"] <= limits.bytes_per_node * PEER_SLACK + 200
    assert n0.stats["records_over_node_cap"] >= 1000 - limits.services_per_node * PEER_SLACK
    # Small records: the service count is what binds.
    net2, cats2 = _cluster(2)
    m0 = cats2["n0"]
    for start in range(0, 1000, 250):
        m0.notify_message(net2.now, _records_msg(
            "n1", 101, [_record(i, pad=2) for i in range(start, start + 250)]))
    assert m0._nodes["n1"].live == m0.limits.services_per_node * PEER_SLACK


def test_local_registrations_past_a_cap_are_refused_with_a_clear_error() -> None:
    net, cats = _cluster(1)
    cat = cats["n0"]
    cat.register_many(net.now, [parse_spec(f"name=s{i},port={1000 + i}")
                                for i in range(256)])
    with pytest.raises(CatalogLimitError, match="257 services on one agent: at most 256"):
        cat.register(net.now, parse_spec("name=one-more,port=1"))
    assert len(cat.local) == 256 and "one-more" not in cat.local
    cat.register(net.now, parse_spec("name=s0,port=2"))  # replacing one is fine
    net2, cats2 = _cluster(1)
    big = "|".join(f"{i:02d}" + "t" * 62 for i in range(32))  # ~2 KB of tags each
    with pytest.raises(CatalogLimitError, match="bytes in the catalog: at most 65536"):
        for i in range(256):
            cats2["n0"].register(net2.now, parse_spec(f"name=b{i},port=1,tags={big}"))
    assert 25 <= len(cats2["n0"].local) <= 32  # the one past the cap was not taken


def test_churning_past_the_cap_through_tombstones_still_replicates() -> None:
    """256 services, all deregistered, 256 new ones: the tombstones give way (oldest
    first) on the owner and on its peers, so the new ones are not refused."""
    net, cats = _cluster(3)
    owner = cats["n0"]
    owner.register_many(net.now, [parse_spec(f"name=a{i},port={1000 + i}")
                                  for i in range(256)])
    net.flush("n0")
    net.run_until(lambda: len(cats["n2"].services()) == 256, 10)
    for i in range(256):
        owner.deregister(net.now, f"a{i}")
    owner.register_many(net.now, [parse_spec(f"name=b{i},port={2000 + i}")
                                  for i in range(256)])
    net.flush("n0")
    net.run_until(lambda: all(len(c.services()) == 256 and "b255" in c.services()
                              for c in cats.values()), 30)
    assert all(c.stats["records_over_node_cap"] == 0 for c in cats.values())


def test_a_peer_stuffed_to_the_caps_still_fits_a_push_pull_and_a_new_node_joins() -> None:
    """300 members' records at the per-node byte cap: 19 MiB offered, more than the
    16 MiB frame. The flooded node holds at most its total cap, its push-pull fits the
    frame, and a new node joins through it and learns the real services."""
    net, cats = _cluster(2)
    n0 = cats["n0"]
    cats["n1"].register(net.now, parse_spec("name=web,port=80"))
    net.flush("n1")
    net.run_until(lambda: bool(n0.instances("web")), 5)
    fakes = [f"fake-{k}" for k in range(300)]
    _admit(net, n0, fakes)
    offered = 0
    for k, name in enumerate(fakes):
        msg = _records_msg(name, 5 + k, [_record(i, pad=220) for i in range(256)])
        offered += len(msg)
        n0.notify_message(net.now, msg)
    assert offered > MAX_FRAME
    held = _held(n0)
    assert held["bytes"] <= n0.limits.total_bytes
    state = n0.local_state(True)
    assert len(state) <= n0.limits.total_bytes + 64 <= STATE_SHARE
    assert len(n0.core._push_pull_body(True)) < MAX_FRAME
    late = net.add("late")
    late_cat = Catalog(late, epoch=1, now=net.now)
    late.register(late_cat)
    late.join(net.now, [net.nodes["n0"].addr])
    net.flush("late")
    net.run_until(lambda: "late" in net.joins, 10)
    assert net.joins["late"].contacted == 1, net.joins["late"]
    net.run_until(lambda: bool(late_cat.instances("web")), 5)
    assert late_cat.footprint()["bytes"] <= late_cat.limits.total_bytes
