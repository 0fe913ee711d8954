"""A member's own word: signing ours, verifying theirs (a part of ``Membership``).

``identity.py`` says what verifies; this part applies it to the membership table:

* our alive and our leave go out signed (``SignedAlive``, ``SignedLeave``), and in
  ``prefer`` mode also plain for version-1 members;
* a signed alive binds the member's name to the key its credential names (newest
  ``issued_at`` first; a tofu claim only from the member's own push-pull) and from
  then on is the only thing that changes the member's address, tags or incarnation
  (``rules.py`` refuses the unsigned word and caps accusations at the signed
  incarnation);
* push-pull carries every member's latest verified statement in the ``identity``
  channel (version-1 members ignore channels they do not know), applied before the
  plain rows so the rows cannot undo it.
"""

from __future__ import annotations

from dataclasses import replace

import msgpack

from .core_base import CoreBase
from .history import LEFT_HEARD
from .identity import ALIVE_CONTEXT, LEAVE_CONTEXT, Identity
from .members import Member
from .node_key import Credential, decode_credential
from .wire import (
    MAX_FRAME,
    Address,
    Alive,
    Dead,
    DecodeError,
    SignedAlive,
    SignedLeave,
    Status,
    decode_signed,
    pack_message,
)

#: A pin exchange (a stream carrying our state) spends this many admission tokens,
#: where a ping spends one: a datagram naming many unknown keys cannot make us open
#: more than a few streams to addresses it chose.
PIN_COST = 8.0
#: The push-pull channel of signed statements.
IDENTITY_CHANNEL = "identity"
#: Most of a push-pull frame the signed statements may take (the rest is rows and
#: the delegates' state); beyond it they are left out and counted (gossip and later
#: exchanges still carry them).
IDENTITY_STATE_BUDGET = MAX_FRAME // 2


