"""Lifeguard local health ("awareness").

A node that misses acks may itself be the slow one (CPU starved, GC pause, full
socket buffer). Rather than accuse others, it counts evidence against itself and
stretches its probe window by ``score + 1``, giving peers time to answer.
"""

from __future__ import annotations


class Awareness:
    def __init__(self, max_multiplier: int) -> None:
        self.max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self.max - 1)

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
