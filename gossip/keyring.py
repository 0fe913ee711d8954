"""Gossip encryption: a keyring of shared keys and the AEAD seal that uses it.

Every datagram and stream frame is sealed with XChaCha20-Poly1305 (libsodium through
pynacl) under the keyring's *primary* key, and opened with whichever installed key
authenticates it. That split is what lets a key rotate across a live cluster with
no restart and no partition, the way Serf does it:

1. ``install`` the new key everywhere: everyone still sends with the old primary
   but can now open the new key;
2. ``use`` it everywhere: each agent switches its sending key; agents not switched
   yet can still open it, since they have it installed;
3. ``remove`` the old key everywhere once no one sends with it.

Sealed bytes are ``b"RK" | version | sent-at (ms, 8 bytes) | nonce (24) | ciphertext``.
The associated data is those first 11 bytes, a domain byte (packet or frame header)
and the recipient's member name, so the timestamp cannot be altered and the bytes
open only at the agent they were sealed for. The prefix can never begin plaintext
gossip (whose first byte is the protocol version, 1), which is how each side tells
"wrong or no key" apart from garbage and can say so.

Replays. A recorded packet re-sent later would authenticate, so ``open`` also
rejects packets sent more than ``window`` seconds from our clock (both ways: clock
skew) and any nonce already seen within the window; re-sent to another agent, it
does not open at all (the recipient is authenticated). Nonces are unique per sender
(a random prefix and a counter, see ``KeyringSeal``), so two honest packets never
share one. Agents therefore need clocks within ``window`` of each other (60 s by
default), as for policy expiry.

Sans-IO like the core: the wall clock and the random source are injected, so the
simulator and tests replay exactly.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections import deque
from collections.abc import Callable, Iterable

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

try:
    # pynacl's own cffi binding to libsodium, called without the public wrapper: the
    # wrapper validates and allocates on every call, which is half of what a sealed
    # packet costs an idle agent (its code is cold by the next packet: measured 110 µs
    # through the wrapper, 50 µs direct). Same library, same function.
    from nacl._sodium import (  # type: ignore[import-not-found, unused-ignore]
        ffi as _ffi,
    )
    from nacl._sodium import (  # type: ignore[import-not-found, unused-ignore]
        lib as _lib,
    )
except ImportError:  # a future pynacl without it: the public binding still works
    _ffi = _lib = None

from .security import (
    PREAUTH_FRAME,
    FrameStep,
    ReadBody,
    ReadHeader,
    Refuse,
    SealError,
    plain_length,
    refusal_frame,
)
from .security import SEALED_PREFIX as PREFIX
from .wire import MAX_FRAME

KEY_BYTES = 32
NONCE_BYTES = 24
TAG_BYTES = 16
#: Version 2 binds the recipient into the authenticated data (version 1 did not).
VERSION = 2
_HEAD = struct.Struct(">2sBQ")  # prefix, version, sent-at in ms
HEADER_BYTES = _HEAD.size + NONCE_BYTES
OVERHEAD = HEADER_BYTES + TAG_BYTES
#: What follows the header in the authenticated data, before the recipient's name:
#: a sealed frame header can never pass for a packet, nor a packet for a header.
_PACKET, _FRAME = b"P", b"F"
#: A sealed stream frame header: the body's length (4 bytes), sealed.
SEALED_FRAME_HEADER = OVERHEAD + 4
#: Largest clock difference (seconds) a packet may show, either way.
DEFAULT_WINDOW = 60.0
#: Nonces remembered for replay detection; beyond this the oldest are forgotten and
#: anything sent before them is refused, so memory stays bounded under a flood.
DEFAULT_REPLAY_CAPACITY = 200_000


class KeyringError(ValueError):
    """A keyring operation that cannot be done (bad key, removing the primary...)."""


def decode_key(text: str) -> bytes:
    """A base64 key as bytes; a clear error for anything else."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("a gossip key is base64 (make one with `rumor keyring "
                           "generate`)") from None
    if len(raw) != KEY_BYTES:
        raise KeyringError(f"a gossip key is {KEY_BYTES} bytes, this one decodes to "
                           f"{len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Keyring:
    """The keys an agent accepts, the first of which (the primary) it sends with."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        unique: list[bytes] = []
        for k in keys:
            if len(k) != KEY_BYTES:
                raise KeyringError(f"a gossip key is {KEY_BYTES} bytes, got {len(k)}")
            if k not in unique:
                unique.append(k)
        if not unique:
            raise KeyringError("a keyring needs at least one key")
        #: Primary first. A tuple: the packet path reads it for every packet, uncopied.
        self.accepted: tuple[bytes, ...] = tuple(unique)

    @classmethod
    def from_text(cls, text: str) -> Keyring:
        """Keys one per line, primary first; blank lines and ``#`` comments ignored."""
        lines = [ln.strip() for ln in text.splitlines()]
        return cls(decode_key(ln) for ln in lines if ln and not ln.startswith("#"))

    def to_text(self) -> str:
        return "".join(encode_key(k) + "\n" for k in self.accepted)

    @property
    def primary(self) -> bytes:
        return self.accepted[0]

    @property
    def keys(self) -> list[bytes]:
        """All installed keys, primary first."""
        return list(self.accepted)

    def install(self, key: bytes) -> bool:
        """Accept ``key`` too; False if it was installed already."""
        if len(key) != KEY_BYTES:
            raise KeyringError(f"a gossip key is {KEY_BYTES} bytes, got {len(key)}")
        if key in self.accepted:
            return False
        self.accepted += (key,)
        return True

    def use(self, key: bytes) -> bool:
        """Send with ``key`` from now on; it must be installed. False if it already was
        the primary."""
        if key not in self.accepted:
            raise KeyringError("key is not installed; install it (on every agent) first")
        if self.accepted[0] == key:
            return False
        self.accepted = (key, *(k for k in self.accepted if k != key))
        return True

    def remove(self, key: bytes) -> bool:
        """Stop accepting ``key``; False if it was not installed. The primary cannot go:
        ``use`` another key first."""
        if key not in self.accepted:
            return False
        if self.accepted[0] == key:
            raise KeyringError("cannot remove the primary key; `use` another key first")
        self.accepted = tuple(k for k in self.accepted if k != key)
        return True


def _encrypt(message: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes:
    if _lib is None:
        out: bytes = crypto_aead_xchacha20poly1305_ietf_encrypt(message, ad, nonce, key)
        return out
    buf = _ffi.new("unsigned char[]", len(message) + TAG_BYTES)
    n = _ffi.new("unsigned long long *")
    _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(buf, n, message, len(message), ad,
                                                    len(ad), _ffi.NULL, nonce, key)
    return bytes(_ffi.buffer(buf, n[0]))


def _decrypt(cipher: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes | None:
    """The plaintext, or None if ``cipher`` does not authenticate under ``key``."""
    if _lib is None:
        try:
            out: bytes = crypto_aead_xchacha20poly1305_ietf_decrypt(cipher, ad, nonce, key)
        except CryptoError:
            return None
        return out
    buf = _ffi.new("unsigned char[]", max(len(cipher) - TAG_BYTES, 1))
    n = _ffi.new("unsigned long long *")
    if _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(buf, n, _ffi.NULL, cipher,
                                                       len(cipher), ad, len(ad), nonce,
                                                       key) != 0:
        return None
    return bytes(_ffi.buffer(buf, n[0]))


class KeyringSeal:
    """The :class:`~rumor.gossip.security.Seal` for an encrypted cluster.

    Nonces are a random 16-byte prefix drawn once plus a 64-bit counter: unique per
    packet without a system call per packet, and two agents (or two lives of one)
    share a prefix with probability 2^-128. Time comes in as the core's ``now``;
    ``wall_offset`` turns it into calendar time, which agents compare (the replay
    window), as the policy layer does for expiry."""

    overhead = OVERHEAD

    def __init__(self, keyring: Keyring, *, wall_offset: float,
                 random_bytes: Callable[[int], bytes], window: float = DEFAULT_WINDOW,
                 replay_capacity: int = DEFAULT_REPLAY_CAPACITY) -> None:
        self.keyring = keyring
        self.wall_offset = wall_offset
        self._prefix = random_bytes(NONCE_BYTES - 8)
        self._counter = 0
        self._window_ms = int(window * 1000)
        self._capacity = replay_capacity
        self._seen: set[bytes] = set()
        self._order: deque[tuple[int, bytes]] = deque()
        #: Packets sent at or before this (ms) are refused: their nonces were forgotten.
        self._floor = 0
        self.stats = {"plaintext": 0, "unknown_key": 0, "stale": 0, "replayed": 0,
                      "malformed": 0}

    # ---- the Seal interface ---------------------------------------------------------

    def seal(self, now: float, data: bytes, to: str) -> bytes:
        return self._seal(now, data, _PACKET + to.encode())

    def open(self, now: float, data: bytes, to: str) -> bytes:
        return self._open(now, data, (_PACKET + to.encode(),))[0]

    def open_stream(self, now: float, data: bytes, to: str) -> tuple[bytes, bool]:
        plain, which = self._open(now, data, (_PACKET + to.encode(), _PACKET))
        return plain, which == 0

    def frame_header(self, now: float, n: int, to: str) -> bytes:
        return self._seal(now, n.to_bytes(4, "big"), _FRAME + to.encode())

    def read_frame_header(self, now: float, header: bytes, to: str) -> FrameStep:
        if header[:2] != PREFIX:
            # A plaintext peer (no key): read its small frame only to refuse it with the
            # reason when its body fails to open.
            return plain_length(header, PREAUTH_FRAME)
        if len(header) < SEALED_FRAME_HEADER:
            return ReadHeader(SEALED_FRAME_HEADER - len(header))
        try:
            plain, _ = self._open(now, header, (_FRAME + to.encode(), _FRAME))
        except SealError as e:
            return Refuse(refusal_frame(str(e)), str(e))
        n = int.from_bytes(plain, "big")
        if len(plain) != 4 or n > MAX_FRAME:
            self.stats["malformed"] += 1
            why = f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit"
            return Refuse(refusal_frame(why), why)
        return ReadBody(n)

    # ---- sealing --------------------------------------------------------------------------

    def _wall_ms(self, now: float) -> int:
        return int((now + self.wall_offset) * 1000)

    def _seal(self, now: float, data: bytes, domain: bytes) -> bytes:
        head = _HEAD.pack(PREFIX, VERSION, self._wall_ms(now))
        self._counter += 1
        nonce = self._prefix + self._counter.to_bytes(8, "big")
        return head + nonce + _encrypt(bytes(data), head + domain, nonce,
                                       self.keyring.accepted[0])

    def _open(self, now: float, data: bytes, domains: tuple[bytes, ...]) -> tuple[bytes, int]:
        """The plaintext and the index of the first of ``domains`` (authenticated data
        after the header) under which some installed key opens ``data``."""
        if len(data) < OVERHEAD or data[:2] != PREFIX:
            if data[:1] == b"\x01":
                self.stats["plaintext"] += 1
                raise SealError("the packet is plaintext but the receiving agent "
                                "encrypts gossip (--keyring)")
            self.stats["malformed"] += 1
            raise SealError("not a sealed gossip packet")
        _, version, sent = _HEAD.unpack_from(data)
        if version != VERSION:
            self.stats["malformed"] += 1
            raise SealError(f"sealed with seal version {version}; this agent speaks "
                            f"version {VERSION} (upgrade every agent of an encrypted "
                            "cluster together)")
        now_ms = self._wall_ms(now)
        if abs(now_ms - sent) > self._window_ms or sent <= self._floor:
            self.stats["stale"] += 1
            raise SealError("sent too long ago or from a clock too far off (replay?)")
        data = bytes(data)  # no copy when it is bytes already (sockets give bytes)
        nonce = data[_HEAD.size:HEADER_BYTES]
        if nonce in self._seen:
            self.stats["replayed"] += 1
            raise SealError("replayed packet")
        head = data[:_HEAD.size]
        body = data[HEADER_BYTES:]
        for which, domain in enumerate(domains):
            ad = head + domain
            for key in self.keyring.accepted:
                plain = _decrypt(body, ad, nonce, key)
                if plain is not None:
                    self._remember(now_ms, sent, nonce)
                    return plain, which
        self.stats["unknown_key"] += 1
        raise SealError("no gossip key of the receiving agent opens the packet (a "
                        "different key, tampered with, or meant for another agent)")

    def _remember(self, now: int, sent: int, nonce: bytes) -> None:
        self._seen.add(nonce)
        self._order.append((sent, nonce))
        order = self._order
        horizon = now - self._window_ms
        while order and (order[0][0] < horizon or len(order) > self._capacity):
            old, n = order.popleft()
            self._seen.discard(n)
            if old >= horizon:  # forgotten early (capacity): refuse anything that old
                self._floor = max(self._floor, old)
