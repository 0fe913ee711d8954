"""Packet sealing: the single place where gossip bytes are protected.

Every datagram and stream frame passes through a :class:`Seal` on its way out and in.
Plaintext is the default; the keyring (authenticated encryption with key rotation)
plugs in here without the membership core changing. ``open`` raises
:class:`SealError` for anything that does not authenticate, and the core drops such
bytes before parsing them.
"""

from __future__ import annotations

from typing import Protocol


class SealError(ValueError):
    """Bytes that did not authenticate (wrong key, tampered, replayed, plaintext)."""


class Seal(Protocol):
    #: Bytes ``seal`` adds, so datagrams can be filled without exceeding the MTU.
    overhead: int

    def seal(self, data: bytes) -> bytes: ...

    def open(self, data: bytes) -> bytes: ...


class Plaintext:
    overhead = 0

    def seal(self, data: bytes) -> bytes:
        return data

    def open(self, data: bytes) -> bytes:
        if data[:2] == SEALED_PREFIX:
            raise SealError("the packet is encrypted but the receiving agent has no "
                            "gossip key (--keyring)")
        return data


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


def refusal_reason(data: bytes) -> str | None:
    """The reason of a refusal reply, or None if ``data`` is not one."""
    if data[:3] != REFUSAL:
        return None
    return bytes(data[3:203]).decode("utf-8", "replace")
