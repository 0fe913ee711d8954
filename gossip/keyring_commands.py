"""Cluster-wide keyring commands: install, use, remove and list a key on every agent.

Serf's keyring commands, as one user of the cluster-wide queries (``query.py``): a
command is a *write* query named ``keyring`` whose payload is the operation and the
key, so it reaches every live member at least once (broadcast, then resent by stream
to the silent until the deadline), and each agent answers with its outcome. The
originator counts the answers against the live members, so the operator learns which
agents did not take the change (and must not ``use`` a key that some agent lacks).

Commands travel sealed like all gossip, so only a holder of an installed key can
issue one: the gossip key is the cluster's credential, as in Serf. Answers name keys
by fingerprint only (:func:`key_id`): a listing never carries key material, on the
wire or out of the API. ``LegacyKeyringChannel`` still applies commands that agents of
the previous build send on the old ``keyring`` channel, so a cluster upgrading one
agent at a time can rotate keys from an old agent; a command from an upgraded agent
reaches only upgraded ones (the old report as missing, and ``use`` is refused).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .delegate import Delegate
from .fields import describe
from .keyring import Keyring, KeyringError, KeyringSeal
from .membership import Membership
from .query import Pending as QueryPending
from .query import Queries, QueryError, Request

CHANNEL = "keyring"
OPS = ("install", "use", "remove", "list")
_SEEN = 4096


@dataclass
class Answer:
    ok: bool
    error: str = ""
    #: For ``list``: the fingerprints of the agent's keys, primary first.
    keys: list[str] = field(default_factory=list)


@dataclass
class Pending:
    """A command's outcome on each member that answered."""

    op: str
    started: float
    answers: dict[str, Answer] = field(default_factory=dict)

    def lacking(self, key: bytes) -> list[str]:
        """For a ``list``: the members that answered without ``key`` installed."""
        fingerprint = key_id(key)
        return sorted(n for n, a in self.answers.items() if fingerprint not in a.keys)


class KeyringRefused(KeyringError):
    """A command that would split the cluster, refused before it is sent."""


def refuse_use(listing: Pending, missing: list[str], key: bytes) -> None:
    """Raise ``KeyringRefused`` unless every live member holds ``key`` (``listing``: the
    answers to a ``list``, ``missing``: the live members that did not answer): the
    members that switched would send what the others cannot open."""
    lacking = listing.lacking(key)
    if missing or lacking:
        parts = []
        if lacking:
            parts.append(f"not installed on {', '.join(lacking)}")
        if missing:
            parts.append(f"no answer from {', '.join(missing)}")
        raise KeyringRefused(f"refusing to use the key: {'; '.join(parts)} (install it "
                             "on every member first, or the cluster would split)")


QUERY = "keyring"


class KeyringCommands:
    """The keyring operations, answered as the ``keyring`` write query (see module)."""

    def __init__(self, queries: Queries, seal: KeyringSeal, *,
                 on_change: Callable[[Keyring], None] | None = None) -> None:
        self.queries = queries
        self.seal = seal
        #: Called with the keyring after a command changed it (the shell saves the file).
        self.on_change: Callable[[Keyring], None] = on_change or (lambda ring: None)
        self.stats = {"commands_applied": 0, "commands_failed": 0}
        queries.register(QUERY, self._handle, write=True, guarded=True)

    def payload(self, op: str, key: bytes | None) -> bytes:
        """The query payload of ``op`` (raises ``KeyringError`` for a bad command)."""
        if op not in OPS:
            raise KeyringError(f"unknown keyring operation {describe(op)} "
                               f"(one of {', '.join(OPS)})")
        if op != "list" and key is None:
            raise KeyringError(f"{op} needs a key")
        data: bytes = msgpack.packb([op, key or b""])
        return data

    def start(self, now: float, op: str, key: bytes | None,
              timeout: float = 5.0) -> str:
        """Apply ``op`` here and on every live member; returns the query's id."""
        return self.queries.start(now, QUERY, self.payload(op, key), timeout=timeout,
                                  write=True)

    def _handle(self, r: Request) -> bytes:
        op, key = _decode_command(r.payload)
        a = self.apply(op, key)
        data: bytes = msgpack.packb([a.ok, a.error, a.keys])
        return data

    def apply(self, op: str, key: bytes | None) -> Answer:
        ring = self.seal.keyring
        try:
            if op == "list":
                return Answer(True, keys=[key_id(k) for k in ring.keys])
            assert key is not None
            changed = (ring.install(key) if op == "install" else ring.use(key)
                       if op == "use" else ring.remove(key))
        except KeyringError as e:
            self.stats["commands_failed"] += 1
            return Answer(False, str(e))
        self.stats["commands_applied"] += 1
        if changed:
            self.on_change(ring)
        return Answer(True)


def outcome(op: str, p: QueryPending) -> Pending:
    """A finished ``keyring`` query's answers as keyring outcomes."""
    out = Pending(op, p.started)
    for node, a in p.answers.items():
        if not a.ok:
            out.answers[node] = Answer(False, a.error)
            continue
        try:
            ok, error, keys = msgpack.unpackb(a.data, raw=False)
            if not (isinstance(ok, bool) and isinstance(error, str)
                    and isinstance(keys, list)):
                raise ValueError("bad keyring answer")
            out.answers[node] = Answer(ok, error[:512], [str(k)[:64] for k in keys[:16]])
        except (ValueError, TypeError, msgpack.UnpackException):
            out.answers[node] = Answer(False, "malformed keyring answer")
    return out


def _decode_command(payload: bytes) -> tuple[str, bytes | None]:
    try:
        op, key = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise QueryError("malformed keyring command") from None
    if op not in OPS or not isinstance(key, bytes):
        raise QueryError("malformed keyring command")
    return op, key or None


class LegacyKeyringChannel(Delegate):
    """Commands on the previous build's ``keyring`` channel: applied, passed on once,
    answered to the originator by stream, as that build did (see module)."""

    channel = CHANNEL

    def __init__(self, core: Membership, commands: KeyringCommands) -> None:
        self.core = core
        self.commands = commands
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.stats = {"bad_messages": 0}

    def notify_message(self, now: float, payload: bytes) -> None:
        try:
            msg: Any = msgpack.unpackb(payload, raw=False)
            if msg[0] == "ack":
                return  # this build asks by query; an old agent's ack is not for us
            kind, cid, origin, op, key = msg
            if not (kind == "cmd" and isinstance(cid, str) and isinstance(origin, str)
                    and op in OPS and isinstance(key, bytes)):
                raise ValueError("bad command")
        except (ValueError, TypeError, IndexError, msgpack.UnpackException):
            self.stats["bad_messages"] += 1
            return
        if cid in self._seen:
            return
        self._seen[cid] = None
        while len(self._seen) > _SEEN:
            self._seen.popitem(last=False)
        self.core.broadcast(now, CHANNEL, payload, key=cid)
        a = self.commands.apply(op, key or None)
        self.core.send_to(now, origin, CHANNEL, msgpack.packb(
            ["ack", cid, self.core.name, a.ok, a.error, a.keys]))


def key_id(key: bytes) -> str:
    """A non-secret name for a key in listings: 16 hex digits of a keyed BLAKE2b, so
    listing the keys reveals nothing that helps guess them."""
    return hashlib.blake2b(key, digest_size=8, person=b"rumor-key-id").hexdigest()
