"""Wire format: msgpack messages behind a version byte.

A *packet* (one UDP datagram, before the optional encryption envelope) is the version
byte followed by a msgpack array of messages, so every datagram is a compound packet:
probes carry piggybacked broadcasts without a second framing layer. A *frame* on a TCP
stream is a 4-byte big-endian length and a packet holding exactly one message.

Each message is a msgpack array whose first element is its type code. Decoding untrusted
bytes raises :class:`DecodeError` and nothing else: msgpack's own exceptions and every
shape or type mismatch are translated, so callers need exactly one ``except``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from .fields import (
    MAX_NAME,
    describe,
    ip_literal,
    valid_counter,
    valid_name,
    valid_port,
    valid_text,
)

PROTOCOL_VERSION = 1
#: Largest frame accepted on a stream (push-pull of a big cluster plus app state).
MAX_FRAME = 16 * 1024 * 1024
#: Largest datagram accepted; anything bigger is not ours.
MAX_PACKET = 65_535
FRAME_HEADER = struct.Struct(">I")
#: Messages in one datagram: a full 1,400-byte packet holds well under a hundred, so
#: thousands of parts are someone else's packet (each part could cost us a reply).
MAX_PARTS = 256
#: Rows of one push-pull (members of a cluster) and delegate channels in it.
MAX_STATES = 1 << 17
MAX_CHANNELS = 16
MAX_CHANNEL = 32
#: Tags of one member, and the length of each key and value.
MAX_META_ENTRIES = 64
MAX_META_TEXT = 512

Address = tuple[str, int]
Meta = dict[str, str]


class _EmptyMeta(dict[str, str]):
    """The one metadata map of every member that has none (most do): a 10,000-node
    simulation holds 10^8 member records, and an empty dict each would be 6 GiB.
    Shared, hence read-only (its mutators are replaced below)."""

    __slots__ = ()


def _read_only(*args: object, **kwargs: object) -> None:
    raise TypeError("the shared empty metadata is read-only")


for _method in ("__setitem__", "__delitem__", "__ior__", "update", "setdefault", "pop",
                "popitem", "clear"):
    setattr(_EmptyMeta, _method, _read_only)


#: Shared empty metadata; ``own_meta`` hands it out instead of a fresh empty dict.
EMPTY_META: Meta = _EmptyMeta()


def own_meta(meta: Meta) -> Meta:
    """A private copy of ``meta`` for a member record (the shared one when empty)."""
    return dict(meta) if meta else EMPTY_META


class DecodeError(ValueError):
    """Bytes that are not a well-formed rumor packet, frame or message."""


class Status:
    """Member status codes on the wire (and their names in the API)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3
    NAMES: ClassVar[dict[int, str]] = {0: "alive", 1: "suspect", 2: "failed", 3: "left"}


# ---- messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. ``target`` names the member we mean to reach, so a process that
    took over the address under another name does not answer for it."""

    TYPE: ClassVar[int] = 1
    seq: int
    target: str
    source: str


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask a member to probe ``target`` for us and relay the ack (SWIM ping-req)."""

    TYPE: ClassVar[int] = 2
    seq: int
    target: str
    target_addr: Address
    requester: str
    #: Lifeguard: the relay answers with a nack if the target stays silent.
    want_nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    TYPE: ClassVar[int] = 3
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: "I tried and the target did not answer" — proves the relay is alive
    and that our own probe path works, which feeds our local-health score."""

    TYPE: ClassVar[int] = 4
    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    TYPE: ClassVar[int] = 5
    incarnation: int
    node: str
    addr: Address
    meta: Meta = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Suspect:
    TYPE: ClassVar[int] = 6
    incarnation: int
    node: str
    source: str


@dataclass(frozen=True, slots=True)
class Dead:
    """A failure (``source`` is the accuser) or, when ``source == node``, a leave."""

    TYPE: ClassVar[int] = 7
    incarnation: int
    node: str
    source: str


@dataclass(frozen=True, slots=True)
class UserMessage:
    """An opaque broadcast of a higher layer (catalog, policy), tagged by channel."""

    TYPE: ClassVar[int] = 8
    channel: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class MemberState:
    """One row of a push-pull exchange."""

    name: str
    addr: Address
    incarnation: int
    status: int
    meta: Meta = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full-state exchange (anti-entropy) over a stream; also the join handshake."""

    TYPE: ClassVar[int] = 9
    join: bool
    source: str
    states: tuple[MemberState, ...]
    #: Each delegate channel's opaque state.
    user: dict[str, bytes] = field(default_factory=dict)


