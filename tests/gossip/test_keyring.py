"""Gossip encryption: the keyring seal, rotation, replay and refusal, on the real core."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip.config import LOCAL
from rumor.gossip.delegate import Delegate
from rumor.gossip.keyring import (
    KEY_BYTES,
    OVERHEAD,
    Keyring,
    KeyringError,
    KeyringSeal,
    decode_key,
    encode_key,
)
from rumor.gossip.keyring_commands import (
    KeyringCommands,
    KeyringRefused,
    LegacyKeyringChannel,
    key_id,
    outcome,
    refuse_use,
)
from rumor.gossip.keyring_file import generate_key, load_keyring, save_keyring
from rumor.gossip.membership import Membership
from rumor.gossip.query import Queries, QueryError, Request
from rumor.gossip.security import Plaintext, SealError
from rumor.gossip.wire import Status

from ..fakenet import FakeNet

K1, K2, K3 = (bytes([i]) * KEY_BYTES for i in (1, 2, 3))


class Clock:
    """Calendar time for the seals (their ``now``, with a zero wall offset)."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t


class End:
    """One agent's seal, named, on a shared clock: ``a.to(b, data)`` seals for b and
    ``b.open(sealed)`` opens as b, so each test reads as who sends what to whom."""

    def __init__(self, name: str, *keys: bytes, clock: Clock | None = None, seed: int = 1,
                 **kw: int | float) -> None:
        rng = random.Random(seed)
        self.name = name
        self.clock = clock or Clock()
        self.seal = KeyringSeal(Keyring(keys), wall_offset=0.0,
                                random_bytes=lambda n: rng.randbytes(n),
                                **kw)  # type: ignore[arg-type]
        self.keyring = self.seal.keyring
        self.stats = self.seal.stats

    def to(self, other: End | str, data: bytes) -> bytes:
        name = other if isinstance(other, str) else other.name
        return self.seal.seal(self.clock.t, data, name)

    def open(self, sealed: bytes) -> bytes:
        return self.seal.open(self.clock.t, sealed, self.name)


def test_seal_then_open_round_trips_and_adds_the_declared_overhead() -> None:
    clock = Clock()
    a, b = End("a", K1, clock=clock, seed=1), End("b", K1, clock=clock, seed=2)
    sealed = a.to(b, b"\x01hello gossip")
    assert len(sealed) == len(b"\x01hello gossip") + OVERHEAD
    assert b"hello" not in sealed  # encrypted, not just signed
    assert b.open(sealed) == b"\x01hello gossip"


def test_sealed_bytes_open_only_at_their_recipient() -> None:
    """A recording of a's packet to b, replayed to c, does not open at c: replay
    protection covers the cluster, not only the agent that saw the packet first."""
    clock = Clock()
    a, b, c = (End(n, K1, clock=clock, seed=i) for i, n in enumerate("abc"))
    sealed = a.to(b, b"\x01for b")
    with pytest.raises(SealError, match="meant for another agent"):
        c.open(sealed)
    assert b.open(sealed) == b"\x01for b"
    with pytest.raises(SealError, match="replayed"):
        b.open(sealed)
    # A join, sealed for nobody in particular, opens as a stream frame only.
    join = a.to("", b"\x01join")
    with pytest.raises(SealError):
        c.open(join)
    assert c.seal.open_stream(clock.t, join, "c") == (b"\x01join", False)
    assert c.seal.open_stream(clock.t, a.to(c, b"\x01pp"), "c") == (b"\x01pp", True)


