"""Policy replication over the gossip layer: the ``"policy"`` delegate (sans-IO).

*Spreading.* A document accepted from any source (CLI publish, a peer, the data
directory at start) is re-broadcast on channel ``"policy"``: piggybacked when it fits
a datagram, sent by stream otherwise. Each agent re-broadcasts only what it newly
accepted, so a document spreads epidemically and a rejected one goes nowhere.

*Repair.* Every push-pull carries a digest ``name -> (version, sha256)``, a few dozen
bytes per document. Each side compares the peer's digest with its own and sends the
peer, over a stream, every envelope the peer lacks or holds an older copy of (trust
links first, in version order). Both sides do this in the same exchange, so an agent
that missed broadcasts, sat in a partition or restarted with an empty directory catches
up at its next push-pull (and at join, which is a push-pull).

*Encoding.* Messages and state are msgpack with a leading format number; decoding
untrusted bytes raises only ``ReplicationDecodeError`` and is counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import msgpack

from ..gossip.assembly import DelegateFactory, NodeSpec
from ..gossip.delegate import Delegate
from ..gossip.membership import Membership
from .envelope import MAX_ENVELOPE
from .store import EXPIRED, MAX_DOCUMENTS, Held, Outcome, PolicyStore
from .trust import TrustSet

CHANNEL = "policy"
FORMAT = 1
MSG_ENVELOPES = 1
MAX_BATCH = 64  # envelopes per repair message
DIGEST_BYTES = 32

OutcomeListener = Callable[[float, Outcome], None]


class ReplicationDecodeError(ValueError):
    """Bytes on the policy channel that are not a well-formed message or digest."""


class PolicyReplicator(Delegate):
    channel = CHANNEL

    def __init__(self, core: Membership, store: PolicyStore, *,
                 wall_offset: float = 0.0) -> None:
        self.core = core
        self.store = store
        #: Calendar time minus the core's clock: expiry and issue times are calendar
        #: times, the ``now`` the core passes around is monotonic (or simulated).
        self.wall_offset = wall_offset
        self._listeners: list[OutcomeListener] = []
        self._digest = (-1, 0)  # (store revision, state_digest)
        self.stats: dict[str, int] = {"messages_malformed": 0, "states_malformed": 0,
                                      "repairs_sent": 0, "repair_envelopes_sent": 0}

    @staticmethod
    def factory(trust: TrustSet) -> DelegateFactory:
        """The node assembly's builder (``NodeSpec.extras``) of a replicator over a
        fresh store that trusts ``trust``: how the agent and the simulator add policy
        to a node."""
        def build(core: Membership, spec: NodeSpec) -> PolicyReplicator:
            return PolicyReplicator(core, PolicyStore(trust), wall_offset=spec.wall_offset)
        return build

    def on_outcome(self, listener: OutcomeListener) -> None:
        """Called for every offer's outcome (the shell logs and persists from here)."""
        self._listeners.append(listener)

    # ---- commands ------------------------------------------------------------------------

    def publish(self, now: float, data: bytes, origin: str = "api") -> Outcome:
        """Offer envelope bytes from a local source; accepted ones start spreading."""
        return self._offer(now, data, origin)

    def tick(self, now: float) -> list[Held]:
        gone = self.store.expire(now + self.wall_offset)
        for h in gone:
            self._emit(now, Outcome(EXPIRED, h.envelope.name, h.envelope.version,
                                    envelope=h.envelope))
        return gone

    def next_deadline(self) -> float:
        """When (on the core's clock) the next held document expires."""
        return self.store.next_expiry() - self.wall_offset

    # ---- Delegate hooks --------------------------------------------------------------------

    def notify_message(self, now: float, payload: bytes) -> None:
        try:
            envelopes = decode_message(payload)
        except ReplicationDecodeError:
            self.stats["messages_malformed"] += 1
            return
        for data in envelopes:
            self._offer(now, data, "gossip")

    def local_state(self, join: bool) -> bytes:
        return encode_state(self.store.digest())

    def state_digest(self) -> int:
        """The documents held (name, version, payload digest), hashed; cached per
        store revision (see gossip/delegate.py)."""
        if self._digest[0] != self.store.revision:
            d = 0
            for name, (version, payload) in self.store.digest().items():
                h = hashlib.blake2b(name.encode() + b"\0%d\0" % version + payload,
                                    digest_size=8, person=b"rumor-policy")
                d ^= int.from_bytes(h.digest(), "big")
            self._digest = (self.store.revision, d)
        return self._digest[1]

    def merge_remote_state(self, now: float, data: bytes, join: bool, peer: str) -> None:
        try:
            remote = decode_state(data)
        except ReplicationDecodeError:
            self.stats["states_malformed"] += 1
            return
        missing = self.store.missing_for(remote)
        for i in range(0, len(missing), MAX_BATCH):
            batch = [e.encode() for e in missing[i:i + MAX_BATCH]]
            if self.core.send_to(now, peer, CHANNEL, encode_message(batch)):
                self.stats["repairs_sent"] += 1
                self.stats["repair_envelopes_sent"] += len(batch)

    # ---- internals ---------------------------------------------------------------------------

    def _offer(self, now: float, data: bytes, origin: str) -> Outcome:
        out = self.store.offer(now + self.wall_offset, data, origin)
        if out.accepted and out.envelope is not None:
            # Keyed by name: a newer version replaces an older one still queued.
            self.core.broadcast(now, CHANNEL, encode_message([out.envelope.encode()]),
                                key=out.envelope.name)
        self._emit(now, out)
        return out

    def _emit(self, now: float, out: Outcome) -> None:
        for listener in self._listeners:
            listener(now, out)