#: Message types from here up are optional: a member that does not know one skips it
#: (and counts it) instead of refusing the datagram, so a newer member can add one
#: without cutting itself off from older ones.
OPTIONAL_TYPES = 32


@dataclass(frozen=True, slots=True)
class Digest:
    """A summary of the sender's application state (catalog, policies), carried in
    every datagram: ``summary`` is a 32-bit hash of it and ``stable_ms`` how long it
    has not changed. Two members whose summaries differ after both were stable for a
    while missed something; one of them starts a push-pull (``anti_entropy.py``)."""

    TYPE: ClassVar[int] = OPTIONAL_TYPES
    node: str
    summary: int
    stable_ms: int


@dataclass(frozen=True, slots=True)
class SignedAlive:
    """A member's alive in its own words: ``body`` is the exact packed ``Alive``,
    ``sig`` the member's node-key signature of ``ALIVE_CONTEXT + body`` and
    ``credential`` the encoded credential binding its name to that key
    (``identity.py``). Optional, so version-1 members skip it; in ``prefer`` mode the
    plain alive travels beside it."""

    TYPE: ClassVar[int] = OPTIONAL_TYPES + 1
    alive: Alive
    body: bytes
    sig: bytes
    credential: bytes


@dataclass(frozen=True, slots=True)
class SignedLeave:
    """A member's graceful leave in its own words: ``body`` is the exact packed
    ``Dead`` with ``source == node``, ``sig`` its signature of ``LEAVE_CONTEXT + body``."""

    TYPE: ClassVar[int] = OPTIONAL_TYPES + 2
    dead: Dead
    body: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class UserRequest:
    """A higher layer's request to one member, by stream, whose reply frame is a
    ``UserMessage`` of the same channel (``Membership.request``). Optional: a member
    of an older build skips it and closes the stream, which the requester reads as a
    failed exchange."""

    TYPE: ClassVar[int] = OPTIONAL_TYPES + 3
    channel: str
    payload: bytes
    #: The requester, for whom the reply is sealed.
    source: str


@dataclass(frozen=True, slots=True)
class Skipped:
    """An optional message of a type this version does not know (never sent)."""

    type: int


Message = (Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | UserMessage | PushPull
           | Digest | SignedAlive | SignedLeave | UserRequest | Skipped)


# ---- encoding -------------------------------------------------------------------------


def _addr(a: Address) -> list[Any]:
    return [a[0], a[1]]


def message_to_list(m: Message) -> list[Any]:
    """The msgpack-ready array form of a message."""
    if isinstance(m, Ping):
        return [Ping.TYPE, m.seq, m.target, m.source]
    if isinstance(m, IndirectPing):
        return [IndirectPing.TYPE, m.seq, m.target, _addr(m.target_addr), m.requester,
                m.want_nack]
    if isinstance(m, Ack):
        return [Ack.TYPE, m.seq]
    if isinstance(m, Nack):
        return [Nack.TYPE, m.seq]
    if isinstance(m, Alive):
        return [Alive.TYPE, m.incarnation, m.node, _addr(m.addr), m.meta]
    if isinstance(m, Suspect):
        return [Suspect.TYPE, m.incarnation, m.node, m.source]
    if isinstance(m, Dead):
        return [Dead.TYPE, m.incarnation, m.node, m.source]
    if isinstance(m, UserMessage):
        return [UserMessage.TYPE, m.channel, m.payload]
    if isinstance(m, Digest):
        return [Digest.TYPE, m.node, m.summary, m.stable_ms]
    if isinstance(m, SignedAlive):
        return [SignedAlive.TYPE, m.body, m.sig, m.credential]
    if isinstance(m, SignedLeave):
        return [SignedLeave.TYPE, m.body, m.sig]
    if isinstance(m, UserRequest):
        return [UserRequest.TYPE, m.channel, m.payload, m.source]
    if isinstance(m, PushPull):
        return [PushPull.TYPE, m.join, m.source,
                [[s.name, _addr(s.addr), s.incarnation, s.status, s.meta] for s in m.states],
                m.user]
    raise TypeError(f"not a message: {m!r}")


