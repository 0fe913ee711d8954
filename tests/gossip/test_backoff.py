"""The --retry-join schedule: quick first tries, doubling, capped, jittered down."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rumor.gossip.backoff import RETRY_JITTER, retry_delay, retry_schedule


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_without_jitter_the_waits_double_up_to_the_interval() -> None:
    waits = retry_schedule(8, 30.0, _Fixed(0.0))
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_jitter_only_shortens() -> None:
    waits = retry_schedule(8, 30.0, _Fixed(1.0))
    assert waits == pytest.approx([w * (1 - RETRY_JITTER)
                                   for w in [1, 2, 4, 8, 16, 30, 30, 30]])


def test_an_interval_shorter_than_the_first_wait_caps_it() -> None:
    assert retry_schedule(3, 0.5, _Fixed(0.0)) == [0.5, 0.5, 0.5]


@given(st.integers(1, 10**6), st.floats(0.001, 1e5), st.integers(0, 2**32))
def test_every_wait_is_within_the_cap_and_its_jitter(failures: int, interval: float,
                                                     seed: int) -> None:
    d = retry_delay(failures, interval, random.Random(seed))
    base = min(interval, min(1.0, interval) * 2.0 ** min(failures - 1, 40))
    assert base * (1 - RETRY_JITTER) <= d <= base <= interval


def test_agents_started_together_drift_apart() -> None:
    firsts = {round(retry_delay(3, 30.0, random.Random(seed)), 6) for seed in range(20)}
    assert len(firsts) == 20


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        retry_delay(0, 30.0, random.Random(0))
    with pytest.raises(ValueError):
        retry_delay(1, 0.0, random.Random(0))
