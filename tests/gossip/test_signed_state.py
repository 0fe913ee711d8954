"""A member's own word: signed alives and leaves, bindings, the accusation cap.

Each attack here is one the second hostile probe carried out against real agents
(issue 27): the two-step incarnation climb that left a victim failed everywhere, the
same climb with a forged address and ``rumor.inbound`` tag, a forged leave. They run
on the membership core directly; ``tests/cluster/test_signed_cluster.py`` replays
them against real agents.
"""

from __future__ import annotations

import msgpack
import pytest
from nacl.signing import SigningKey

from rumor.gossip.config import LAN
from rumor.gossip.fields import MAX_INCARNATION_JUMP
from rumor.gossip.identity import ALIVE_CONTEXT, Identity, clear_caches
from rumor.gossip.membership import Membership
from rumor.gossip.node_key import Ed25519Authority, NodeKey, sign_ed25519_credential
from rumor.gossip.wire import (
    Alive,
    Dead,
    DecodeError,
    SignedAlive,
    Status,
    Suspect,
    decode_packet,
    encode_packet,
    pack_message,
)

from ..fakenet import FakeNet

CFG = LAN.with_overrides(reconnect_interval=5.0)
CLUSTER = "test"
AUTHORITY_KEY = SigningKey(b"\x07" * 32)
AUTHORITY = Ed25519Authority.of(CLUSTER, [bytes(AUTHORITY_KEY.verify_key)])
ATTACKER = ("10.66.6.6", 4444)


def node_key(name: str, life: int = 0) -> NodeKey:
    return NodeKey.from_seed(f"{name}/{life}".encode())


def credential(name: str, key: NodeKey, issued_at: int = 1) -> bytes:
    return sign_ed25519_credential([AUTHORITY_KEY], CLUSTER, name, key.public, issued_at)


def identity(name: str, mode: str = "require", life: int = 0, issued_at: int = 1,
             tofu: bool = False) -> Identity:
    key = node_key(name, life)
    if tofu:
        return Identity.with_tofu(mode, key, CLUSTER, name, 0)
    return Identity(mode=mode, key=key, credential=credential(name, key, issued_at),
                    authority=AUTHORITY)


def signed_cluster(n: int, mode: str = "require", tofu: bool = False,
                   config: object = CFG) -> tuple[FakeNet, list[Membership]]:
    net = FakeNet(config)  # type: ignore[arg-type]
    cores = [net.add(f"n{i}", identity=identity(f"n{i}", mode, tofu=tofu))
             for i in range(n)]
    for c in cores[1:]:
        c.join(net.now, [cores[0].addr])
        net.flush(c.name)
    net.run_until(lambda: all_alive(cores), limit=60)
    return net, cores


def all_alive(cores: list[Membership]) -> bool:
    names = {c.name for c in cores}
    return all(n in c.members and c.members[n].status == Status.ALIVE
               for c in cores for n in names)


def inject(net: FakeNet, target: Membership, *messages: object) -> None:
    target.receive(net.now, ATTACKER, encode_packet(list(messages)))  # type: ignore[arg-type]
    net.flush(target.name)


def test_the_two_step_climb_leaves_the_victim_alive_and_where_it_was() -> None:
    """Alive(V, i+2^24) then Dead(V, i+2^25) in one datagram: the first is unsigned and
    refused, the second names an incarnation V never signed and is refused too."""
    net, cores = signed_cluster(4)
    v = cores[3]
    i = v.incarnation
    for c in cores[:3]:
        inject(net, c, Alive(i + MAX_INCARNATION_JUMP, v.name, v.addr, {}),
               Dead(i + 2 * MAX_INCARNATION_JUMP, v.name, "n0"),
               # and the climb's lesson applied within the old band: one above signed
               Suspect(i + 1, v.name, "n0"), Dead(i + 1, v.name, "n0"))
    net.run(30.0)
    assert all_alive(cores)
    for c in cores[:3]:
        assert c.members[v.name].incarnation <= v.incarnation
        assert c.stats["alives_unsigned_refused"] >= 1
        assert c.stats["accusations_above_signed"] >= 2


