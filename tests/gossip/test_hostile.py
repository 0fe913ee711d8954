"""A hostile peer against the real membership core: structurally valid messages with
hostile fields (NUL and non-ASCII names and addresses, 64-character labels, ports 0
and 65536, incarnations at and near 2^64, nesting at every depth, packets of thousands
of parts, thousands of new members). The invariant, whatever arrives: no exception
escapes the core, the member table stays bounded, no live member is declared failed,
and the cluster keeps converging."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip.catalog import MSG_RECORDS, Catalog, CatalogDecodeError, decode, encode
from rumor.gossip.config import LAN
from rumor.gossip.effects import SendPacket
from rumor.gossip.fields import MAX_COUNTER, MAX_INCARNATION_JUMP, describe
from rumor.gossip.membership import Membership
from rumor.gossip.wire import (
    PROTOCOL_VERSION,
    DecodeError,
    Status,
    decode_frame_body,
    decode_packet,
)

from ..fakenet import FakeNet

CFG = LAN.with_overrides(max_members=2048)
ATTACKER = ("10.66.6.6", 4444)
PING, INDIRECT, ACK, NACK, ALIVE, SUSPECT, DEAD, USER, PUSH_PULL = range(1, 10)


class Deep:
    """``depth`` nested one-element arrays: msgpack's packer refuses to build them (its own
    nesting limit), so :func:`raw` writes their bytes directly, as an attacker would."""

    def __init__(self, depth: int) -> None:
        self.depth = depth


def _header(n: int, small: int, wide: int) -> bytes:
    if n < 16:
        return bytes([small | n])
    if n < 2**16:
        return bytes([wide]) + n.to_bytes(2, "big")
    return bytes([wide + 1]) + n.to_bytes(4, "big")


def raw(value: object) -> bytes:
    """msgpack bytes for ``value`` with no validation: nesting past the packer's limit,
    and integers it cannot represent (>= 2^64) written as the largest it can."""
    if isinstance(value, Deep):
        return b"\x91" * value.depth + b"\x01"
    if isinstance(value, list | tuple):
        return _header(len(value), 0x90, 0xDC) + b"".join(raw(v) for v in value)
    if isinstance(value, dict):
        return _header(len(value), 0x80, 0xDE) + b"".join(
            raw(k) + raw(v) for k, v in value.items())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**64:
        return b"\xcf" + b"\xff" * 8
    return msgpack.packb(value)


def packet(*messages: list[object]) -> bytes:
    """A datagram of raw message arrays: no validation on the way out."""
    return bytes([PROTOCOL_VERSION]) + raw(list(messages))


def frame_body(message: list[object]) -> bytes:
    return packet(message)


def nested(depth: int) -> object:
    return Deep(depth)


# ---- hostile field values -----------------------------------------------------------------

bad_names = st.sampled_from([
    "", "a\x00b", "x" * 129, "line\nbreak", "tab\t", "\u202eevil", "\x7f", "😀" * 200])
bad_hosts = st.sampled_from([
    "127.0.0.1\x00", "a" * 64 + ".example", "localhost", "fe80::1%\x00", "1.2.3.4 ",
    "999.1.1.1", "", "x" * 600, "::ffff:1.2.3.4%eth0", b"\xff\xfe"])
bad_ports = st.sampled_from([0, -1, 65536, 2**64 - 1, 2**64, "80", 80.0, None])
huge = st.sampled_from([2**53, 2**63, 2**64 - 1, 2**64, -1, 1.5, True])
good_names = st.sampled_from(["n0", "n1", "n2", "n3", "ghost", "ünïcode-ok"])
good_addr = st.sampled_from([["10.0.0.1", 7946], ["10.0.0.2", 7946], ["10.9.9.9", 1]])
depths = st.sampled_from([1, 2, 10, 100, 500, 1000])


@st.composite
def hostile_field(draw: st.DrawFn, kind: str) -> object:
    """A value for a field of ``kind``: sometimes good, sometimes hostile."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return nested(draw(depths))
    if kind == "name":
        return draw(st.one_of(good_names, bad_names))
    if kind == "addr":
        return draw(st.one_of(good_addr, st.lists(st.one_of(bad_hosts, bad_ports),
                                                  min_size=0, max_size=3),
                              st.tuples(bad_hosts, st.integers(1, 65535)).map(list),
                              st.tuples(st.just("10.0.0.9"), bad_ports).map(list)))
    if kind == "inc":
        return draw(st.one_of(st.integers(0, 5), huge,
                              st.integers(MAX_COUNTER - 3, MAX_COUNTER),
                              st.integers(2, 2**25)))
    if kind == "meta":
        return draw(st.one_of(st.just({}), st.dictionaries(
            st.one_of(good_names, bad_names), st.one_of(good_names, bad_names),
            max_size=4), st.just({f"k{i}": "v" for i in range(100)})))
    return draw(st.booleans())


