"""The policy store: which documents this agent holds, and the acceptance rules (sans-IO).

Every document, from the CLI, a peer's broadcast, a push-pull repair or the agent's
own data directory, enters through ``offer(now, data, origin)`` and meets the same
rules, in an order that rejects cheaply first:

1. size, then envelope syntax (``oversized``, ``malformed``);
2. the same payload already held: a ``duplicate`` (normal under gossip, not an error);
3. older than what is held for that name (``stale``: no rollback, no replay);
4. expired (``expired``);
5. fewer than ``threshold`` distinct trusted signatures (``untrusted``);
6. the TOML document itself (``invalid``); its kind and name must match the header,
   and a fault document must expire at most ``MAX_FAULT_LIFETIME`` (24 h) after the
   envelope's ``issued`` time (an injected outage must end on its own);
7. same name and version as the held one but different bytes (``equivocation``): the
   payload with the lower SHA-256 wins everywhere, so the cluster cannot split, and
   the conflict is recorded whichever side this agent saw first.

The final store therefore depends only on the set of documents offered, not on their
order: per name it is the highest version, ties broken by the lowest digest. Trust
documents (kind ``trust``, name ``trust``) are kept as a chain so the key set can be
rebuilt from the operator's bootstrap keys; one that cannot be verified *yet* (a later
link arrived first) waits in a small buffer. When the key set changes, held documents
no longer signed by enough trusted keys are dropped (``revoked``): rotating out a
stolen key must also cancel what it signed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .documents import MAX_FAULT_LIFETIME, Document, PolicyError, TrustSpec
from .envelope import MAX_ENVELOPE, Envelope, EnvelopeError, decode_envelope
from .parser import parse_document
from .trust import TrustSet

TRUST = "trust"
MAX_DOCUMENTS = 4096
MAX_PENDING_TRUST = 16
MAX_LOGGED = 4096
#: Recent distinct rejections kept with their reasons (for the web UI and the API).
MAX_RECENT_REJECTIONS = 32
INF = float("inf")

# Outcome statuses
ACCEPTED = "accepted"
DUPLICATE = "duplicate"
REJECTED = "rejected"
#: A held document whose expiry passed (dropped by ``PolicyStore.expire``).
EXPIRED = "expired"

REASONS = ("oversized", "malformed", "stale", "expired", "untrusted", "invalid",
           "equivocation", "full")


@dataclass(frozen=True)
class Held:
    """An accepted document with where and when it came from."""

    envelope: Envelope
    document: Document
    accepted_at: float
    origin: str

    def to_json(self) -> dict[str, object]:
        return {**self.envelope.summary(), "accepted_at": self.accepted_at,
                "origin": self.origin, "description": self.document.description}


@dataclass
class Outcome:
    status: str
    name: str = ""
    version: int = 0
    reason: str = ""  # one of REASONS when rejected
    detail: str = ""  # for people
    envelope: Envelope | None = None
    #: Documents dropped as a consequence (a trust change revoked their signers).
    revoked: list[Held] = field(default_factory=list)
    #: Set when this offer met an equivocation (whether or not it won).
    conflict: str = ""
    #: True the first time this (document, reason) is seen: log it once.
    first: bool = True

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"status": self.status, "name": self.name,
                                  "version": self.version}
        if self.reason:
            out["reason"] = self.reason
            out["detail"] = self.detail
        if self.conflict:
            out["conflict"] = self.conflict
        if self.revoked:
            out["revoked"] = [h.envelope.name for h in self.revoked]
        return out


@dataclass(slots=True)
class Rejection:
    """One distinct rejection (the same document refused again is counted here)."""

    at: float
    reason: str
    detail: str
    kind: str
    name: str
    version: int
    last: float = 0.0
    origin: str = ""
    count: int = 0

    def to_json(self) -> dict[str, object]:
        return {"at": self.at, "last": self.last, "count": self.count,
                "reason": self.reason, "detail": self.detail, "origin": self.origin,
                "kind": self.kind, "name": self.name, "version": self.version}


Parser = Callable[..., Document]


class PolicyStore:
    def __init__(self, bootstrap: TrustSet, *, parse: Parser = parse_document) -> None:
        self.bootstrap = bootstrap
        self.trust = bootstrap
        self._parse = parse
        self.held: dict[str, Held] = {}
        #: Raised whenever ``held`` changes, so a digest of it can be cached.
        self.revision = 0
        #: Accepted trust documents by version (the chain from the bootstrap keys).
        self.trust_chain: dict[int, Held] = {}
        self._pending_trust: dict[bytes, Envelope] = {}
        self.counts: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.conflicts: list[dict[str, object]] = []
        self._logged: set[tuple[bytes, str]] = set()
        # (reason, kind, name, version, detail) -> record: a document that gossip
        # re-delivers a hundred times is one entry with a count, not the whole list.
        self._recent: OrderedDict[tuple[str, str, str, int, str], Rejection] = OrderedDict()

    # ---- the one entry point -------------------------------------------------------------

    def offer(self, now: float, data: bytes, origin: str = "") -> Outcome:
        if len(data) > MAX_ENVELOPE:
            return self._note(now, origin, "", self._reject(
                b"", "", 0, "oversized", f"{len(data)} bytes; the limit is {MAX_ENVELOPE}"))
        try:
            env = decode_envelope(data)
        except EnvelopeError as e:
            return self._note(now, origin, "",
                              self._reject(data[:64], "", 0, "malformed", str(e)))
        return self.offer_envelope(now, env, origin)

    def refuse(self, reason: str, detail: str, sample: bytes = b"", *,
               now: float | None = None, origin: str = "") -> Outcome:
        """Count and return the rejection of bytes that never became an offer (a
        publish whose body is not an envelope at all, refused before ``offer``), so
        every refused document is counted, whichever layer refused it. ``reason`` is
        one of ``REASONS`` (a bounded set: it labels a metric). With ``now`` (wall
        time) it is also listed among the recent rejections."""
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        out = self._reject(sample[:64], "", 0, reason, detail)
        return out if now is None else self._note(now, origin, "", out)

    def offer_envelope(self, now: float, env: Envelope, origin: str = "") -> Outcome:
        out = self._offer_envelope(now, env, origin)
        return self._note(now, origin, env.kind, out)

    def recent_rejections(self) -> list[dict[str, object]]:
        """The last ``MAX_RECENT_REJECTIONS`` distinct rejections, newest first: wall
        time first and last seen, how often, reason, detail, origin, kind, name and
        version (empty or 0 when the bytes never decoded)."""
        return [r.to_json() for r in reversed(self._recent.values())]

    def _note(self, now: float, origin: str, kind: str, out: Outcome) -> Outcome:
        if out.status != REJECTED:
            return out
        key = (out.reason, kind, out.name, out.version, out.detail)
        rec = self._recent.pop(key, None) or Rejection(now, out.reason, out.detail, kind,
                                                       out.name, out.version)
        rec.last, rec.origin, rec.count = now, origin, rec.count + 1
        self._recent[key] = rec
        while len(self._recent) > MAX_RECENT_REJECTIONS:
            self._recent.popitem(last=False)
        return out

    def _offer_envelope(self, now: float, env: Envelope, origin: str) -> Outcome:
        digest = env.digest
        held = self.held.get(env.name)
        if held is not None and held.envelope.digest == digest:
            self.counts["duplicates"] += 1
            return Outcome(DUPLICATE, env.name, env.version, envelope=held.envelope)
        if held is not None and env.version < held.envelope.version:
            return self._reject(digest, env.name, env.version, "stale",
                                f"version {env.version} is older than the held "
                                f"version {held.envelope.version}")
        if env.kind == TRUST:
            return self._offer_trust(now, env, origin)
        if env.expires is not None and env.expires <= now:
            return self._reject(digest, env.name, env.version, "expired",
                                f"expired at {env.expires:.0f}")
        verdict = self.trust.verify(env)
        if not verdict.ok:
            return self._reject(digest, env.name, env.version, "untrusted", verdict.explain())
        doc = self._document(env)
        if isinstance(doc, Outcome):
            return doc
        if held is None and len(self.held) >= MAX_DOCUMENTS:
            return self._reject(digest, env.name, env.version, "full",
                                f"this agent already holds {MAX_DOCUMENTS} documents")
        conflict = ""
        if held is not None and env.version == held.envelope.version:
            conflict, lost = self._equivocation(env, held)
            if lost is not None:
                return lost
        self.held[env.name] = Held(env, doc, now, origin)
        self.revision += 1
        self.counts["accepted"] += 1
        return Outcome(ACCEPTED, env.name, env.version, envelope=env, conflict=conflict)

    # ---- trust rotation ----------------------------------------------------------------

    def _offer_trust(self, now: float, env: Envelope, origin: str) -> Outcome:
        digest = env.digest
        if env.name != TRUST:
            return self._reject(digest, env.name, env.version, "invalid",
                                f"a trust document must be named {TRUST!r}")
        if env.expires is not None:
            return self._reject(digest, env.name, env.version, "invalid",
                                "trust documents cannot expire (an expired key set "
                                "would leave the cluster with no publishers)")
        known = self.trust_chain.get(env.version)
        if known is not None and known.envelope.digest == digest:
            self.counts["duplicates"] += 1
            return Outcome(DUPLICATE, env.name, env.version, envelope=known.envelope)
        if env.version <= self.trust.version and known is None:
            return self._reject(digest, env.name, env.version, "stale",
                                f"trust version {env.version} is not newer than the "
                                f"current {self.trust.version}")
        doc = self._document(env)
        if isinstance(doc, Outcome):
            return doc
        spec = doc.spec
        assert isinstance(spec, TrustSpec)
        proposed = TrustSet.of(spec.keys, spec.threshold, env.version)
        # The link must be checked against the key set it replaces: for an equivocating
        # twin of an accepted link, that is the set before that link.
        base = self._trust_before(env.version) if known is not None else self.trust
        old_v, new_v = base.verify(env), proposed.verify(env)
        if not (old_v.ok and new_v.ok):
            which = (f"current keys: {old_v.explain()}" if not old_v.ok
                     else f"new keys: {new_v.explain()}")
            if known is None and len(self._pending_trust) < MAX_PENDING_TRUST:
                # Maybe a link we have not seen yet comes first; retried after each change.
                self._pending_trust[digest] = env
            return self._reject(digest, env.name, env.version, "untrusted",
                                f"trust rotation needs both thresholds; {which}")
        conflict = ""
        if known is not None:
            conflict, lost = self._equivocation(env, known)
            if lost is not None:
                return lost
        self.trust_chain[env.version] = Held(env, doc, now, origin)
        self.counts["accepted"] += 1
        self.counts["trust_rotations"] += 1
        out = Outcome(ACCEPTED, env.name, env.version, envelope=env, conflict=conflict)
        out.revoked = self._rebuild_trust()
        self._retry_pending(now, out)
        return out

    def _trust_before(self, version: int) -> TrustSet:
        trust = self.bootstrap
        for v in sorted(self.trust_chain):
            if v >= version:
                break
            trust = self._link(trust, self.trust_chain[v]) or trust
        return trust

    def _link(self, trust: TrustSet, h: Held) -> TrustSet | None:
        spec = h.document.spec
        assert isinstance(spec, TrustSpec)
        proposed = TrustSet.of(spec.keys, spec.threshold, h.envelope.version)
        if trust.verify(h.envelope).ok and proposed.verify(h.envelope).ok:
            return proposed
        return None

    def set_bootstrap(self, now: float, trust: TrustSet) -> list[Held]:
        """Trust other operator keys (a configuration reload). The chain of trust
        documents is followed again from them, rotations that waited for them are
        taken, and the documents no longer supported are dropped and returned."""
        self.bootstrap = trust
        out = Outcome(ACCEPTED, name=TRUST, version=trust.version)
        out.revoked = self._rebuild_trust()
        self._retry_pending(now, out)
        return out.revoked

    def _rebuild_trust(self) -> list[Held]:
        """Recompute the key set from the bootstrap along the chain, then drop the links
        and documents it no longer supports."""
        trust = self.bootstrap
        for v in sorted(self.trust_chain):
            nxt = self._link(trust, self.trust_chain[v])
            if nxt is None:
                del self.trust_chain[v]  # unreachable after an equivocation resolved
                continue
            trust = nxt
        self.trust = trust
        self.revision += 1
        latest = max(self.trust_chain, default=None)
        if latest is None:
            self.held.pop(TRUST, None)
        else:
            self.held[TRUST] = self.trust_chain[latest]
        revoked: list[Held] = []
        for name, h in list(self.held.items()):
            if h.envelope.kind != TRUST and not trust.verify(h.envelope).ok:
                del self.held[name]
                revoked.append(h)
                self.counts["revoked"] += 1
        return revoked

    def _retry_pending(self, now: float, out: Outcome) -> None:
        while self._pending_trust:
            ready = sorted(self._pending_trust.values(), key=lambda e: e.version)
            self._pending_trust.clear()
            progressed = False
            for env in ready:
                if env.version <= self.trust.version:
                    continue
                res = self._offer_trust(now, env, "pending")
                if res.accepted:
                    out.revoked += res.revoked
                    progressed = True
            if not progressed:
                return

    # ---- expiry, digests, queries ---------------------------------------------------------

    def expire(self, now: float) -> list[Held]:
        gone = [h for h in self.held.values()
                if h.envelope.expires is not None and h.envelope.expires <= now]
        for h in gone:
            del self.held[h.envelope.name]
            self.revision += 1
            self.counts["expired"] += 1
        return gone

    def next_expiry(self) -> float:
        return min((h.envelope.expires for h in self.held.values()
                    if h.envelope.expires is not None), default=INF)

    def digest(self) -> dict[str, tuple[int, bytes]]:
        """name -> (version, payload digest) of everything held."""
        return {n: (h.envelope.version, h.envelope.digest) for n, h in self.held.items()}

    def missing_for(self, remote: dict[str, tuple[int, bytes]]) -> list[Envelope]:
        """What a peer with digest ``remote`` lacks or holds an older (or losing) copy
        of, in the order it must apply them (trust chain first, oldest link first)."""
        out: list[Envelope] = []
        rv = remote.get(TRUST, (0, b""))
        for v in sorted(self.trust_chain):
            if v > rv[0] or (v == rv[0] and self.trust_chain[v].envelope.digest < rv[1]):
                out.append(self.trust_chain[v].envelope)
        for name, h in sorted(self.held.items()):
            if name == TRUST:
                continue
            theirs = remote.get(name)
            mine = (h.envelope.version, h.envelope.digest)
            if theirs is None or (mine[0], _neg(mine[1])) > (theirs[0], _neg(theirs[1])):
                out.append(h.envelope)
        return out

    def documents(self) -> list[Document]:
        return [h.document for h in self.held.values() if h.envelope.kind != TRUST]

    def get(self, name: str) -> Held | None:
        return self.held.get(name)

    def stats(self) -> dict[str, object]:
        return {"held": len(self.held), **dict(self.counts),
                "rejected": dict(self.rejections), "conflicts": len(self.conflicts),
                "trust_version": self.trust.version}

    # ---- helpers ---------------------------------------------------------------------------

    def _document(self, env: Envelope) -> Document | Outcome:
        try:
            doc = self._parse(env.body, source=f"{env.name} v{env.version}")
        except PolicyError as e:
            return self._reject(env.digest, env.name, env.version, "invalid", str(e))
        if doc.kind != env.kind or doc.name != env.name:
            return self._reject(env.digest, env.name, env.version, "invalid",
                                f"header says {env.kind} {env.name!r} but the document "
                                f"is {doc.kind} {doc.name!r}")
        if doc.kind == "fault":
            lifetime = None if env.expires is None else env.expires - env.issued
            if lifetime is None or lifetime > MAX_FAULT_LIFETIME:
                what = ("its envelope carries no expiry" if lifetime is None else
                        f"it expires {lifetime / 3600:.2f}h after it was signed")
                return self._reject(env.digest, env.name, env.version, "invalid",
                                    f"a fault document must expire at most "
                                    f"{MAX_FAULT_LIFETIME / 3600:g}h after it is signed; "
                                    f"{what}")
        return doc

    def _equivocation(self, env: Envelope, held: Held) -> tuple[str, Outcome | None]:
        """Record the conflict; the rejection to return if ``env`` loses (the lower
        digest wins everywhere), else None."""
        text = self._record_conflict(env, held)
        if held.envelope.digest < env.digest:
            out = self._reject(env.digest, env.name, env.version, "equivocation",
                               f"{text}; the held payload wins (lower digest)")
            out.conflict = text
            return text, out
        return text, None

    def _record_conflict(self, env: Envelope, held: Held) -> str:
        a, b = sorted([env.digest.hex()[:16], held.envelope.digest.hex()[:16]])
        text = f"two different documents claim {env.name!r} version {env.version} ({a}, {b})"
        record: dict[str, object] = {"name": env.name, "version": env.version,
                                     "digests": [a, b], "winner": a}
        if record not in self.conflicts:
            self.conflicts.append(record)
            self.counts["conflicts"] += 1
            del self.conflicts[:-64]  # the recent ones are what an operator needs
        return text

    def _reject(self, key: bytes, name: str, version: int, reason: str,
                detail: str) -> Outcome:
        self.rejections[reason] += 1
        logged = (key, reason)
        first = logged not in self._logged
        if first:
            if len(self._logged) >= MAX_LOGGED:
                self._logged.clear()
            self._logged.add(logged)
        return Outcome(REJECTED, name, version, reason, detail, first=first)


def _neg(digest: bytes) -> bytes:
    """Order key under which a lower digest ranks higher (it wins equivocations)."""
    return bytes(255 - b for b in digest)
