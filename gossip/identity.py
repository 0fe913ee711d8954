"""Self-certifying membership: whose word about a member counts (sans-IO).

A member's word about itself (its alive: incarnation, address, tags; its leave) is
signed by its node key (``node_key.py``), and only a verified statement changes another
agent's view of it. Others may still *accuse* it (suspect, dead), but never above the
highest incarnation it signed, so it can always outbid an accusation by one: no holder
of the gossip key, and nobody at all on a plaintext cluster, can move, retag or evict
another member (``rules.py`` applies this; this module decides what verifies).

*Modes* (``--node-identity``), for a cluster that upgrades one agent at a time:

* ``off``: nothing is signed or checked (version 1's behaviour);
* ``prefer``: we sign, and send every statement both plain (for version-1 members)
  and signed; a member whose signed word we have verified once is never again taken
  at its unsigned word, others still are;
* ``require``: only signed statements count; unsigned alives and leaves are dropped.

*Bindings.* A name's key comes from a credential an authority signed (the mesh CA or
the policy trust keys), newest ``issued_at`` first, or, where the operator opted in
(``tofu``), from the member's own claim — pinned only from the member's own push-pull
(``anti_entropy.py``), never from third-party gossip, where an attacker would pin
first.

*Cost.* Verification results are cached by the exact signed bytes, for the whole
process (a broadcast arrives many times; the simulator runs thousands of nodes in one
process), and a source host gets a budget of verifications that miss the cache, so
junk signatures cannot fill a core.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .node_key import (
    Credential,
    CredentialAuthority,
    CredentialError,
    NodeKey,
    decode_credential,
    ed25519_valid,
    tofu_credential,
)

MODES = ("off", "prefer", "require")
ALIVE_CONTEXT = b"rumor-alive-v1\0"
LEAVE_CONTEXT = b"rumor-leave-v1\0"

#: (public key, context, body, signature) -> verified; shared by every node of the
#: process. The body is the very bytes object the decoder shares, whose hash Python
#: keeps, so a hit costs no copy and no rehash of the message.
_VERIFIED: dict[tuple[bytes, bytes, bytes, bytes], bool] = {}
_VERIFIED_MAX = 1 << 17
#: (authority id, credential bytes) -> (the authority, vouched for); the authority is
#: kept so its id cannot be reused by another object while the entry lives.
_VOUCHED: dict[tuple[int, bytes], tuple[object, bool]] = {}


def clear_caches() -> None:
    """Forget every cached verification (tests that count verifications)."""
    _VERIFIED.clear()
    _VOUCHED.clear()


@dataclass(slots=True)
class _Budget:
    tokens: float
    at: float


@dataclass
class Identity:
    """One node's signing key, its credential and its rules for others' (see module)."""

    mode: str = "off"
    key: NodeKey | None = None
    #: Our credential's bytes (an authority's, or a tofu claim).
    credential: bytes | None = None
    authority: CredentialAuthority | None = None
    #: Trust on first use (plaintext clusters, explicit opt-in).
    tofu: bool = False
    #: Verifications that miss the cache, per source host: a rate and a burst.
    verify_rate: float = 200.0
    verify_burst: float = 400.0
    #: The bound key of a member, if any (set by the membership core).
    key_of: Callable[[str], bytes | None] = field(default=lambda name: None, repr=False)
    stats: dict[str, int] = field(default_factory=lambda: {
        "signatures_verified": 0, "signatures_bad": 0, "signatures_cached": 0,
        "verifications_throttled": 0, "credentials_refused": 0})
    _budgets: dict[str, _Budget] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"node identity mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.mode != "off" and self.key is None:
            raise ValueError(f"node identity {self.mode!r} needs a node key (a data dir)")
        if self.mode != "off" and self.credential is None and not self.tofu:
            raise ValueError(f"node identity {self.mode!r} needs a node credential "
                             "(rumor ca credential) or trust on first use (--node-tofu)")

    @classmethod
    def with_tofu(cls, mode: str, key: NodeKey, cluster: str, name: str,
                  issued_at: int) -> Identity:
        return cls(mode=mode, key=key, tofu=True,
                   credential=tofu_credential(cluster, name, key.public, issued_at))

    @property
    def signing(self) -> bool:
        """Whether we sign our own statements."""
        return self.mode != "off"

    @property
    def plain_too(self) -> bool:
        """Whether our statements also go out unsigned (for version-1 members)."""
        return self.mode != "require"

    def sign(self, context: bytes, data: bytes) -> bytes | None:
        """Our signature of ``context + data``; None when we do not sign."""
        if self.key is None or self.mode == "off":
            return None
        return self.key.sign(context + data)

    def accepts_unsigned(self, node: str) -> bool:
        """Whether an unsigned statement by or about ``node``'s own state may count."""
        if self.mode == "off":
            return True
        return self.mode == "prefer" and self.key_of(node) is None

    def verify(self, now: float, node: str, context: bytes, data: bytes, sig: bytes,
               source: str) -> bool:
        """Whether ``node``'s bound key signed ``context + data``."""
        key = self.key_of(node)
        return key is not None and self.check(now, key, context, data, sig, source) is True

    def check(self, now: float, public_key: bytes, context: bytes, body: bytes, sig: bytes,
              source: str, budgeted: bool = True) -> bool | None:
        """Whether ``sig`` is ``public_key``'s over ``context + body``: cached by the
        exact bytes; a miss spends one of ``source``'s verification tokens (unless not
        ``budgeted``: a push-pull, which stops at its first bad signature). None: not
        checked, the source is over its budget."""
        k = (public_key, context, body, sig)
        hit = _VERIFIED.get(k)
        if hit is not None:
            self.stats["signatures_cached"] += 1
            return hit
        if budgeted and not self._spend(now, source):
            return None
        ok = ed25519_valid(public_key, context + body, sig)
        self.stats["signatures_verified" if ok else "signatures_bad"] += 1
        if len(_VERIFIED) >= _VERIFIED_MAX:
            _VERIFIED.clear()
        _VERIFIED[k] = ok
        return ok

    def credential_of(self, raw: bytes, node: str) -> Credential | None:
        """The credential ``raw`` if it is well formed, names ``node`` in our cluster
        and is vouched for by our authority (a tofu claim: well formed and, if we
        accept first use, naming ``node``). None (counted) otherwise."""
        try:
            c = decode_credential(raw)
        except CredentialError:
            self.stats["credentials_refused"] += 1
            return None
        if c.name != node:
            self.stats["credentials_refused"] += 1
            return None
        if c.kind == "tofu":
            return c if self.tofu else None
        a = self.authority
        if a is None or c.cluster != a.cluster:
            self.stats["credentials_refused"] += 1
            return None
        k = (id(a), raw)
        hit = _VOUCHED.get(k)
        if hit is not None and hit[0] is a:
            ok = hit[1]
        else:
            ok = a.vouches(c)
            if len(_VOUCHED) >= _VERIFIED_MAX:
                _VOUCHED.clear()
            _VOUCHED[k] = (a, ok)
        if not ok:
            self.stats["credentials_refused"] += 1
            return None
        return c

    def _spend(self, now: float, source: str) -> bool:
        b = self._budgets.get(source)
        if b is None:
            if len(self._budgets) >= 4096:
                self._budgets.clear()  # bounded; a flood from many hosts resets it
            b = self._budgets[source] = _Budget(self.verify_burst, now)
        else:
            b.tokens = min(self.verify_burst, b.tokens + (now - b.at) * self.verify_rate)
            b.at = now
        if b.tokens < 1.0:
            self.stats["verifications_throttled"] += 1
            return False
        b.tokens -= 1.0
        return True


__all__ = ["ALIVE_CONTEXT", "LEAVE_CONTEXT", "MODES", "Identity", "clear_caches"]
