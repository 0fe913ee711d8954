"""Who may publish policy: the trusted key set, its threshold, and how it rotates.

An agent starts from the keys and threshold its operator configured. A document is
genuine when at least ``threshold`` *distinct* trusted keys signed its payload, so one
stolen key cannot change policy on its own.

The key set itself rotates through ``trust`` documents (TUF's root rule): version
v+1 is accepted only if it is signed by ``threshold`` of the keys trusted now *and*
by its own ``threshold`` of the keys it names. The old keys vouch for the change; the
new keys prove they exist and agree. An agent that missed several rotations catches
up by applying the chain in version order, each link checked by the previous one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .envelope import CONTEXT, Envelope
from .keys import PublicKey


class TrustError(ValueError):
    """The trust configuration itself is unusable (no keys, bad threshold)."""


@dataclass(frozen=True)
class Verdict:
    """How an envelope fared against a key set."""

    valid_keys: tuple[str, ...]  # distinct trusted key ids whose signature verified
    threshold: int
    bad: tuple[str, ...] = ()  # trusted key ids whose signature did NOT verify
    unknown: tuple[str, ...] = ()  # key ids we do not trust

    @property
    def ok(self) -> bool:
        return len(self.valid_keys) >= self.threshold

    def explain(self) -> str:
        parts = [f"{len(self.valid_keys)} of {self.threshold} required trusted signatures"]
        if self.bad:
            parts.append(f"invalid signature from {', '.join(self.bad)}")
        if self.unknown:
            parts.append(f"untrusted key(s) {', '.join(self.unknown)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class TrustSet:
    keys: dict[str, PublicKey] = field(default_factory=dict)
    threshold: int = 1
    #: Version of the trust document this set came from (0: the operator's flags).
    version: int = 0

    @classmethod
    def of(cls, keys: Iterable[PublicKey], threshold: int = 1, version: int = 0) -> TrustSet:
        ks = {k.id: k for k in keys}
        if not ks:
            raise TrustError("no trusted publisher keys")
        if not 1 <= threshold <= len(ks):
            raise TrustError(f"trust threshold {threshold} needs between 1 and {len(ks)} "
                             f"(the number of distinct trusted keys)")
        return cls(ks, threshold, version)

    def verify(self, env: Envelope) -> Verdict:
        valid: list[str] = []
        bad: list[str] = []
        unknown: list[str] = []
        message = CONTEXT + env.payload
        for s in env.signatures:
            key = self.keys.get(s.key_id)
            if key is None:
                unknown.append(s.key_id)
            elif s.key_id in valid:
                continue  # the same key twice counts once
            elif key.verify(message, s.signature):
                valid.append(s.key_id)
            else:
                bad.append(s.key_id)
        return Verdict(tuple(valid), self.threshold, tuple(bad), tuple(unknown))

    def ids(self) -> list[str]:
        return sorted(self.keys)

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "threshold": self.threshold, "keys": self.ids()}


def rotation_verdicts(current: TrustSet, proposed: TrustSet,
                      env: Envelope) -> tuple[Verdict, Verdict]:
    """The two checks of the root rule: the current set and the proposed set must each
    meet their own threshold over the same payload."""
    return current.verify(env), proposed.verify(env)