def test_a_sealed_frame_header_opens_only_as_a_header() -> None:
    from rumor.gossip.keyring import SEALED_FRAME_HEADER
    from rumor.gossip.security import ReadBody, ReadHeader, Refuse
    clock = Clock()
    a, b = End("a", K1, clock=clock, seed=1), End("b", K1, clock=clock, seed=2)
    header = a.seal.frame_header(clock.t, 12345, "b")
    assert len(header) == SEALED_FRAME_HEADER
    assert b.seal.read_frame_header(clock.t, header[:4], "b") == ReadHeader(
        SEALED_FRAME_HEADER - 4)
    assert b.seal.read_frame_header(clock.t, header, "b") == ReadBody(12345)
    # Not as a packet, not twice, not at another agent, not plaintext beyond 64 KiB.
    with pytest.raises(SealError):
        b.open(a.seal.frame_header(clock.t, 1, "b"))
    assert isinstance(b.seal.read_frame_header(clock.t, header, "b"), Refuse)
    c = End("c", K1, clock=clock, seed=3)
    assert isinstance(c.seal.read_frame_header(clock.t, a.seal.frame_header(
        clock.t, 5, "b"), "c"), Refuse)
    big = (16 * 1024 * 1024).to_bytes(4, "big")
    assert isinstance(b.seal.read_frame_header(clock.t, big, "b"), Refuse)
    assert b.seal.read_frame_header(clock.t, (100).to_bytes(4, "big"), "b") == ReadBody(100)