def encode_packet(messages: Sequence[Message]) -> bytes:
    body: bytes = msgpack.packb([message_to_list(m) for m in messages])
    return bytes([PROTOCOL_VERSION]) + body


def encode_packet_raw(items: Sequence[bytes]) -> bytes:
    """Assemble a packet from messages already packed with ``pack_message``.

    Broadcasts are packed once when queued and reused for every retransmission."""
    n = len(items)
    if n < 16:
        head = bytes([0x90 | n])
    elif n < 65536:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:  # pragma: no cover - never this many messages in a datagram
        raise ValueError("too many messages")
    return bytes([PROTOCOL_VERSION]) + head + b"".join(items)


def pack_message(m: Message) -> bytes:
    data: bytes = msgpack.packb(message_to_list(m))
    return data


#: Bytes a packet spends besides its messages (version byte + array header).
PACKET_OVERHEAD = 4


def encode_frame(m: Message) -> bytes:
    body = encode_packet([m])
    return FRAME_HEADER.pack(len(body)) + body


# ---- decoding -------------------------------------------------------------------------


def _int(v: Any) -> int:
    """A sequence number or incarnation (capped: see ``fields.MAX_COUNTER``)."""
    if not valid_counter(v):
        raise DecodeError(f"expected a counter from 0 to 2^53-1, got {describe(v)}")
    return int(v)


def _name(v: Any) -> str:
    if not valid_name(v):
        raise DecodeError(f"expected a member name (1 to {MAX_NAME} printable "
                          f"characters), got {describe(v)}")
    return str(v)


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise DecodeError(f"expected a boolean, got {describe(v)}")
    return v


def _address(v: Any) -> Address:
    """A member address: an IP literal (never a name to resolve) and a port we can
    send to; the host is returned in canonical form, so one host has one spelling."""
    if type(v) is not list or len(v) != 2:
        raise DecodeError(f"expected an address [host, port], got {describe(v)}")
    host = ip_literal(v[0])
    if host is None:
        raise DecodeError(f"address host is not an IP address literal ({describe(v[0])})")
    if not valid_port(v[1]):
        raise DecodeError("address port must be 1 to 65535")
    return (host, v[1])


def _meta(v: Any) -> Meta:
    if type(v) is not dict or len(v) > MAX_META_ENTRIES:
        raise DecodeError(f"expected a metadata map of at most {MAX_META_ENTRIES} "
                          f"entries, got {describe(v)}")
    if not v:
        return EMPTY_META
    for k, x in v.items():
        if not valid_text(k, MAX_META_TEXT) or not k or not valid_text(x, MAX_META_TEXT):
            raise DecodeError("metadata keys and values are printable text of at most "
                              f"{MAX_META_TEXT} characters")
    return v


def _channel(v: Any) -> str:
    if not valid_text(v, MAX_CHANNEL) or not v:
        raise DecodeError(f"expected a channel name, got {describe(v)}")
    return str(v)


def _fields(v: list[Any], n: int) -> list[Any]:
    if len(v) != n:
        raise DecodeError(f"message type {v[0]} expects {n - 1} fields, got {len(v) - 1}")
    return v