def test_an_insider_cannot_move_or_retag_another_member() -> None:
    """The hijack: V's name at the attacker's address with a forged inbound tag, plain
    and signed with the attacker's own key (whose credential names the attacker)."""
    net, cores = signed_cluster(4)
    v, me = cores[3], cores[0]
    evil = node_key("mallory")
    forged = Alive(v.incarnation + 1, v.name, ATTACKER, {"rumor.inbound": "4444"})
    body = pack_message(forged)
    with_own_cred = SignedAlive(forged, body, evil.sign(ALIVE_CONTEXT + body),
                                credential("mallory", evil))
    with_v_cred = SignedAlive(forged, body, evil.sign(ALIVE_CONTEXT + body),
                              v.identity.credential or b"")
    self_claim = SignedAlive(forged, body, evil.sign(ALIVE_CONTEXT + body),
                             credential(v.name, evil, issued_at=0))
    inject(net, me, forged, with_own_cred, with_v_cred, self_claim)
    net.run(5.0)
    for c in cores[:3]:
        assert c.members[v.name].addr == v.addr and "rumor.inbound" not in c.members[v.name].meta
    assert me.stats["alives_unsigned_refused"] == 1
    assert me.stats["alives_credential_refused"] == 1  # names mallory, not v
    assert me.stats["alives_bad_signature"] == 1  # v's credential, mallory's signature
    assert me.stats["alives_key_mismatch"] == 1  # an older credential for another key


def test_an_accusation_at_the_signed_incarnation_never_lasts() -> None:
    """An insider may still accuse at V's current incarnation (that is SWIM); V refutes
    by one, every time, and is alive again everywhere."""
    net, cores = signed_cluster(5)
    v = cores[4]
    start = v.incarnation
    for round_ in range(3):
        for c in cores[:4]:
            inject(net, c, Dead(v.incarnation, v.name, "n0"))
        net.run_until(lambda: all_alive(cores), limit=15)
        assert v.incarnation == start + round_ + 1  # by one, never a jump
    assert v.stats["refutations"] == 3


def test_a_forged_leave_is_refused_and_a_real_one_counts() -> None:
    net, cores = signed_cluster(4)
    v = cores[3]
    for c in cores[:3]:
        inject(net, c, Dead(v.incarnation, v.name, v.name))
    net.run(3.0)
    assert all_alive(cores)
    assert cores[0].stats["leaves_unsigned_refused"] == 1
    v.leave(net.now)
    net.flush(v.name)
    net.run_until(lambda: all(c.members[v.name].status == Status.LEFT for c in cores[:3]),
                  limit=10)


def test_prefer_mode_never_takes_a_signed_member_at_its_unsigned_word() -> None:
    net, cores = signed_cluster(3, mode="prefer")
    v, me = cores[2], cores[0]
    inject(net, me, Alive(v.incarnation + 1, v.name, ATTACKER, {"x": "y"}))
    assert me.members[v.name].addr == v.addr
    assert me.stats["alives_unsigned_refused"] == 1


def test_a_version_1_member_and_prefer_members_share_one_cluster() -> None:
    """An ``off`` member stands for the previous build: it skips the signed messages
    (optional types) and the identity channel, and takes the plain twins."""
    net = FakeNet(CFG)
    cores = [net.add("n0", identity=identity("n0", "prefer")), net.add("old"),
             net.add("n2", identity=identity("n2", "prefer"))]
    for c in cores[1:]:
        c.join(net.now, [cores[0].addr])
        net.flush(c.name)
    net.run_until(lambda: all_alive(cores), limit=30)
    cores[2].set_meta(net.now, {"role": "db"})
    net.flush("n2")
    net.run_until(lambda: cores[1].members["n2"].meta.get("role") == "db", limit=10)
    assert cores[1].stats["messages_skipped"] > 0  # the signed twins
    assert cores[0].members["n2"].cred is not None and cores[0].members["old"].cred is None
    net.crash("old")
    net.run_until(lambda: all(c.members["old"].status == Status.DEAD
                              for c in (cores[0], cores[2])), limit=40)