def test_direct_libsodium_path_and_public_binding_agree(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from rumor.gossip import keyring as kr
    assert kr._lib is not None  # the fast path is the one agents use
    clock = Clock()
    a, b = End("a", K1, clock=clock, seed=1), End("b", K1, clock=clock, seed=2)
    fast = a.to(b, b"\x01fast")
    monkeypatch.setattr(kr, "_lib", None)  # pynacl's public wrapper
    slow = a.to(b, b"\x01slow")
    assert b.open(fast) == b"\x01fast"
    with pytest.raises(SealError):
        b.open(fast[:-1] + bytes([fast[-1] ^ 1]))
    monkeypatch.undo()
    assert b.open(slow) == b"\x01slow"
    with pytest.raises(SealError):
        End("b", K2, clock=clock, seed=3).open(a.to(b, b"\x01x"))


def test_wrong_key_plaintext_and_garbage_are_refused_and_counted() -> None:
    a, b = End("a", K1, seed=1), End("b", K2, seed=2)
    with pytest.raises(SealError, match="no gossip key of the receiving agent"):
        b.open(a.to(b, b"\x01x"))
    with pytest.raises(SealError, match="plaintext"):
        b.open(b"\x01\x91\x90")
    with pytest.raises(SealError, match="not a sealed"):
        b.open(b"GET / HTTP/1.1\r\n")
    with pytest.raises(SealError, match="seal version 1"):
        b.open(b"RK\x01" + bytes(80))
    assert b.stats == {"plaintext": 1, "unknown_key": 1, "stale": 0, "replayed": 0,
                       "malformed": 2}


def test_an_agent_without_a_key_says_the_cluster_is_encrypted() -> None:
    with pytest.raises(SealError, match="--keyring"):
        Plaintext().open(0.0, End("a", K1).to("b", b"\x01x"), "b")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    clock = Clock()
    a, b = End("a", K1, clock=clock, seed=1), End("b", K1, clock=clock, seed=2)
    sealed = bytearray(a.to(b, b"\x01" + bytes(range(40))))
    i = data.draw(st.integers(0, len(sealed) - 1))
    sealed[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SealError):
        b.open(bytes(sealed))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_bytes_only_ever_raise_seal_error(junk: bytes) -> None:
    b = End("b", K1)
    for prefix in (b"", b"RK\x01", b"RK\x02"):
        with pytest.raises(SealError):
            b.open(prefix + junk)
        with pytest.raises(SealError):
            b.seal.open_stream(b.clock.t, prefix + junk, "b")
    header = b.seal.read_frame_header(b.clock.t, (b"RK\x02" + junk).ljust(4, b"\0"), "b")
    assert header is not None  # a step, never an exception


def test_a_replayed_packet_is_refused_and_an_old_one_too() -> None:
    clock = Clock()
    a, b = End("a", K1, clock=clock, seed=1), End("b", K1, clock=clock, seed=2, window=30.0)
    sealed = a.to(b, b"\x01x")
    assert b.open(sealed) == b"\x01x"
    with pytest.raises(SealError, match="replayed"):
        b.open(sealed)
    late = a.to(b, b"\x01y")
    clock.t += 31
    with pytest.raises(SealError, match="too long ago"):
        b.open(late)  # a recording re-sent after the window
    ahead = End("c", K1, clock=Clock(clock.t + 31), seed=3)  # a clock 31 s fast
    with pytest.raises(SealError, match="too far off"):
        b.open(ahead.to(b, b"\x01z"))
    assert b.stats["replayed"] == 1 and b.stats["stale"] == 2


def test_replay_memory_is_bounded_and_refuses_what_it_forgot() -> None:
    clock = Clock()
    a, b = End("a", K1, clock=clock, seed=1), End("b", K1, clock=clock, seed=2,
                                                replay_capacity=10)
    first = a.to(b, b"\x01first")
    b.open(first)
    for i in range(20):
        clock.t += 0.01
        b.open(a.to(b, b"\x01%d" % i))
    assert len(b.seal._seen) <= 10
    with pytest.raises(SealError):
        b.open(first)  # its nonce is forgotten, but it is older than what is remembered


def test_rotation_install_use_remove_never_breaks_a_pair() -> None:
    clock = Clock()
    a, b = End("a", K1, clock=clock, seed=1), End("b", K1, clock=clock, seed=2)

    def both_ways() -> None:
        assert b.open(a.to(b, b"\x01ab")) == b"\x01ab"
        assert a.open(b.to(a, b"\x01ba")) == b"\x01ba"

    for ring in (a.keyring, b.keyring):
        assert ring.install(K2)
        both_ways()
    a.keyring.use(K2)
    both_ways()  # b already accepts K2; a still accepts K1
    b.keyring.use(K2)
    both_ways()
    for ring in (a.keyring, b.keyring):
        assert ring.remove(K1)
        both_ways()
    c = End("c", K1, clock=clock, seed=3)  # an agent that missed the rotation
    with pytest.raises(SealError):
        a.open(c.to(a, b"\x01old"))


def test_keyring_rules_and_key_text() -> None:
    ring = Keyring([K1])
    assert not ring.install(K1)
    with pytest.raises(KeyringError, match="primary"):
        ring.remove(K1)
    with pytest.raises(KeyringError, match="not installed"):
        ring.use(K2)
    assert not ring.remove(K3)
    with pytest.raises(KeyringError, match="base64"):
        decode_key("not a key!")
    with pytest.raises(KeyringError, match="32 bytes"):
        decode_key(encode_key(b"short"))
    with pytest.raises(KeyringError, match="at least one"):
        Keyring.from_text("# nothing here\n\n")
    assert len(decode_key(generate_key())) == KEY_BYTES
    assert generate_key() != generate_key()


def test_keyring_file_round_trips_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    path.write_text(f"# cluster keys\n{encode_key(K2)}\n\n{encode_key(K1)}\n")
    ring = load_keyring(path)
    assert ring.keys == [K2, K1]
    ring.use(K1)
    save_keyring(ring, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_keyring(path).keys == [K1, K2]
    with pytest.raises(KeyringError, match="cannot read"):
        load_keyring(tmp_path / "missing")


# ---- on the real membership core ---------------------------------------------------------


def _net_with_seals(seals: dict[str, KeyringSeal | None]) -> FakeNet:
    net = FakeNet(LOCAL)
    for name, seal in seals.items():
        net.add(name, seal=seal)
    return net


def _sim_seal(key: bytes, net: FakeNet, seed: int) -> KeyringSeal:
    rng = random.Random(seed)
    return KeyringSeal(Keyring([key]), wall_offset=1_800_000_000.0,
                       random_bytes=lambda n: rng.randbytes(n))


def test_encrypted_cores_form_a_cluster_and_outsiders_are_refused_with_a_reason() -> None:
    net = FakeNet(LOCAL)
    cores = [net.add(f"n{i}", seal=_sim_seal(K1, net, i)) for i in range(3)]
    for c in cores[1:]:
        c.join(net.now, [cores[0].addr])
        net.flush(c.name)
    net.run(3.0)
    assert all(sum(m.status == Status.ALIVE for m in c.members.values()) == 3 for c in cores)
    assert all(net.joins[c.name].contacted == 1 for c in cores[1:])

    keyless = net.add("keyless")
    wrong = net.add("wrong", seal=_sim_seal(K2, net, 9))
    for c in (keyless, wrong):
        c.join(net.now, [cores[0].addr])
        net.flush(c.name)
    net.run(10.0)
    assert net.joins["keyless"].contacted == 0
    assert "--keyring" in net.joins["keyless"].errors[0]
    assert net.joins["wrong"].contacted == 0
    assert "no gossip key of the receiving agent" in net.joins["wrong"].errors[0]
    # Neither got in, learnt anything, or got noticed as a member.
    assert set(keyless.members) == {"keyless"} and set(wrong.members) == {"wrong"}
    assert all(set(c.members) == {"n0", "n1", "n2"} for c in cores)
    assert cores[0].stats["streams_unauthenticated"] >= 2
    assert any(n.code == "gossip_refused" for _, _, n in net.notices)


def test_a_keyed_agent_cannot_join_a_plaintext_cluster_and_is_told_why() -> None:
    net = FakeNet(LOCAL)
    plain = net.add("plain")
    keyed = net.add("keyed", seal=_sim_seal(K1, net, 1))
    keyed.join(net.now, [plain.addr])
    net.flush("keyed")
    net.run(10.0)
    assert net.joins["keyed"].contacted == 0
    assert ("refused our gossip: the packet is encrypted but the receiving agent has no "
            "gossip key") in net.joins["keyed"].errors[0]


def _commands(c: Membership, s: KeyringSeal, ids: random.Random,
              **kw: Any) -> KeyringCommands:
    """A core's query delegate with the keyring commands on it (as ``assemble`` does)."""
    q = Queries(c, rand_id=lambda: f"{ids.getrandbits(64):016x}", now=c.members[c.name].since,
                wall_offset=1_800_000_000.0)
    c.register(q)
    k = KeyringCommands(q, s, **kw)
    c.register(LegacyKeyringChannel(c, k))
    return k


def test_cluster_wide_rotation_through_keyring_commands_keeps_everyone() -> None:
    net = FakeNet(LOCAL)
    seals = [_sim_seal(K1, net, i) for i in range(5)]
    saved: list[tuple[str, list[bytes]]] = []
    cores = [net.add(f"n{i}", seal=s) for i, s in enumerate(seals)]
    ids = random.Random(7)
    cmds = [_commands(c, s, ids, on_change=lambda ring, n=c.name: saved.append((n, ring.keys)))
            for c, s in zip(cores, seals, strict=True)]
    for c in cores[1:]:
        c.join(net.now, [cores[0].addr])
        net.flush(c.name)
    net.run(3.0)

    def step(op: str, key: bytes | None) -> dict[str, object]:
        cid = cmds[0].start(net.now, op, key, timeout=2.0)
        net.flush("n0")
        net.run(2.0)  # the core's own timers resend to the silent
        p = cmds[0].queries.finish(cid)
        assert p is not None
        return dict(outcome(op, p).answers)

    for op, key in (("install", K2), ("use", K2), ("remove", K1)):
        answers = step(op, key)
        assert sorted(answers) == [f"n{i}" for i in range(5)], op
        assert all(a.ok for a in answers.values()), op  # type: ignore[attr-defined]
        net.run(2.0)
        # No member was lost at any step of the rotation.
        assert all(sum(m.status == Status.ALIVE for m in c.members.values()) == 5
                   for c in cores), op
    assert all(s.keyring.keys == [K2] for s in seals)
    listing = step("list", None)
    held = {tuple(a.keys) for a in listing.values()}  # type: ignore[attr-defined]
    assert held == {(key_id(K2),)}  # fingerprints: no key material travels in answers
    assert len(saved) == 15  # each agent saved its file after each of the three changes
    bad = step("remove", K2)  # the primary: refused everywhere, nothing changes
    assert not any(a.ok for a in bad.values())  # type: ignore[attr-defined]
    assert all(s.keyring.keys == [K2] for s in seals)


def test_use_is_refused_unless_every_live_member_holds_the_key() -> None:
    net = FakeNet(LOCAL)
    seals = [_sim_seal(K1, net, i) for i in range(3)]
    cores = [net.add(f"n{i}", seal=s) for i, s in enumerate(seals)]
    answered: list[str] = []
    ids = random.Random(3)
    cmd = _commands(cores[0], seals[0], ids)
    cmd.queries.on_answer = answered.append
    for c, s in zip(cores[1:], seals[1:], strict=True):
        _commands(c, s, ids)
        c.join(net.now, [cores[0].addr])
        net.flush(c.name)
    net.run(3.0)
    seals[1].keyring.install(K2)  # n1 holds K2, n2 does not
    seals[0].keyring.install(K2)
    cid = cmd.start(net.now, "list", None)
    net.flush("n0")
    net.run(0.2)
    assert answered == [cid, cid]  # the shell was woken by each answer
    pending = cmd.queries.finish(cid)
    assert pending is not None and pending.missing == []
    listing = outcome("list", pending)
    with pytest.raises(KeyringRefused, match="not installed on n2"):
        refuse_use(listing, [], K2)
    with pytest.raises(KeyringRefused, match="no answer from n9"):
        refuse_use(listing, ["n9"], K1)
    refuse_use(listing, [], K1)  # everyone holds K1: allowed


def test_keyring_command_channel_survives_garbage() -> None:
    net = FakeNet(LOCAL)
    s = _sim_seal(K1, net, 1)
    c = net.add("n0", seal=s)
    k = _commands(c, s, random.Random(1))
    legacy = c.delegates["keyring"]
    assert isinstance(legacy, LegacyKeyringChannel)
    for junk in (b"", b"\xc1", msgpack.packb(["cmd"]), msgpack.packb(["cmd", 1, 2, "use", b""]),
                 msgpack.packb(["what"])):
        legacy.notify_message(net.now, junk)
    assert legacy.stats["bad_messages"] == 5
    for junk in (msgpack.packb(["keyring"]), msgpack.packb(["install", 5]), b"\xc1"):
        with pytest.raises(QueryError, match="malformed keyring command"):
            k._handle(Request("q", "n9", "keyring", junk, 0.0, 0.0))
    assert s.keyring.keys == [K1]


def test_a_command_from_an_agent_of_the_previous_build_is_applied_and_acked() -> None:
    """The previous build's ``keyring`` channel: applied, passed on, acked by stream."""
    net = FakeNet(LOCAL)
    seals = [_sim_seal(K1, net, i) for i in range(3)]
    cores = [net.add(f"n{i}", seal=s) for i, s in enumerate(seals)]
    ids = random.Random(5)
    for c, s in zip(cores[1:], seals[1:], strict=True):
        _commands(c, s, ids)
    acks: list[list[Any]] = []

    class OldOrigin(Delegate):  # what n0 ran before: it only hears the acks here
        channel = "keyring"

        def notify_message(self, now: float, payload: bytes) -> None:
            msg = msgpack.unpackb(payload)
            if msg[0] == "ack":  # the relayed command comes back too
                acks.append(msg)
    cores[0].register(OldOrigin())
    for c in cores[1:]:
        c.join(net.now, [cores[0].addr])
        net.flush(c.name)
    net.run(3.0)
    cores[0].broadcast(net.now, "keyring", msgpack.packb(["cmd", "old1", "n0", "install", K2]),
                       key="old1")
    net.flush("n0")
    net.run(2.0)
    assert all(K2 in s.keyring.keys for s in seals[1:])
    assert sorted(a[2] for a in acks) == ["n1", "n2"] and all(a[3] for a in acks)