class SignedState(CoreBase):
    """Our signed statements and the verification of others' (see the module)."""

    identity: Identity
    _own_signed: SignedAlive | None

    # ---- our own word ---------------------------------------------------------------

    def _signed_self(self) -> SignedAlive | None:
        """Our current alive, signed (made again only when it changed)."""
        ident = self.identity
        if not ident.signing or ident.credential is None:
            return None
        a = self._self_alive()
        cur = self._own_signed
        if cur is not None and cur.alive == a:
            return cur
        body = pack_message(a)
        sig = ident.sign(ALIVE_CONTEXT, body)
        assert sig is not None
        self._own_signed = SignedAlive(a, body, sig, ident.credential)
        me = self.members[self.name]
        me.signed = self._own_signed
        return self._own_signed

    def _queue_self(self, news: bool = False, credential: bool = False) -> None:
        """Queue our alive: signed, plain, or both, as the mode says. The credential
        (about 140 bytes, more than the alive itself) goes with the first alive of a
        life (``credential``) and in every push-pull; later alives refer to the
        binding their receivers hold, and one that holds none asks for our own
        push-pull (``_fetch_binding``)."""
        sa = self._signed_self()
        if sa is None or self.identity.plain_too:
            self._queue_member(self._self_alive(), news=news)
        if sa is not None:
            self._queue_signed(sa if credential else replace(sa, credential=b""), news)

    def _signed_leave(self, d: Dead) -> SignedLeave | None:
        body = pack_message(d)
        sig = self.identity.sign(LEAVE_CONTEXT, body)
        return None if sig is None else SignedLeave(d, body, sig)

    def _queue_signed(self, m: SignedAlive | SignedLeave, news: bool = False) -> None:
        """Queue a signed statement; beside its plain twin (its own queue key) while
        plain ones still go out, in its place once they do not."""
        node = m.alive.node if isinstance(m, SignedAlive) else m.dead.node
        if self._quiet:
            return
        key = f"{node}\0signed" if self.identity.plain_too else node
        self._member_q.push(pack_message(m), key, self._news_extra() if news else 0)

    # ---- their word ---------------------------------------------------------------------

    def _bound_key(self, name: str) -> bytes | None:
        m = self.members.get(name)
        c = m.cred if m is not None else self._remembered.get(name)
        return None if c is None else c.public_key

    def _binding(self, now: float, m: Member | None, sa: SignedAlive,
                 pin: bool) -> Credential | None:
        """The credential to check ``sa`` against, or None (counted) if it cannot
        bind: not vouched for, a tofu claim outside the member's own push-pull, an
        older credential than the one we hold, or another key at the same age."""
        name = sa.alive.node
        bound = m.cred if m is not None else self._remembered.get(name)
        if not sa.credential:  # by reference to the binding we hold
            if bound is None:
                self.stats["alives_without_binding"] += 1
                self._pin_later(now, sa.alive.node, sa.alive.addr)
            return bound
        c = self.identity.credential_of(sa.credential, name)
        if c is None:
            self.stats["alives_credential_refused"] += 1
            return None
        if bound is None:
            if c.kind == "tofu" and not pin:
                self.stats["alives_unpinned"] += 1
                if m is None:
                    self._pin_later(now, sa.alive.node, sa.alive.addr)
                return None
            return c
        if c.raw == bound.raw:
            return bound
        if c.kind == "tofu":
            # A claim never replaces a binding; the same key's claim is the binding.
            if c.public_key == bound.public_key:
                return bound
        elif bound.kind == "tofu" or c.issued_at > bound.issued_at:
            return c  # an authority's word beats a claim; a newer credential an older
        elif c.issued_at == bound.issued_at and c.public_key == bound.public_key:
            return bound
        self.stats["alives_key_mismatch"] += 1
        return None

    def _pin_later(self, now: float, name: str, addr: Address) -> None:
        """Ask a name we cannot bind from what we heard (a tofu claim from third-party
        gossip, which cannot pin; an alive that refers to a binding we lack) for its
        own push-pull at the address claimed for it: the answer binds it."""
        if name in self._pinning or len(self._pinning) >= self.config.max_pending:
            return
        tokens, at = self._admission_tokens
        cfg = self.config
        tokens = min(float(cfg.admission_burst), tokens + (now - at) * cfg.admission_rate)
        if tokens < PIN_COST:
            self.stats["pins_throttled"] += 1
            return
        self._admission_tokens = (tokens - PIN_COST, now)
        self._pinning.add(name)
        self.stats["pin_exchanges"] += 1
        ex = self._stream_to(now, addr, name, name, "pin",
                             self._push_pull_body(False), True)
        self._pin_exchanges[ex] = name

    def _pin_done(self, exchange: int) -> None:
        name = self._pin_exchanges.pop(exchange, None)
        if name is not None:
            self._pinning.discard(name)

    def _on_signed_alive(self, now: float, host: str, sa: SignedAlive,
                         pin: bool = False, budgeted: bool = True) -> None:
        """A member's signed alive arrived from ``host`` (``pin``: in its own
        push-pull, where a tofu claim may bind; ``budgeted``: a datagram, whose
        verifications spend the sender's budget)."""
        ident = self.identity
        if not ident.signing:
            self.stats["messages_skipped"] += 1
            return
        a = sa.alive
        if a.node == self.name:
            self._on_own_signed_alive(now, host, sa)
            return
        m = self.members.get(a.node)
        cred = self._binding(now, m, sa, pin)
        if cred is None:
            return
        ok = ident.check(now, cred.public_key, ALIVE_CONTEXT, sa.body, sa.sig, host, budgeted)
        if not ok:
            self.stats["alives_bad_signature" if ok is False else "alives_deferred"] += 1
            return
        self._pending_done(a.node)
        self._accept_alive(now, a, sa, cred)

    def _on_own_signed_alive(self, now: float, host: str, sa: SignedAlive) -> None:
        """Our own signed word from before (a previous life's, with the key from our
        data dir) outbids what we say now: the one jump we may make, since nobody but
        us could have signed it."""
        a, me = sa.alive, self.members[self.name]
        if me.cred is None or a.incarnation < self.incarnation:
            return
        if a.incarnation == self.incarnation and a.addr == self.addr and a.meta == me.meta:
            return
        c = self.identity.credential_of(sa.credential, self.name) if sa.credential \
            else me.cred
        if c is None or c.public_key != me.cred.public_key or not self.identity.check(
                now, c.public_key, ALIVE_CONTEXT, sa.body, sa.sig, host, False):
            return
        self._set_incarnation(a.incarnation + 1, now, "outbid a previous life's alive")
        self.stats["refutations"] += 1
        self._queue_self()

    def _on_signed_leave(self, now: float, host: str, sl: SignedLeave,
                         budgeted: bool = True) -> None:
        if not self.identity.signing:
            self.stats["messages_skipped"] += 1
            return
        d = sl.dead
        m = self.members.get(d.node)
        if d.node == self.name:
            self._on_own_signed_leave(now, host, sl)
            return
        if m is None or m.cred is None or not m.live:
            return
        if d.incarnation < m.incarnation:
            return
        ok = self.identity.check(now, m.cred.public_key, LEAVE_CONTEXT, sl.body, sl.sig,
                                 host, budgeted)
        if not ok:
            self.stats["leaves_bad_signature" if ok is False else "leaves_deferred"] += 1
            return
        m.signed = sl
        self._suspicions.pop(d.node, None)
        if self.identity.plain_too:
            self._queue_member(d)
        self._queue_signed(sl)
        m.incarnation = d.incarnation
        self.history.record(LEFT_HEARD, now, d.node, d.node, self.awareness.score,
                            incarnation=d.incarnation)
        self._set_status(now, m, Status.LEFT, "left")

    def _on_own_signed_leave(self, now: float, host: str, sl: SignedLeave) -> None:
        """Our previous life's leave (a graceful restart): every peer holds us left at
        its incarnation, so the new life outbids it, as ``_on_own_signed_alive``."""
        me = self.members[self.name]
        if self.leaving or me.cred is None or sl.dead.incarnation < self.incarnation:
            return
        if not self.identity.check(now, me.cred.public_key, LEAVE_CONTEXT, sl.body, sl.sig,
                                   host, False):
            return
        self._set_incarnation(sl.dead.incarnation + 1, now,
                              "outbid a previous life's leave")
        self.stats["refutations"] += 1
        self._queue_self()

    def _relay_alive(self, a: Alive, sa: SignedAlive | None, news: bool) -> None:
        """Pass on a member's alive we accepted, in the forms the mode sends."""
        if sa is None or self.identity.plain_too:
            self._queue_member(a, news=news)
        if sa is not None:
            self._queue_signed(sa, news)

    # ---- push-pull ------------------------------------------------------------------------

    def _identity_state(self, budget: int = IDENTITY_STATE_BUDGET) -> bytes | None:
        """Every member's latest verified statement, for a push-pull (within
        ``budget`` bytes)."""
        if not self.identity.signing:
            return None
        self._signed_self()
        out: list[bytes] = []
        size = 0
        for m in self.members.values():
            s = m.signed
            if s is None or m.cred is None:
                continue
            if isinstance(s, SignedAlive):  # always with the credential (see _queue_self)
                b: bytes = msgpack.packb([SignedAlive.TYPE, s.body, s.sig, m.cred.raw])
            else:
                b = pack_message(s)
            size += len(b)
            if size > budget:
                self.stats["identity_state_truncated"] += 1
                break
            out.append(b)
        if not out:
            return None
        data: bytes = msgpack.packb(out)
        return data

    def _merge_identity(self, now: float, data: bytes, host: str, source: str) -> None:
        """Apply a push-pull's signed statements from ``host``. The sender's own alive
        (``source``, at an address on ``host``: the stream came from there, or we
        dialed it) may pin a tofu claim. An honest peer sends no bad signature: after
        the first that fails, the rest of the channel is ignored, so junk costs one
        verification."""
        if not self.identity.signing:
            return
        try:
            signed = _decode_identity_state(data)
        except Exception:  # DecodeError, or any of msgpack's many types
            self.stats["identity_state_malformed"] += 1
            return
        if self._quiet:
            self._bind_quietly(now, signed, host)
            return
        before = self.stats["alives_bad_signature"] + self.stats["leaves_bad_signature"]
        members = self.members
        for s in signed:
            node = s.alive.node if isinstance(s, SignedAlive) else s.dead.node
            m = members.get(node)
            if m is not None and m.signed is s:
                continue  # what we hold already (the decoder shares equal bytes' object)
            if isinstance(s, SignedAlive):
                self._on_signed_alive(now, host, s, pin=s.alive.node == source
                                      and s.alive.addr[0] == host, budgeted=False)
            else:
                self._on_signed_leave(now, host, s, budgeted=False)
            if self.stats["alives_bad_signature"] + self.stats["leaves_bad_signature"] \
                    != before:
                self.stats["identity_state_refused"] += 1
                return

    def _bind_quietly(self, now: float, signed: list[SignedAlive | SignedLeave],
                      host: str) -> None:
        """A driver's trusted state (the simulator's warm start, whose rows were just
        merged): bind each member to its verified statement in place, without the
        events, relays and queue pushes of the general path (which made a 10,000-node
        warm start several times slower); every signature is still checked."""
        members, ident = self.members, self.identity
        for s in signed:
            if not isinstance(s, SignedAlive):
                continue
            m = members.get(s.alive.node)
            if m is None or m.cred is not None or m.incarnation != s.alive.incarnation:
                continue
            c = ident.credential_of(s.credential, m.name) if s.credential else None
            if c is not None and ident.check(now, c.public_key, ALIVE_CONTEXT, s.body,
                                             s.sig, host, False) is True:
                m.cred, m.signed = c, s

    def remember_bindings(self, credentials: dict[str, bytes]) -> int:
        """Bindings kept from a previous run (the snapshot); returns how many held."""
        n = 0
        for name, raw in credentials.items():
            try:
                c = decode_credential(raw)
            except ValueError:
                continue
            if c.name == name and name != self.name and len(self._remembered) < 1 << 16:
                self._remembered[name] = c
                n += 1
        return n

    def bindings(self) -> dict[str, bytes]:
        """Every binding we hold (for the snapshot)."""
        out = {n: c.raw for n, c in self._remembered.items()}
        for m in self.members.values():
            if m.cred is not None and m.name != self.name:
                out[m.name] = m.cred.raw
        return out


#: The last identity state decoded, by object: a driver that merges one state into
#: every node (the simulator's warm start) decodes it once.
_last_state: tuple[bytes, list[SignedAlive | SignedLeave]] | None = None


def _decode_identity_state(data: bytes) -> list[SignedAlive | SignedLeave]:
    global _last_state
    if _last_state is not None and _last_state[0] is data:
        return _last_state[1]
    items = msgpack.unpackb(data, raw=False, use_list=True)
    if type(items) is not list:
        raise DecodeError("the identity state is a list")
    out = [decode_signed(b) for b in items]
    _last_state = (data, out)
    return out
