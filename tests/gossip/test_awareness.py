"""Lifeguard's local health: evidence against ourselves stretches the probe window,
within bounds; good probes bring it back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rumor.gossip.awareness import Awareness


def test_missed_acks_stretch_the_window_and_acks_shrink_it_back() -> None:
    a = Awareness(8)
    assert a.scale(0.5) == 0.5
    a.apply(3)  # e.g. a probe whose three helpers sent no nack
    assert a.score == 3 and a.scale(0.5) == 2.0
    a.apply(-1)
    assert a.scale(1.0) == 3.0


@given(st.integers(1, 10), st.lists(st.integers(-5, 5), max_size=50))
def test_the_score_stays_within_zero_and_the_multiplier(top: int, deltas: list[int]) -> None:
    a = Awareness(top)
    for d in deltas:
        a.apply(d)
        assert 0 <= a.score <= top - 1
        assert 1.0 <= a.scale(1.0) <= top


def test_without_lifeguard_the_window_never_stretches() -> None:
    a = Awareness(1)  # what the core uses with lifeguard off
    a.apply(5)
    assert a.scale(1.0) == 1.0