def message_from_list(v: Any) -> Message:
    """The message an array encodes; every field is checked here, once per message
    type, so the core only ever sees values it can act on."""
    if type(v) is not list or not v:
        raise DecodeError(f"a message is a non-empty array, got {describe(v)}")
    t = v[0]
    if type(t) is not int:
        raise DecodeError(f"a message type is an integer, got {describe(t)}")
    if t == Ping.TYPE:
        _, seq, target, source = _fields(v, 4)
        return Ping(_int(seq), _name(target), _name(source))
    if t == IndirectPing.TYPE:
        _, seq, target, addr, requester, nack = _fields(v, 6)
        return IndirectPing(_int(seq), _name(target), _address(addr), _name(requester),
                            _bool(nack))
    if t == Ack.TYPE:
        return Ack(_int(_fields(v, 2)[1]))
    if t == Nack.TYPE:
        return Nack(_int(_fields(v, 2)[1]))
    if t == Alive.TYPE:
        _, inc, node, addr, meta = _fields(v, 5)
        return Alive(_int(inc), _name(node), _address(addr), _meta(meta))
    if t == Suspect.TYPE:
        _, inc, node, source = _fields(v, 4)
        return Suspect(_int(inc), _name(node), _name(source))
    if t == Dead.TYPE:
        _, inc, node, source = _fields(v, 4)
        return Dead(_int(inc), _name(node), _name(source))
    if t == UserMessage.TYPE:
        _, channel, payload = _fields(v, 3)
        if type(payload) is not bytes:
            raise DecodeError(f"user payload must be bytes, got {describe(payload)}")
        return UserMessage(_channel(channel), payload)
    if t == PushPull.TYPE:
        _, join, source, states, user = _fields(v, 5)
        if type(states) is not list or len(states) > MAX_STATES:
            raise DecodeError(f"push-pull expects at most {MAX_STATES} state rows, got "
                              f"{describe(states)}")
        rows = tuple(_member_state(s) for s in states)
        return PushPull(_bool(join), _name(source), rows, _user_states(user))
    if t == Digest.TYPE:
        _, node, summary, stable = _fields(v, 4)
        if type(summary) is not int or not 0 <= summary < 1 << 32:
            raise DecodeError(f"a state summary is a 32-bit number, got {describe(summary)}")
        return Digest(_name(node), summary, _int(stable))
    if t == SignedAlive.TYPE:
        _, body, sig, cred = _fields(v, 4)
        inner = _inner(body, Alive)
        assert isinstance(inner, Alive)
        return SignedAlive(inner, body, _signature(sig), _bytes(cred, MAX_CREDENTIAL))
    if t == SignedLeave.TYPE:
        _, body, sig = _fields(v, 3)
        inner = _inner(body, Dead)
        assert isinstance(inner, Dead)
        if inner.source != inner.node:
            raise DecodeError("a signed leave is a dead whose source is its node")
        return SignedLeave(inner, body, _signature(sig))
    if t == UserRequest.TYPE:
        _, channel, payload, source = _fields(v, 4)
        if type(payload) is not bytes:
            raise DecodeError(f"request payload must be bytes, got {describe(payload)}")
        return UserRequest(_channel(channel), payload, _name(source))
    if t >= OPTIONAL_TYPES:
        return Skipped(t)
    raise DecodeError(f"unknown message type {t}")


#: Longest credential carried in a signed alive (``node_key.MAX_CREDENTIAL``).
MAX_CREDENTIAL = 1024
#: Longest message inside a signed one (an alive with the most tags fits a stream).
MAX_SIGNED_BODY = 48 * 1024


def _bytes(v: Any, limit: int) -> bytes:
    if type(v) is not bytes or len(v) > limit:
        raise DecodeError(f"expected at most {limit} bytes, got {describe(v)}")
    return v


def _signature(v: Any) -> bytes:
    if type(v) is not bytes or len(v) != 64:
        raise DecodeError(f"expected a 64-byte signature, got {describe(v)}")
    return v


