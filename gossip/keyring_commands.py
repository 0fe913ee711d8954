"""Cluster-wide keyring commands: install, use, remove and list a key on every agent.

Serf's keyring commands, over rumor's gossip: the agent that receives the command on
its local API applies it, broadcasts it on the ``keyring`` channel, and every agent
that hears it applies it, passes it on, and answers the originator by stream with
its outcome. The originator counts the answers against the live members, so the
operator learns which agents did not take the change (and must not ``use`` a key
that some agent lacks).

Commands travel sealed like all gossip, so only a holder of an installed key can
issue one: the gossip key is the cluster's credential, as in Serf. Answers name keys
by fingerprint only (:func:`key_id`): a listing never carries key material, on the
wire or out of the API. Sans-IO: the
trio shell (the agent's API) starts a command and waits for answers; the answers
and the broadcast go through the membership core.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .delegate import Delegate
from .fields import describe
from .keyring import Keyring, KeyringError, KeyringSeal
from .membership import Membership
from .wire import Status

CHANNEL = "keyring"
OPS = ("install", "use", "remove", "list")
_SEEN = 4096
#: Members silent this long after the broadcast (or the last resend) get the command
#: again, by stream.
RESEND_AFTER = 0.5


@dataclass
class Answer:
    ok: bool
    error: str = ""
    #: For ``list``: the fingerprints of the agent's keys, primary first.
    keys: list[str] = field(default_factory=list)


@dataclass
class Pending:
    op: str
    started: float
    payload: bytes
    answers: dict[str, Answer] = field(default_factory=dict)
    sent_at: float = 0.0

    def missing(self, live: list[str]) -> list[str]:
        """The live members that have not answered yet."""
        return [m for m in live if m not in self.answers]

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


class KeyringCommands(Delegate):
    channel = CHANNEL

    def __init__(self, core: Membership, seal: KeyringSeal, rand_id: Callable[[], str],
                 *, on_change: Callable[[Keyring], None] | None = None,
                 on_answer: Callable[[str], None] | None = None) -> None:
        self.core = core
        self.seal = seal
        self._rand_id = rand_id
        #: Called with the keyring after a command changed it (the shell saves the file).
        self.on_change: Callable[[Keyring], None] = on_change or (lambda ring: None)
        #: Called with a command's id when one of its answers arrives (the shell wakes).
        self.on_answer: Callable[[str], None] = on_answer or (lambda cid: None)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.pending: dict[str, Pending] = {}
        self.stats = {"commands_applied": 0, "commands_failed": 0, "bad_messages": 0}

    # ---- the originator ---------------------------------------------------------------

    def start(self, now: float, op: str, key: bytes | None) -> str:
        """Apply ``op`` here, broadcast it, and start counting answers; returns its id."""
        if op not in OPS:
            raise KeyringError(f"unknown keyring operation {describe(op)} "
                               f"(one of {', '.join(OPS)})")
        if op != "list" and key is None:
            raise KeyringError(f"{op} needs a key")
        cid = self._rand_id()
        self._remember(cid)
        payload = msgpack.packb(["cmd", cid, self.core.name, op, key or b""])
        self.pending[cid] = p = Pending(op, now, payload, sent_at=now)
        p.answers[self.core.name] = self._apply(op, key)
        self.core.broadcast(now, CHANNEL, payload, key=cid)
        return cid

    def tick(self, now: float, cid: str) -> list[str]:
        """The live members that have not answered ``cid`` yet; those silent for
        ``RESEND_AFTER`` get the command again, by stream.

        A broadcast reaches everyone only with high probability (each agent passes
        it to a few random others); a key change that misses an agent cuts it off, so
        the originator follows up directly. Applying a command twice is harmless
        (each agent also drops ids it has seen)."""
        p = self.pending.get(cid)
        if p is None:
            return []
        missing = p.missing(self._live())
        if missing and now - p.sent_at >= RESEND_AFTER:
            p.sent_at = now
            for m in missing:
                self.core.send_to(now, m, CHANNEL, p.payload)
        return missing

    def resend_at(self, cid: str) -> float:
        """When ``tick`` would next resend ``cid`` to the silent members."""
        p = self.pending.get(cid)
        return math.inf if p is None else p.sent_at + RESEND_AFTER

    def _live(self) -> list[str]:
        return [m.name for m in self.core.members.values() if m.status == Status.ALIVE]

    def finish(self, cid: str) -> Pending | None:
        """Stop counting answers to ``cid`` and return them."""
        return self.pending.pop(cid, None)

    # ---- every agent --------------------------------------------------------------------

    def notify_message(self, now: float, payload: bytes) -> None:
        try:
            msg: Any = msgpack.unpackb(payload, raw=False)
            kind = msg[0]
            if kind == "cmd":
                _, cid, origin, op, key = msg
                if not (isinstance(cid, str) and isinstance(origin, str) and op in OPS
                        and isinstance(key, bytes)):
                    raise ValueError("bad command")
                self._on_command(now, payload, cid, origin, op, key or None)
            elif kind == "ack":
                _, cid, node, ok, error, keys = msg
                p = self.pending.get(cid)
                if p is not None and isinstance(node, str) and isinstance(keys, list):
                    p.answers[node] = Answer(bool(ok), str(error)[:512],
                                             [str(k)[:64] for k in keys[:16]])
                    self.on_answer(cid)
            else:
                raise ValueError(f"unknown message {describe(kind)}")
        except (ValueError, TypeError, IndexError, msgpack.UnpackException):
            self.stats["bad_messages"] += 1

    def _on_command(self, now: float, payload: bytes, cid: str, origin: str, op: str,
                    key: bytes | None) -> None:
        if cid in self._seen:
            return
        self._remember(cid)
        self.core.broadcast(now, CHANNEL, payload, key=cid)  # pass it on, once
        a = self._apply(op, key)
        self.core.send_to(now, origin, CHANNEL, msgpack.packb(
            ["ack", cid, self.core.name, a.ok, a.error, a.keys]))

    def _apply(self, op: str, key: bytes | None) -> Answer:
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

    def _remember(self, cid: str) -> None:
        self._seen[cid] = None
        while len(self._seen) > _SEEN:
            self._seen.popitem(last=False)


def key_id(key: bytes) -> str:
    """A non-secret name for a key in listings: 16 hex digits of a keyed BLAKE2b, so
    listing the keys reveals nothing that helps guess them."""
    return hashlib.blake2b(key, digest_size=8, person=b"rumor-key-id").hexdigest()