@st.composite
def hostile_message(draw: st.DrawFn) -> list[object]:
    f = lambda kind: draw(hostile_field(kind))  # noqa: E731
    t = draw(st.sampled_from([PING, INDIRECT, ACK, NACK, ALIVE, SUSPECT, DEAD, USER,
                              PUSH_PULL, 77]))
    if t == PING:
        return [t, f("inc"), f("name"), f("name")]
    if t == INDIRECT:
        return [t, f("inc"), f("name"), f("addr"), f("name"), f("bool")]
    if t in (ACK, NACK):
        return [t, f("inc")]
    if t == ALIVE:
        return [t, f("inc"), f("name"), f("addr"), f("meta")]
    if t in (SUSPECT, DEAD):
        return [t, f("inc"), f("name"), f("name")]
    if t == USER:
        return [t, draw(st.sampled_from(["catalog", "policy", "keyring", "x" * 40, "\x00"])),
                draw(st.binary(max_size=64))]
    if t == PUSH_PULL:
        rows = [[f("name"), f("addr"), f("inc"), draw(st.sampled_from([0, 1, 2, 3, 9])),
                 f("meta")] for _ in range(draw(st.integers(0, 3)))]
        return [t, f("bool"), f("name"), rows, {}]
    return [t, nested(draw(depths))]


# ---- decoding never raises anything but the codec's error ----------------------------------


@settings(max_examples=400, deadline=None)
@given(st.lists(hostile_message(), min_size=1, max_size=6))
def test_hostile_fields_decode_to_valid_messages_or_the_codec_error(
        msgs: list[list[object]]) -> None:
    try:
        decoded = decode_packet(packet(*msgs))
    except DecodeError as e:
        assert len(str(e)) < 300  # never the repr of what arrived
        return
    for m in decoded:  # whatever got through holds only values the core can act on
        for value in vars(m).values() if hasattr(m, "__dict__") else ():
            assert "\x00" not in str(value)


@pytest.mark.parametrize("depth", [1, 10, 100, 900, 1000, 1020, 2000])
def test_nesting_at_any_depth_in_any_field_raises_only_the_codec_error(depth: int) -> None:
    deep = nested(depth)
    shapes = [[deep], [PING, deep, "a", "b"], [ALIVE, 1, deep, ["10.0.0.1", 1], {}],
              [ALIVE, 1, "a", [deep, 1], {}], [PUSH_PULL, False, "a", [[deep]], {}],
              [deep, 1]]
    for shape in shapes:
        data = packet(shape)
        with pytest.raises(DecodeError):
            decode_packet(data)
        with pytest.raises(DecodeError):
            decode_frame_body(data)
    with pytest.raises(CatalogDecodeError):
        decode(b"\x01" + raw([deep, 1]))
    with pytest.raises(CatalogDecodeError):
        decode(b"\x01" + raw([MSG_RECORDS, deep, 1, []]))
    as_python: object = 1
    for _ in range(depth):
        as_python = [as_python]
    assert len(describe(as_python)) < 40


def test_a_packet_of_thousands_of_parts_is_refused_whole() -> None:
    with pytest.raises(DecodeError, match="at most"):
        decode_packet(packet(*[[ACK, i] for i in range(5000)]))


# ---- the core under a hostile peer ---------------------------------------------------------


def _cluster(n: int = 4) -> tuple[FakeNet, list[Membership]]:
    net = FakeNet(CFG)
    return net, net.cluster(n)


