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
        return data