def encode_message(envelopes: list[bytes]) -> bytes:
    data: bytes = msgpack.packb([FORMAT, MSG_ENVELOPES, envelopes], use_bin_type=True)
    return data


def decode_message(data: bytes) -> list[bytes]:
    v = _unpack(data, (MAX_ENVELOPE + 16) * MAX_BATCH)
    if (not isinstance(v, list) or len(v) != 3 or v[0] != FORMAT or v[1] != MSG_ENVELOPES
            or not isinstance(v[2], list) or not 1 <= len(v[2]) <= MAX_BATCH
            or not all(isinstance(e, bytes) for e in v[2])):
        raise ReplicationDecodeError("not a policy message")
    return list(v[2])


def encode_state(digest: dict[str, tuple[int, bytes]]) -> bytes:
    rows = [[n, v, d] for n, (v, d) in sorted(digest.items())]
    data: bytes = msgpack.packb([FORMAT, rows], use_bin_type=True)
    return data


def decode_state(data: bytes) -> dict[str, tuple[int, bytes]]:
    v = _unpack(data, MAX_DOCUMENTS * 128 + 64)
    if not isinstance(v, list) or len(v) != 2 or v[0] != FORMAT or not isinstance(v[1], list):
        raise ReplicationDecodeError("not a policy digest")
    out: dict[str, tuple[int, bytes]] = {}
    for row in v[1][:MAX_DOCUMENTS]:
        if (not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str)
                or len(row[0]) > 63 or not isinstance(row[1], int)
                or isinstance(row[1], bool) or row[1] < 1
                or not isinstance(row[2], bytes) or len(row[2]) != DIGEST_BYTES):
            raise ReplicationDecodeError("malformed policy digest row")
        out[row[0]] = (row[1], row[2])
    return out


def _unpack(data: bytes, limit: int) -> Any:
    if len(data) > limit:
        raise ReplicationDecodeError(f"{len(data)} bytes is over the limit {limit}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_map_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError) as e:
        raise ReplicationDecodeError(f"invalid msgpack ({type(e).__name__})") from None
