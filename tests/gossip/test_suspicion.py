"""Lifeguard's suspicion timer: long at first, shorter with each independent confirmation."""

from __future__ import annotations

import math

import pytest

from rumor.gossip.config import LAN
from rumor.gossip.suspicion import Suspicion

CFG = LAN.with_overrides(reconnect_interval=5.0)


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    s = Suspicion(start=0.0, incarnation=1, accuser="a", k=3, min_timeout=2.0,
                  max_timeout=12.0)
    assert s.timeout() == 12.0
    assert not s.confirm("a"), "the accuser does not confirm itself"
    timeouts = []
    for src in ("b", "c", "d"):
        assert s.confirm(src)
        timeouts.append(s.timeout())
    assert not s.confirm("b") and not s.confirm("e"), "duplicates and extras ignored"
    assert timeouts[0] == pytest.approx(12 - 10 * math.log(2) / math.log(4))
    assert timeouts == sorted(timeouts, reverse=True)
    assert timeouts[-1] == 2.0