def test_a_restart_with_the_same_key_outbids_its_previous_life() -> None:
    """The new life starts at incarnation 1; its previous life's signed alive (the
    same key) comes back in the join and is the one thing it may jump above."""
    net, cores = signed_cluster(3)
    old = cores[2]
    for _ in range(4):
        old.set_meta(net.now, {"n": str(old.incarnation)})
        net.flush(old.name)
    net.run(3.0)
    high = old.incarnation
    net.crash(old.name)
    del net.nodes[old.name]
    net.crashed.discard(old.name)
    new = Membership(old.name, old.addr, CFG, __import__("random").Random(9),
                     identity=identity(old.name), now=net.now)
    net.nodes[old.name] = new
    new.join(net.now, [cores[0].addr])
    net.flush(old.name)
    net.run_until(lambda: all(c.members[old.name].incarnation > high
                              and c.members[old.name].status == Status.ALIVE
                              for c in cores[:2]), limit=20)
    assert new.incarnation == high + 1


def test_a_graceful_restart_outbids_its_own_signed_leave() -> None:
    """systemctl restart: the old life leaves (signed) at incarnation i, every peer holds
    it left at i, and the new life starts at 1; the leave comes back in the join, signed
    by the same key, and the new life outbids it."""
    net, cores = signed_cluster(3)
    old = cores[2]
    for _ in range(3):
        old.set_meta(net.now, {"n": str(old.incarnation)})
        net.flush(old.name)
    net.run(2.0)
    old.leave(net.now)
    net.flush(old.name)
    net.run_until(lambda: all(c.members[old.name].status == Status.LEFT
                              for c in cores[:2]), limit=10)
    high = cores[0].members[old.name].incarnation
    net.crash(old.name)
    net.crashed.discard(old.name)
    new = Membership(old.name, old.addr, CFG, __import__("random").Random(5),
                     identity=identity(old.name), now=net.now)
    net.nodes[old.name] = new
    new.join(net.now, [cores[0].addr])
    net.flush(old.name)
    net.run_until(lambda: all(c.members[old.name].status == Status.ALIVE
                              for c in cores[:2]), limit=20)
    assert new.incarnation == high + 1


def test_a_newer_credential_rebinds_the_name() -> None:
    """A lost key is replaced by a new credential: the newest issued_at wins, even at
    a lower incarnation, and the old key's word counts no more."""
    net, cores = signed_cluster(3)
    v, me = cores[2], cores[0]
    key2 = node_key(v.name, life=1)
    a = Alive(1, v.name, v.addr, {"life": "2"})
    body = pack_message(a)
    sa = SignedAlive(a, body, key2.sign(ALIVE_CONTEXT + body),
                     credential(v.name, key2, issued_at=2))
    inject(net, me, sa)
    assert me.members[v.name].cred is not None
    assert me.members[v.name].cred.public_key == key2.public
    assert me.members[v.name].meta == {"life": "2"}


def test_tofu_pins_from_the_members_own_push_pull_only() -> None:
    """Plaintext with trust on first use: every member ends bound to its own key,
    through its own push-pull (third-party gossip asks for one instead)."""
    net, cores = signed_cluster(4, tofu=True)
    for c in cores:
        for other in cores:
            if other is not c:
                assert c.members[other.name].cred is not None
                assert c.members[other.name].cred.public_key == node_key(other.name).public
    # A claim for a bound name with another key, arriving by gossip, changes nothing.
    v, me = cores[3], cores[0]
    evil = node_key("mallory")
    forged = Alive(v.incarnation + 1, v.name, ATTACKER, {})
    body = pack_message(forged)
    from rumor.gossip.node_key import tofu_credential
    inject(net, me, SignedAlive(forged, body, evil.sign(ALIVE_CONTEXT + body),
                                tofu_credential(CLUSTER, v.name, evil.public, 0)))
    assert me.members[v.name].addr == v.addr


