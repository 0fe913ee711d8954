"""The ``--retry-join`` schedule: capped exponential back-off with jitter.

An agent started before its seeds (every host of a rack booting at once under
systemd) must keep trying them without hammering them: the first tries come quickly,
so a seed that is a second late costs a second, then the wait doubles up to the
operator's ``--retry-interval`` (30 s by default, as Consul's ``retry_interval``).
Each wait is shortened by a random share of up to ``RETRY_JITTER``, so agents that
started together drift apart instead of knocking on the seed in step; the jitter
only ever shortens, so the interval stays a true cap.

Pure: the shell (``rejoin.py``) passes the failure count and its ``random.Random``.
"""

from __future__ import annotations

import random

#: The wait after the first failed round, when ``--retry-interval`` is longer.
RETRY_FIRST = 1.0
#: Up to this share of each wait is taken off at random.
RETRY_JITTER = 0.2
#: Doubling stops here (2**40 s is far past any cap): the arithmetic stays finite.
_MAX_DOUBLINGS = 40


def retry_delay(failures: int, interval: float, rng: random.Random, *,
                first: float = RETRY_FIRST, jitter: float = RETRY_JITTER) -> float:
    """Seconds to wait after the ``failures``-th failed round in a row (1 or more)
    before the next: ``min(interval, first * 2**(failures - 1))``, less up to
    ``jitter`` of it at random."""
    if failures < 1:
        raise ValueError(f"failures counts from 1, got {failures}")
    if not interval > 0:
        raise ValueError(f"the interval must be positive, got {interval}")
    base = min(interval, min(first, interval) * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))
    return base * (1.0 - jitter * rng.random())


def retry_schedule(rounds: int, interval: float, rng: random.Random, **kw: float) -> list[float]:
    """The waits after each of ``rounds`` failed rounds (for docs and tests)."""
    return [retry_delay(n, interval, rng, **kw) for n in range(1, rounds + 1)]


__all__ = ["RETRY_FIRST", "RETRY_JITTER", "retry_delay", "retry_schedule"]