def _all_alive(cores: list[Membership]) -> bool:
    names = {c.name for c in cores}
    return all(c.members[n].status == Status.ALIVE for c in cores for n in names)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(hostile_message(), min_size=1, max_size=8), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_no_hostile_datagram_or_stream_escapes_the_core_or_fails_a_live_member(
        batches: list[list[list[object]]], rnd: random.Random) -> None:
    net, cores = _cluster(4)
    for batch in batches:
        victim = rnd.choice(cores)
        victim.receive(net.now, ATTACKER, packet(*batch))
        net.flush(victim.name)
        victim.handle_stream(net.now, ATTACKER, frame_body(batch[0]))
        net.flush(victim.name)
        net.run(0.5)
    net.run(20.0)  # several suspicion timeouts: any false accusation would have fired
    assert _all_alive(cores)
    assert all(len(c.members) <= CFG.max_members for c in cores)


def test_a_forged_dead_near_the_counter_cap_is_absurd_and_fails_nobody() -> None:
    net, cores = _cluster(3)
    victim = cores[1].name
    for inc in (2**64 - 1, 2**63, 2**53):  # beyond the wire's cap: malformed
        cores[0].receive(net.now, ATTACKER, packet([DEAD, inc, victim, "x"]))
    assert cores[0].stats["packets_malformed"] == 3
    for inc in (MAX_COUNTER, MAX_COUNTER - 1, 1 + MAX_INCARNATION_JUMP + 1):
        for c in cores:  # sent to every agent, the victim included
            c.receive(net.now, ATTACKER, packet([DEAD, inc, victim, "x"]))
            c.receive(net.now, ATTACKER, packet([SUSPECT, inc, victim, "x"]))
            net.flush(c.name)
    assert all(c.stats["incarnations_absurd"] == 6 for c in cores)
    net.run(30.0)
    assert _all_alive(cores)
    assert cores[1].incarnation < 10  # the victim was never pushed up the counter


def test_a_plausible_forged_accusation_is_refuted_as_ever() -> None:
    net, cores = _cluster(3)
    victim = cores[1]
    inc = victim.incarnation
    cores[0].receive(net.now, ATTACKER, packet([DEAD, inc + 5, victim.name, "x"]))
    net.flush(cores[0].name)
    net.run_until(lambda: _all_alive(cores), 30)
    assert victim.incarnation == inc + 6


def test_the_owner_refutes_forged_metadata_about_itself() -> None:
    net, cores = _cluster(3)
    owner = cores[2]
    evil = [ALIVE, owner.incarnation + 1, owner.name, list(owner.addr), {"role": "evil"}]
    cores[0].receive(net.now, ATTACKER, packet(evil))
    net.flush(cores[0].name)
    net.run_until(lambda: all(c.members[owner.name].meta.get("role") != "evil"
                              and c.members[owner.name].incarnation == owner.incarnation
                              for c in cores), 10)
    assert owner.stats["refutations"] == 1


def test_bad_addresses_never_reach_the_send_path() -> None:
    net, cores = _cluster(3)
    for host in ("127.0.0.1\x00", "a" * 64 + ".example", "fe80::1%\x00", "localhost"):
        for port in (1, 0, 65536):
            cores[0].receive(net.now, ATTACKER, packet([ALIVE, 1, f"x{host}{port}",
                                                        [host, port], {}]))
    assert cores[0].stats["packets_malformed"] == 12
    assert set(cores[0].members) == {c.name for c in cores}
    # Even a well-formed canonical address is what the core stores and sends to.
    cores[0].receive(net.now, ATTACKER, packet([ALIVE, 1, "v6", ["0:0::1", 9], {}]))
    assert cores[0]._pending["v6"].alive.addr == ("::1", 9)