def test_junk_signatures_spend_the_senders_budget_not_a_core() -> None:
    clear_caches()
    net, cores = signed_cluster(3)
    me = cores[0]
    v = cores[2]
    cred = v.identity.credential or b""
    before = me.identity.stats["signatures_verified"] + me.identity.stats["signatures_bad"]
    for i in range(2000):
        a = Alive(v.incarnation + 1 + i, v.name, v.addr, {})
        body = pack_message(a)
        me.receive(net.now, ATTACKER, encode_packet([SignedAlive(a, body, b"\x01" * 64,
                                                                 cred)]))
    spent = me.identity.stats["signatures_verified"] + me.identity.stats["signatures_bad"]
    assert spent - before <= me.identity.verify_burst + 1
    assert me.identity.stats["verifications_throttled"] >= 2000 - me.identity.verify_burst - 1
    # The same signed bytes again cost no verification at all.
    sa = v._signed_self()
    assert sa is not None
    for _ in range(100):
        me.receive(net.now, ("10.0.0.9", 1), encode_packet([sa]))
    assert me.identity.stats["signatures_verified"] + me.identity.stats["signatures_bad"] \
        <= spent + 1


def test_signed_messages_decode_strictly() -> None:
    a = Alive(3, "v", ("10.0.0.1", 7946), {})
    body = pack_message(a)
    good = SignedAlive(a, body, b"s" * 64, b"c")
    assert decode_packet(encode_packet([good])) == [good]
    bad_bodies = [pack_message(Suspect(3, "v", "x")), b"\xc1", msgpack.packb([5, 1, "v"])]
    for b in bad_bodies:
        with pytest.raises(DecodeError):
            decode_packet(bytes([1]) + msgpack.packb([[33, b, b"s" * 64, b"c"]]))
    with pytest.raises(DecodeError):
        decode_packet(bytes([1]) + msgpack.packb([[33, body, b"short", b"c"]]))
    with pytest.raises(DecodeError):  # a leave's source is its node
        decode_packet(bytes([1]) + msgpack.packb(
            [[34, pack_message(Dead(1, "v", "other")), b"s" * 64]]))


def test_the_signed_statements_give_way_when_a_push_pull_would_pass_the_frame(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A join must never fail because of what a peer holds: past the frame limit the
    identity channel is cut (gossip carries the rest), never the member rows."""
    from rumor.gossip import anti_entropy
    from rumor.gossip.wire import decode_frame_body
    _net, cores = signed_cluster(5)
    full = cores[0]._push_pull_body(True)
    room = len(full) - 400
    monkeypatch.setattr(anti_entropy, "MAX_FRAME", anti_entropy.FRAME_MARGIN + room)
    cut = cores[0]._push_pull_body(True)
    assert len(cut) <= room < len(full)
    assert cores[0].stats["identity_state_truncated"] == 1
    pp = decode_frame_body(cut)
    assert len(pp.states) == 5  # every row is still there


def test_a_repeated_dead_cannot_keep_a_bound_member_failed() -> None:
    """A third party's dead every 50 ms at V's current incarnation: taken as one more
    accusation (V refutes each), so V is never failed anywhere; before, it kept V
    failed on every peer 82% of the time."""
    net, cores = signed_cluster(4)
    v = cores[3]
    failed_samples = 0
    for _ in range(200):  # 10 s
        for c in cores[:3]:
            inject(net, c, Dead(v.incarnation, v.name, "n0"))
        net.run(0.05)
        failed_samples += sum(c.members[v.name].status == Status.DEAD for c in cores[:3])
    assert failed_samples == 0
    assert cores[0].stats["deads_taken_as_suspicion"] > 0


def test_one_datagram_of_rising_accusations_costs_one_refutation() -> None:
    net, cores = signed_cluster(3)
    v = cores[2]
    i = v.incarnation
    v.receive(net.now, ATTACKER, encode_packet([Suspect(i + k, v.name, "n0")
                                                for k in range(200)]))
    assert v.incarnation == i + 1
    assert v.stats["refutations"] == 1


def test_a_signed_body_is_never_itself_signed() -> None:
    a = Alive(1, "v", ("10.0.0.1", 7946), {})
    inner = pack_message(SignedAlive(a, pack_message(a), b"s" * 64, b""))
    for _ in range(600):
        inner = msgpack.packb([33, inner, b"s" * 64, b""])
    with pytest.raises(DecodeError):
        decode_packet(bytes([1]) + msgpack.packb([msgpack.unpackb(inner)]))
