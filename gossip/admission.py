"""Admission of unsigned names on a plaintext cluster (a part of ``Membership``).

On a cluster without a gossip key anyone can send a datagram, so a name learned only
from third-party gossip proves nothing: an attacker can invent hundreds of members per
datagram, and every invented member costs a probe period and an indirect probe round,
which blinds failure detection for the real ones. So such a name is not admitted to
the table until it answered a direct ping at the address claimed for it (or arrives
signed, ``signed_state.py``). The member's own push-pull counts as first-hand (it came
over a stream from the member itself).

Pending names are bounded (``max_pending``), the pings they cost are rate-limited
(``admission_rate``, so a flood cannot turn us into a reflector), and the answer must
come from the address pinged. A name that does not answer within
``admission_timeout`` is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass

from .core_base import CoreBase
from .security import Plaintext
from .wire import Address, Alive, Ping

#: Pings sent to a pending name before it is forgotten (a lost datagram must not cost
#: a real member its admission until the next push-pull).
ADMISSION_TRIES = 5


#: A pending name is forgotten this many admission timeouts after it arrived, pinged
#: or not (a flood waiting for ping tokens must not hold the table's door for long).
PENDING_LIFETIME = 4


@dataclass(slots=True)
class _Pending:
    alive: Alive
    seq: int
    #: When the next ping is due (or, once out of tries, when it is forgotten).
    expires: float
    #: When it is forgotten in any case.
    deadline: float
    tries: int = 0


class Admission(CoreBase):
    """Pending names and their admission pings (see the module)."""

    _pending: dict[str, _Pending]
    _pending_by_seq: dict[int, str]

    def _admission_needed(self) -> bool:
        """Whether third-party names wait for a direct answer before they count."""
        return (self.config.admit_by_ping and isinstance(self.seal, Plaintext)
                and not self._quiet)

    def _admit_later(self, now: float, a: Alive) -> None:
        """Hold ``a`` (an unknown, unsigned name) and ping it at its claimed address."""
        p = self._pending.get(a.node)
        if p is not None:
            if a.incarnation > p.alive.incarnation and a.addr == p.alive.addr:
                p.alive = a
            return
        cfg = self.config
        if len(self._pending) >= cfg.max_pending:
            self.stats["admissions_refused_full"] += 1
            return
        seq = self._next_seq()
        p = self._pending[a.node] = _Pending(
            a, seq, now, now + PENDING_LIFETIME * cfg.admission_timeout)
        self._pending_by_seq[seq] = a.node
        if not self._ping_pending(now, p):
            # Out of ping tokens (a join learns hundreds of names at once): it waits
            # its turn in _expire_pending.
            self.stats["admissions_throttled"] += 1

    def _ping_pending(self, now: float, p: _Pending) -> bool:
        """Ping a pending name if a token allows (False: none left now)."""
        cfg = self.config
        tokens, at = self._admission_tokens
        tokens = min(float(cfg.admission_burst), tokens + (now - at) * cfg.admission_rate)
        if tokens < 1.0:
            self._admission_tokens = (tokens, now)
            return False
        self._admission_tokens = (tokens - 1.0, now)
        p.tries += 1
        p.expires = now + self._admission_wait()
        self.stats["admission_pings"] += 1
        name = p.alive.node
        self._send(now, p.alive.addr, name, [Ping(p.seq, name, self.name)], piggyback=False)
        return True

    def _on_admission_ack(self, now: float, source: Address, seq: int) -> bool:
        """An ack for an admission ping (True: it was one, handled)."""
        name = self._pending_by_seq.get(seq)
        if name is None:
            return False
        p = self._pending[name]
        if source != p.alive.addr:
            self.stats["admission_acks_misaddressed"] += 1
            return True
        del self._pending_by_seq[seq]
        del self._pending[name]
        self.stats["admitted_by_ping"] += 1
        if self.identity.accepts_unsigned(name):
            self._accept_alive(now, p.alive, None, None)
        return True

    def _pending_done(self, name: str) -> None:
        """``name`` was admitted another way (signed): stop waiting for it."""
        if self._pending:
            p = self._pending.pop(name, None)
            if p is not None:
                self._pending_by_seq.pop(p.seq, None)

    def _admission_wait(self) -> float:
        return self.config.admission_timeout / ADMISSION_TRIES

    def _expire_pending(self, now: float) -> None:
        """Ping the names whose turn has come (oldest first, as tokens allow); forget
        those out of tries or past their lifetime."""
        for name, p in list(self._pending.items()):
            if now < p.expires and now < p.deadline:
                continue
            if p.tries >= ADMISSION_TRIES or now >= p.deadline:
                del self._pending[name]
                self._pending_by_seq.pop(p.seq, None)
                self.stats["admission_timeouts"] += 1
                continue
            if not self._ping_pending(now, p):
                p.expires = now  # still due; the next tick tries again

    def pending_names(self) -> list[str]:
        """Names waiting for their admission ping's answer."""
        return list(self._pending)
