"""Admission on a plaintext cluster: third-party names wait for a direct answer."""

from __future__ import annotations

from rumor.gossip.config import LAN
from rumor.gossip.effects import SendPacket
from rumor.gossip.wire import Alive, MemberState, PushPull, Status, encode_packet

from ..fakenet import FakeNet

CFG = LAN.with_overrides(reconnect_interval=5.0)
ATTACKER = ("10.66.6.6", 4444)


def _flood(net: FakeNet, d: int) -> bytes:
    """250 invented members at addresses where nobody answers (one datagram)."""
    return encode_packet([Alive(1, f"fake-{d}-{i}", (f"10.{100 + d}.{i // 250}.{i % 250 + 1}",
                                                     7946), {}) for i in range(250)])


def test_a_fake_member_flood_leaves_a_paused_member_detected_in_its_normal_time() -> None:
    """24 datagrams of 250 members each (the probe's flood): before admission, the
    new-name throttle let 512 of them into every table, and a paused member waited
    for its turn behind them in the probe order (not suspected within 60 s)."""
    net = FakeNet(CFG)
    cores = net.cluster(8)
    for d in range(24):
        for c in cores:
            c.receive(net.now, ATTACKER, _flood(net, d))
            net.flush(c.name)
    assert all(len(c.members) == 8 for c in cores)
    victim = cores[7]
    net.pause(victim.name)
    took = net.run_until(lambda: all(c.members[victim.name].status != Status.ALIVE
                                     for c in cores[:7]), limit=30)
    # Normally: a probe round over 7 others (at most ~7 s), then the timeout.
    assert took < 10.0
    assert all(len(c.members) == 8 for c in cores)
    assert sum(c.stats["admission_pings"] for c in cores) > 0


def test_a_third_party_name_is_admitted_once_it_answers_at_its_address() -> None:
    net = FakeNet(CFG)
    a, b = net.cluster(2)
    c = net.add("late")
    # a hears of "late" from b's gossip (third party): a ping first, then the member.
    a.receive(net.now, b.addr, encode_packet([Alive(1, "late", c.addr, {})]))
    pings = [e for e in a.take_effects() if isinstance(e, SendPacket)]
    assert [p.addr for p in pings] == [c.addr]
    assert "late" not in a.members and "late" in a.pending_names()
    net._executors[a.name].run(pings)  # type: ignore[attr-defined]
    net.run(1.0)
    assert a.members["late"].status == Status.ALIVE
    assert a.stats["admitted_by_ping"] == 1


def test_an_answer_from_another_address_does_not_admit() -> None:
    net = FakeNet(CFG)
    (a,) = net.cluster(1)
    a.receive(net.now, ATTACKER, encode_packet([Alive(1, "ghost", ("10.9.9.9", 7946), {})]))
    seq = a._pending["ghost"].seq
    from rumor.gossip.wire import Ack
    a.receive(net.now, ATTACKER, encode_packet([Ack(seq)]))  # spoofed from elsewhere
    assert "ghost" not in a.members
    assert a.stats["admission_acks_misaddressed"] == 1
    net.run(10.0)
    assert "ghost" not in a.members and not a.pending_names()
    assert a.stats["admission_timeouts"] == 1


def test_a_members_own_push_pull_row_is_first_hand() -> None:
    net = FakeNet(CFG)
    (a,) = net.cluster(1)
    rows = (MemberState("joiner", ("10.0.0.50", 7946), 1, Status.ALIVE, {}),
            MemberState("hearsay", ("10.0.0.51", 7946), 1, Status.ALIVE, {}))
    a.merge_state(net.now, PushPull(True, "joiner", rows, {}))
    assert "joiner" in a.members and "hearsay" not in a.members
    assert "hearsay" in a.pending_names()


def test_a_join_that_learns_more_names_than_the_ping_burst_admits_them_all() -> None:
    """A push-pull of 1,000 names (a join into a big plaintext cluster): the first 512
    are pinged at once, the rest wait their turn as ping tokens refill, none dropped."""
    import random

    from rumor.gossip.membership import Membership
    from rumor.gossip.wire import Ack, Ping, decode_packet
    core = Membership("me", ("10.0.0.1", 7946), CFG, random.Random(1))
    rows = tuple(MemberState(f"m{i}", (f"10.1.{i // 250}.{i % 250 + 1}", 7946), 1,
                             Status.ALIVE, {}) for i in range(1000))
    core.merge_state(0.0, PushPull(False, "seed", rows, {}))
    assert len(core.pending_names()) == 1000
    now = 0.0
    while core.pending_names() and now < 30:
        for e in core.take_effects():
            if isinstance(e, SendPacket):
                for m in decode_packet(e.data):
                    if isinstance(m, Ping):
                        core.receive(now, e.addr, encode_packet([Ack(m.seq)]))
        now += 0.25
        core.tick(now)
    assert len(core.members) == 1001
    assert core.stats["admission_timeouts"] == 0
    assert now > 1.0  # they really waited for tokens (512 burst, 128/s)
