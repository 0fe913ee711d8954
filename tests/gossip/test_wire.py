"""Property tests of the wire format: round trips, and hostile bytes only ever raise
the codec's own error."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip import wire
from rumor.gossip.address import format_address, parse_address
from rumor.gossip.fields import MAX_COUNTER
from rumor.gossip.wire import (
    Ack,
    Alive,
    Dead,
    DecodeError,
    Digest,
    IndirectPing,
    MemberState,
    Nack,
    Ping,
    PushPull,
    Skipped,
    Suspect,
    UserMessage,
)

printable = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Co", "Cn"))
names = st.text(printable, min_size=1, max_size=40).filter(str.isprintable)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
u64 = st.integers(min_value=0, max_value=MAX_COUNTER)
hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(lambda ip: ip.compressed)
addrs = st.tuples(hosts, st.integers(1, 65535))
metas = st.dictionaries(names, st.text(printable, max_size=40).filter(str.isprintable),
                        max_size=5)
states = st.builds(MemberState, names, addrs, u64, st.sampled_from([0, 1, 2, 3]), metas)

messages = st.one_of(
    st.builds(Ping, u32, names, names),
    st.builds(IndirectPing, u32, names, addrs, names, st.booleans()),
    st.builds(Ack, u32),
    st.builds(Nack, u32),
    st.builds(Alive, u64, names, addrs, metas),
    st.builds(Suspect, u64, names, names),
    st.builds(Dead, u64, names, names),
    st.builds(UserMessage, names.filter(lambda n: len(n) <= 32), st.binary(max_size=200)),
    st.builds(Digest, names, u32, u64),
    st.builds(PushPull, st.booleans(), names, st.lists(states, max_size=5).map(tuple),
              st.dictionaries(names.filter(lambda n: len(n) <= 32), st.binary(max_size=50),
                              max_size=3)),
)


@given(st.lists(messages, min_size=1, max_size=8))
def test_packet_round_trip(msgs: list[wire.Message]) -> None:
    assert wire.decode_packet(wire.encode_packet(msgs)) == msgs
    raw = wire.encode_packet_raw([wire.pack_message(m) for m in msgs])
    assert wire.decode_packet(raw) == msgs


@given(messages)
def test_frame_round_trip(m: wire.Message) -> None:
    frame = wire.encode_frame(m)
    (n,) = wire.FRAME_HEADER.unpack(frame[:4])
    assert n == len(frame) - 4
    assert wire.decode_frame_body(frame[4:]) == m


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    for decode in (wire.decode_packet, wire.decode_frame_body):
        with contextlib.suppress(DecodeError):
            decode(data)
        with contextlib.suppress(DecodeError):
            decode(bytes([wire.PROTOCOL_VERSION]) + data)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=5), kids,
                                                               max_size=4),
    max_leaves=30)


# Arrays that start with a real type code, so the per-type validation is exercised.
typed = st.tuples(st.integers(0, 10), st.lists(json_like, max_size=6)).map(
    lambda t: [t[0], *t[1]])


@settings(max_examples=300)
@given(st.lists(st.one_of(json_like, typed), max_size=4))
def test_well_formed_msgpack_of_wrong_shape_raises_only_decode_error(body: list[object]) -> None:
    data = bytes([wire.PROTOCOL_VERSION]) + msgpack.packb(body)
    with contextlib.suppress(DecodeError):
        wire.decode_packet(data)


def test_limits_and_versions() -> None:
    with pytest.raises(DecodeError, match="version"):
        wire.decode_packet(b"\x07" + msgpack.packb([]))
    with pytest.raises(DecodeError, match="empty"):
        wire.decode_packet(b"")
    with pytest.raises(DecodeError, match="limit"):
        wire.decode_packet(b"\x01" + b"\x00" * (wire.MAX_PACKET + 1))
    with pytest.raises(DecodeError, match="unknown message type"):
        wire.decode_packet(wire.encode_packet([]) [:1] + msgpack.packb([[20, 1]]))


def test_unknown_optional_messages_are_skipped_not_fatal() -> None:
    """Types from 32 up may be added by newer members: an older one skips them and
    still acts on the rest of the datagram (a ping must still be answered)."""
    head = wire.encode_packet([])[:1]
    msgs = wire.decode_packet(head + msgpack.packb([[1, 7, "b", "a"], [99, "x", 1]]))
    assert msgs == [Ping(7, "b", "a"), Skipped(99)]
    with pytest.raises(DecodeError, match="32-bit"):
        wire.decode_packet(head + msgpack.packb([[Digest.TYPE, "a", 1 << 32, 0]]))
    with pytest.raises(DecodeError, match="expects 3 fields"):
        wire.decode_packet(head + msgpack.packb([[Digest.TYPE, "a", 1]]))


def test_typical_probe_is_small() -> None:
    """Byte budgets (about 300 B/s per agent) depend on compact probes."""
    assert len(wire.encode_packet([Ping(2**31, "node-17", "node-03")])) < 30
    assert len(wire.encode_packet([Ack(2**31)])) < 12


@pytest.mark.parametrize("text,expected", [
    ("10.0.0.5:7946", ("10.0.0.5", 7946)),
    ("node1", ("node1", 7946)),
    ("[::1]:8000", ("::1", 8000)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert parse_address(format_address(expected)) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:", "host:99999", "host:x", "a:b:c", "[::1"])
def test_parse_address_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text, default_port=None if text == "host:" else 7946)


@given(st.booleans(), names, st.lists(states, max_size=6),
       st.dictionaries(names, st.binary(max_size=20), max_size=2))
def test_push_pull_fast_encoding_gives_the_same_bytes(join: bool, source: str,
                                                      rows: list[MemberState],
                                                      user: dict[str, bytes]) -> None:
    plain = wire.encode_packet([PushPull(join, source, tuple(rows), user)])
    fast = wire.encode_push_pull(join, source, [(s.name, s.addr, s.incarnation, s.status,
                                                 s.meta) for s in rows], user)
    assert fast == plain


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_push_pull_and_multi_message_prefixes_with_garbage_raise_only_decode_error(
        tail: bytes) -> None:
    """The fast paths (push-pull frames, datagrams of several messages) take their own
    route through msgpack; hostile bytes there must still raise only DecodeError."""
    for head in (b"\x01\x91\x95\x09", b"\x01\x92", b"\x01\x93\x95\x05"):
        for decode in (wire.decode_packet, wire.decode_frame_body):
            with contextlib.suppress(DecodeError):
                decode(head + tail)


def test_decoded_rows_and_broadcasts_are_shared_and_empty_meta_is_shared() -> None:
    row = MemberState("n1", ("10.0.0.1", 7946), 3, 0, {})
    a = wire.decode_frame_body(wire.encode_packet([PushPull(False, "x", (row,), {})]))
    b = wire.decode_frame_body(wire.encode_packet([PushPull(True, "y", (row,), {})]))
    assert isinstance(a, PushPull) and isinstance(b, PushPull)
    assert a.states[0] is b.states[0] and a.states[0] == row
    assert a.states[0].meta is wire.EMPTY_META
    alive = Alive(3, "n1", ("10.0.0.1", 7946), {})
    p1 = wire.decode_packet(wire.encode_packet([Ack(1), alive]))
    p2 = wire.decode_packet(wire.encode_packet([Ack(2), alive]))
    assert p1[1] is p2[1] and p1 == [Ack(1), alive] and p2[0] == Ack(2)
    with pytest.raises(DecodeError):  # trailing bytes after the messages
        wire.decode_packet(wire.encode_packet([Ack(1), alive]) + b"\x00")
