"""Lifeguard dynamic suspicion timeout.

A suspicion starts with a long timeout and shrinks as independent members confirm it:
``max(min, max - (max - min) * log(C + 1) / log(K + 1))`` for C confirmations out of K
expected. One confused accuser therefore cannot fail a healthy member quickly, while a
real failure that many members observe is declared almost as fast as plain SWIM.
"""

from __future__ import annotations

import math


class Suspicion:
    def __init__(self, *, start: float, incarnation: int, accuser: str, k: int,
                 min_timeout: float, max_timeout: float) -> None:
        self.start = start
        self.incarnation = incarnation
        self.k = k
        self.min = min_timeout
        self.max = max_timeout if k > 0 else min_timeout
        # The accuser is not an independent confirmation of its own accusation.
        self._seen = {accuser}
        # next_deadline() asks for every suspicion on every call; the deadline only
        # changes when a confirmation arrives, so it is computed then.
        self._deadline = self.start + self.timeout()

    @property
    def confirmations(self) -> int:
        return len(self._seen) - 1

    def confirm(self, source: str) -> bool:
        """Count ``source`` once; True if it was a new confirmation (worth re-gossiping)."""
        if self.confirmations >= self.k or source in self._seen:
            return False
        self._seen.add(source)
        self._deadline = self.start + self.timeout()
        return True

    def timeout(self) -> float:
        if self.k <= 0:
            return self.min
        frac = math.log(self.confirmations + 1) / math.log(self.k + 1)
        return max(self.min, self.max - (self.max - self.min) * frac)

    def deadline(self) -> float:
        return self._deadline
