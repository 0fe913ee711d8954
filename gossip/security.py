"""Packet sealing and stream framing: the single place where gossip bytes are protected.

Every datagram and stream frame passes through a :class:`Seal` on its way out and in.
Plaintext is the default; the keyring (authenticated encryption with key rotation)
plugs in here without the membership core changing. ``open`` raises
:class:`SealError` for anything that does not authenticate, and the core drops such
bytes before parsing them.

*Addressing.* Sealed bytes are bound to the member they are meant for (``to``, its
name, is part of the authenticated data), so a packet recorded on its way to one
agent does not open at any other: replay protection covers the whole cluster, not
only the agent that saw the packet first. The one exception is a join, whose sender
knows the seed only by address: such frames are sealed to ``""`` and the core
accepts an unaddressed frame only if it is a join.

*Framing.* A stream carries frames: a header giving the body's length, then the
body. The plaintext header is the length in 4 bytes; an encrypted cluster seals the
header too, so a stranger cannot make an agent buffer a large frame before anything
has authenticated: until then at most ``PREAUTH_FRAME`` bytes are read, which is
enough for a keyless joiner's frame to be refused with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .effects import StreamReply
from .wire import FRAME_HEADER, MAX_FRAME


class SealError(ValueError):
    """Bytes that did not authenticate (wrong key, tampered, replayed, plaintext)."""


#: Largest frame read from a stream that has not authenticated (an encrypted
#: cluster's agent reads a plaintext frame only to refuse it with the reason).
PREAUTH_FRAME = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReadHeader:
    """The frame header is longer than what was read: read ``n`` more bytes."""

    n: int


@dataclass(frozen=True, slots=True)
class ReadBody:
    """The header is complete and acceptable: read a body of ``n`` bytes."""

    n: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """Send ``frame`` (a refusal saying why) and close; read nothing more."""

    frame: bytes
    reason: str


#: What to do after reading (part of) a frame header.
FrameStep = ReadHeader | ReadBody | Refuse


class Seal(Protocol):
    #: Bytes ``seal`` adds, so datagrams can be filled without exceeding the MTU.
    overhead: int

    def seal(self, now: float, data: bytes, to: str) -> bytes:
        """``data`` protected for member ``to`` (``""``: a seed known by address)."""
        ...

    def open(self, now: float, data: bytes, to: str) -> bytes:
        """The plaintext of bytes sealed for ``to`` (us); SealError otherwise."""
        ...

    def open_stream(self, now: float, data: bytes, to: str) -> tuple[bytes, bool]:
        """Like ``open`` for a stream frame, which may also be unaddressed (a join):
        the plaintext and whether it was addressed to ``to``."""
        ...

    def frame_header(self, now: float, n: int, to: str) -> bytes:
        """The header of a stream frame whose body is ``n`` bytes."""
        ...

    def read_frame_header(self, now: float, header: bytes, to: str) -> FrameStep:
        """What ``header`` (at least ``FRAME_HEADER.size`` bytes) asks for next."""
        ...


class Plaintext:
    overhead = 0

    def seal(self, now: float, data: bytes, to: str) -> bytes:
        return data

    def open(self, now: float, data: bytes, to: str) -> bytes:
        if data[:2] == SEALED_PREFIX:
            raise SealError(NO_KEY)
        return data

    def open_stream(self, now: float, data: bytes, to: str) -> tuple[bytes, bool]:
        return self.open(now, data, to), True

    def frame_header(self, now: float, n: int, to: str) -> bytes:
        return FRAME_HEADER.pack(n)

    def read_frame_header(self, now: float, header: bytes, to: str) -> FrameStep:
        if header[:2] == SEALED_PREFIX:
            return Refuse(refusal_frame(NO_KEY), NO_KEY)
        return plain_length(header, MAX_FRAME)


NO_KEY = "the packet is encrypted but the receiving agent has no gossip key (--keyring)"


def plain_length(header: bytes, limit: int) -> FrameStep:
    """A 4-byte length header, accepted up to ``limit``."""
    (n,) = FRAME_HEADER.unpack_from(header)
    if n > limit:
        why = f"frame of {n} bytes exceeds the {limit}-byte limit"
        return Refuse(refusal_frame(why), why)
    return ReadBody(n)


#: How sealed gossip begins (see ``keyring.py``); plaintext begins with byte 1.
SEALED_PREFIX = b"RK"
#: A stream answered with this, then a reason, was refused by a peer that could not
#: open it (no key, wrong key, plaintext to an encrypted cluster). It is the one
#: unauthenticated thing an agent sends: it says no more than that the port speaks
#: encrypted or plaintext gossip, and it turns a silent join failure into an error
#: an operator can act on.
REFUSAL = b"RK\x00"


def refusal(reason: str) -> bytes:
    return REFUSAL + reason.encode("utf-8", "replace")[:200]


def refusal_reply(reason: str) -> StreamReply:
    """A refusal as a reply frame (plain length header): readable by any peer."""
    body = refusal(reason)
    return StreamReply(body, FRAME_HEADER.pack(len(body)))


def refusal_frame(reason: str) -> bytes:
    """``refusal_reply`` as the bytes to write."""
    return refusal_reply(reason).frame


def refusal_reason(data: bytes) -> str | None:
    """The reason of a refusal reply, or None if ``data`` is not one."""
    if data[:3] != REFUSAL:
        return None
    return bytes(data[3:203]).decode("utf-8", "replace")
