"""The one duration grammar, as service specs and policy documents both read it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rumor.gossip.durations import DurationError, format_duration, parse_duration


def test_units_and_the_bare_number() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1.5m") == 90.0
    assert parse_duration("1h") == 3600.0
    assert parse_duration("5") == 5.0
    with pytest.raises(DurationError):
        parse_duration("5", unit_required=True)
    for bad in ("", "5 s", "-1s", "1d", "s", "1.s", " 5s"):
        with pytest.raises(DurationError):
            parse_duration(bad)


@given(st.integers(0, 10**9))
def test_format_reads_back_exactly(ms: int) -> None:
    text = format_duration(ms / 1000)
    assert round(parse_duration(text, unit_required=True) * 1000, 3) == ms