def _inner(body: Any, kind: type) -> Message:
    """The message packed in a signed one's ``body``: exactly one of ``kind``."""
    raw = _bytes(body, MAX_SIGNED_BODY)
    try:
        v = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types; callers want exactly one
        raise DecodeError(f"malformed signed body: {type(e).__name__}") from None
    # The type first: a signed body is never itself signed (no recursion).
    if type(v) is not list or not v or v[0] != kind.TYPE:  # type: ignore[attr-defined]
        raise DecodeError(f"a signed body must hold one {kind.__name__.lower()}")
    return message_from_list(v)


def _member_state(s: Any) -> MemberState:
    if type(s) is not list or len(s) != 5:
        raise DecodeError(f"push-pull state rows have 5 fields, got {describe(s)}")
    status = _int(s[3])
    if status not in Status.NAMES:
        raise DecodeError(f"unknown member status {status}")
    return MemberState(_name(s[0]), _address(s[1]), _int(s[2]), status, _meta(s[4]))


def _user_states(user: Any) -> dict[str, bytes]:
    if type(user) is not dict or len(user) > MAX_CHANNELS:
        raise DecodeError(f"push-pull expects a map of at most {MAX_CHANNELS} channel "
                          f"states, got {describe(user)}")
    udata: dict[str, bytes] = {}
    for k, x in user.items():
        if type(x) is not bytes:
            raise DecodeError(f"push-pull user state must be bytes, got {describe(x)}")
        udata[_channel(k)] = x
    return udata


