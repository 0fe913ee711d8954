"""proxy/log_throttle.py: one line per key and interval, the rest counted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rumor.proxy.log_throttle import LogThrottle, held_note


def test_one_line_per_key_and_interval_and_the_next_says_how_many_were_held() -> None:
    t = LogThrottle(interval=10.0)
    assert t.allow("a", 0.0) == 0
    assert [t.allow("a", 0.1 * i) for i in range(1, 6)] == [None] * 5
    assert t.allow("b", 1.0) == 0  # another key is not held by the first
    assert t.allow("a", 10.0) == 5
    assert t.allow("a", 12.0) is None
    assert t.allow("a", 25.0) == 1
    assert held_note(0) == "" and held_note(5) == " (5 more like it since the last such line)"


def test_the_table_stays_bounded_whatever_keys_a_flood_chooses() -> None:
    t = LogThrottle(interval=10.0, max_keys=100)
    for i in range(10_000):
        assert t.allow(("peer", i), 0.0) == 0
    assert len(t._seen) == 100
    # The newest keys are the ones kept: a repeat of one of them is held back.
    assert t.allow(("peer", 9_999), 1.0) is None


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 5)), max_size=200))
def test_every_line_is_either_logged_or_counted_in_the_next_logged_one(
        calls: list[tuple[str, float]]) -> None:
    t = LogThrottle(interval=1.0)
    now = 0.0
    logged = {k: 0 for k in "abc"}
    accounted = {k: 0 for k in "abc"}
    for key, step in calls:
        now += step
        held = t.allow(key, now)
        if held is not None:
            logged[key] += 1
            accounted[key] += held + 1
    for key in "abc":  # a final line after the interval accounts for the tail
        held = t.allow(key, now + 2.0)
        assert held is not None
        accounted[key] += held
        assert accounted[key] == sum(1 for k, _ in calls if k == key)