def test_one_probe_is_answered_per_datagram_and_ping_reqs_only_reach_members() -> None:
    net, cores = _cluster(3)
    me = cores[0]
    me.take_effects()
    me.receive(net.now, ATTACKER, packet(*[[PING, i, me.name, "x"] for i in range(200)]))
    sent = [e for e in me.take_effects() if isinstance(e, SendPacket)]
    assert len(sent) == 1 and me.stats["probes_dropped_extra"] == 199
    reflect = ("10.0.0.99", 53)
    me.receive(net.now, ATTACKER, packet(*[[INDIRECT, i, "ghost", list(reflect), "x", True]
                                          for i in range(200)]))
    me.receive(net.now, ATTACKER, packet([INDIRECT, 1, cores[1].name, list(reflect), "x",
                                          True]))
    assert not [e for e in me.take_effects() if isinstance(e, SendPacket)]
    assert me.stats["indirect_pings_refused"] == 2  # one per datagram is even looked at
    # A ping-req for a member we know, at the address we know, is relayed as ever.
    me.receive(net.now, ATTACKER, packet([INDIRECT, 7, cores[1].name, list(cores[1].addr),
                                          "x", True]))
    assert [e.addr for e in me.take_effects() if isinstance(e, SendPacket)] == [cores[1].addr]


def test_thousands_of_invented_members_are_throttled_and_bounded() -> None:
    net, cores = _cluster(3)
    me = cores[0]
    for d in range(24):  # 6,000 names in 24 datagrams from one host
        me.receive(net.now, ATTACKER, packet(*[
            [ALIVE, 1, f"fake-{d}-{i}", [f"10.{d}.{i // 256}.{i % 256}", 7946], {}]
            for i in range(250)]))
    # None is admitted (nobody answers at their addresses); the throttle caps what
    # even waits for an answer, and so the pings it costs.
    assert len(me.members) == 3
    assert me.stats["new_members_throttled"] == 6000 - CFG.new_member_burst
    assert me.stats["admission_pings"] == CFG.new_member_burst
    # From many hosts: the pending cap and the ping budget hold.
    for h in range(40):
        me.receive(net.now + h / 100, (f"10.77.0.{h}", 1), packet(*[
            [ALIVE, 1, f"h{h}-{i}", [f"10.77.{h}.{i}", 7946], {}] for i in range(200)]))
    # 8,000 more names: the ping budget (a burst, then a rate) runs out first, the
    # rest wait their turn unpinged, and past the pending cap they are refused.
    assert len(me._pending) == CFG.max_pending
    assert me.stats["admissions_refused_full"] == 512 + 8000 - CFG.max_pending
    assert me.stats["admission_pings"] <= CFG.admission_burst + CFG.admission_rate * 0.4 + 1
    assert me.stats["admissions_throttled"] == CFG.max_pending - me.stats["admission_pings"]
    net.run(15.0)
    assert len(me.members) == 3 and not me._pending  # all timed out
    assert _all_alive(cores)


def test_catalog_records_with_hostile_fields_raise_only_the_catalog_error() -> None:
    bad = [["id", "web", "a" * 64 + ".x", 80, [], "", 1, 0, [], 1, False],
           ["id", "web", "", 80, ["\x00"], "", 1, 0, [], 1, False],
           ["id", "web", "", 80, [], "", 1, 0, [], 2**60, False]]
    for rec in bad:
        with pytest.raises(CatalogDecodeError):
            decode(encode([MSG_RECORDS, "n0", 1, [rec]]))
    for node in ("", "a\x00", "x" * 200):
        with pytest.raises(CatalogDecodeError):
            decode(encode([MSG_RECORDS, node, 1, []]))
    c = Membership("me", ("10.0.0.1", 1), CFG, random.Random(1))
    cat = Catalog(c, epoch=1)
    for rec in bad:
        cat.notify_message(0.0, encode([MSG_RECORDS, "n0", 1, [rec]]))
    assert cat.stats["decode_errors"] == 3


def test_a_forged_leave_is_heard_by_its_victim_and_refuted() -> None:
    """Found by the hypothesis test above: a plaintext `dead` from a member about itself
    (a leave) spread, and no one gossiped to the "left" member, so it never heard."""
    for victim in range(1, 4):
        net, cores = _cluster(4)
        cores[victim].receive(net.now, ATTACKER, packet([DEAD, 1, "n0", "n0"]))
        net.flush(cores[victim].name)
        net.run_until(lambda cs=cores: _all_alive(cs), 20)
        assert cores[0].stats["refutations"] == 1