def _check(data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise DecodeError(f"packet of {len(data)} bytes exceeds the {limit}-byte limit")
    if not data:
        raise DecodeError("empty packet")
    if data[0] != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported protocol version {data[0]}")


def _unpack(data: bytes, limit: int) -> Any:
    _check(data, limit)
    try:
        # unpackb bounds every string/array/map length by the input size itself.
        return msgpack.unpackb(data[1:], raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises many types; callers want exactly one
        raise DecodeError(f"malformed msgpack: {type(e).__name__}") from None


def decode_packet(data: bytes) -> list[Message]:
    """Decode one datagram into its messages."""
    if len(data) > 2 and data[1] != 0x91:  # more than one message: maybe broadcasts
        _check(data, MAX_PACKET)
        try:
            return _decode_broadcasts(bytes(data))  # messages are dict keys: hashable
        except DecodeError:
            raise
        except Exception as e:  # msgpack raises many types; callers want exactly one
            raise DecodeError(f"malformed msgpack: {type(e).__name__}") from None
    body = _unpack(data, MAX_PACKET)
    if type(body) is not list or len(body) > MAX_PARTS:
        raise DecodeError(f"a packet is an array of at most {MAX_PARTS} messages")
    return [message_from_list(m) for m in body]


def decode_frame_body(data: bytes) -> Message:
    """Decode a stream frame's body (after the length header): exactly one message."""
    if data[1:4] == _PUSH_PULL_HEAD:
        _check(data, MAX_FRAME)
        try:
            return _decode_push_pull(bytes(data))  # rows are dict keys: hashable
        except DecodeError:
            raise
        except Exception as e:  # msgpack raises many types; callers want exactly one
            raise DecodeError(f"malformed msgpack: {type(e).__name__}") from None
    body = _unpack(data, MAX_FRAME)
    if type(body) is not list or len(body) != 1:
        raise DecodeError("a frame holds exactly one message")
    return message_from_list(body[0])


# ---- decoding each broadcast once -------------------------------------------------------

#: Alive/suspect/dead messages already decoded, by their bytes. A broadcast is packed
#: once and then sent ``retransmit_limit`` times by every member that relays it, so
#: each member receives the same bytes many times over (about 20 times at 10,000
#: members, thousands of times across a simulation); validating them once and
#: sharing the frozen message is safe, and the core copies what it keeps.
_SEEN: dict[bytes, Message] = {}
_CACHED_TYPES = frozenset({Alive, Suspect, Dead, SignedAlive, SignedLeave})
_SEEN_MAX = 1 << 16


def _decode_broadcasts(data: bytes) -> list[Message]:
    """``decode_packet`` message by message through ``_SEEN``."""
    up = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(data))
    up.feed(data)
    up.read_bytes(1)  # the version byte
    n = up.read_array_header()
    if n > MAX_PARTS:
        raise DecodeError(f"a packet is an array of at most {MAX_PARTS} messages")
    out: list[Message] = []
    seen, pos = _SEEN, up.tell()
    for _ in range(n):
        up.skip()
        end = up.tell()
        raw = data[pos:end]
        pos = end
        m = seen.get(raw)
        if m is None:
            m = message_from_list(msgpack.unpackb(raw, raw=False, strict_map_key=True))
            if type(m) in _CACHED_TYPES:
                if len(seen) >= _SEEN_MAX:
                    seen.clear()
                seen[raw] = m
        out.append(m)
    if pos != len(data):
        raise DecodeError("trailing bytes after the messages")
    return out


# ---- push-pull fast path ----------------------------------------------------------------

#: A frame of one push-pull message: array of 1, array of 5, type code 9.
_PUSH_PULL_HEAD = bytes([0x91, 0x95, PushPull.TYPE])

#: Push-pull rows already decoded, by their bytes. Every member's row is the same in
#: the tables of all its peers, so a row is validated once and its ``MemberState``
#: (name, address and metadata included) shared by every decoder: at 10,000 members
#: a push-pull carries 10,000 rows, and a simulation decodes thousands of them.
_ROWS: dict[bytes, MemberState] = {}
_ROWS_MAX = 1 << 17


def _decode_push_pull(data: bytes) -> PushPull:
    """``message_from_list`` of a push-pull frame, row by row through ``_ROWS``."""
    up = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(data))
    up.feed(data)
    up.read_bytes(4)  # version, the two array headers and the type code
    join, source = up.unpack(), up.unpack()
    n = up.read_array_header()
    if n > MAX_STATES:
        raise DecodeError(f"push-pull expects at most {MAX_STATES} state rows")
    rows: list[MemberState] = []
    cache, pos = _ROWS, up.tell()
    for _ in range(n):
        up.skip()
        end = up.tell()
        raw = data[pos:end]
        pos = end
        st = cache.get(raw)
        if st is None:
            st = _member_state(msgpack.unpackb(raw, raw=False, strict_map_key=True))
            if len(cache) >= _ROWS_MAX:
                cache.clear()
            cache[raw] = st
        rows.append(st)
    user = up.unpack()
    if up.tell() != len(data):
        raise DecodeError("trailing bytes after the push-pull message")
    return PushPull(_bool(join), _name(source), tuple(rows), _user_states(user))


def encode_push_pull(join: bool, source: str,
                     rows: Sequence[tuple[str, Address, int, int, Meta]],
                     user: dict[str, bytes]) -> bytes:
    """``encode_packet([PushPull(...)])`` from plain rows (name, address, incarnation,
    status, meta), without building a ``MemberState`` per member: the same bytes."""
    body: bytes = msgpack.packb([[PushPull.TYPE, join, source, rows, user]])
    return bytes([PROTOCOL_VERSION]) + body


def decode_signed(raw: Any) -> SignedAlive | SignedLeave:
    """One packed signed statement (a push-pull ``identity`` entry), decoded once per
    distinct bytes for the whole process, like the broadcasts."""
    if type(raw) is not bytes:
        raise DecodeError(f"a signed statement is bytes, got {describe(raw)}")
    m = _SEEN.get(raw)
    if m is None:
        try:
            v = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises many types; callers want exactly one
            raise DecodeError(f"malformed signed statement: {type(e).__name__}") from None
        m = message_from_list(v)
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        _SEEN[raw] = m
    if not isinstance(m, (SignedAlive, SignedLeave)):
        raise DecodeError("not a signed statement")
    return m
