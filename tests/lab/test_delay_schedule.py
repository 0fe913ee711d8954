"""The delay line's sans-IO core: release times, header parsing, the lateness histogram."""

from __future__ import annotations

import ipaddress
import math
import random
import statistics
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.simulations.lab.delay_schedule import (
    DEFAULT_KEY,
    DelaySchedule,
    LatenessHistogram,
    flow_key,
    parse_delay_spec,
    parse_header,
)
from rumor.simulations.network import Fixed, LogNormal, Uniform


def ipv4(dst: str, proto: int = 17, ihl: int = 5) -> bytes:
    return (struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 60, 1, 0, 64, proto, 0,
                        ipaddress.IPv4Address("10.211.250.1").packed,
                        ipaddress.IPv4Address(dst).packed) + b"\0" * 20)


def ipv6(dst: str, next_header: int = 6) -> bytes:
    return (struct.pack("!IHBB16s16s", 6 << 28, 20, next_header, 64,
                        ipaddress.IPv6Address("fd00:211:250::1").packed,
                        ipaddress.IPv6Address(dst).packed))


# -- specs -----------------------------------------------------------------------------

def test_specs_are_the_simulators() -> None:
    assert parse_delay_spec("fixed:0.02") == Fixed(0.02)
    assert parse_delay_spec("uniform:0.015:0.025") == Uniform(0.015, 0.025)
    assert parse_delay_spec("lognormal:0.01:0.5") == LogNormal(0.01, 0.5)


@pytest.mark.parametrize("text", ["fixed:-1", "fixed:nan", "fixed:inf", "uniform:0.2:0.1",
                                  "uniform:-0.1:0.1", "lognormal:0.01:-1", "normal:1",
                                  "fixed", "fixed:x", ""])
def test_bad_specs_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        parse_delay_spec(text)


# -- release times ---------------------------------------------------------------------

KEYS = [flow_key(ipv4("10.211.250.2")), flow_key(ipv4("10.211.250.3")),
        flow_key(ipv6("fd00:211:250::2")), DEFAULT_KEY]
arrivals = st.lists(st.tuples(st.floats(0, 0.05, allow_nan=False),  # gap to previous
                              st.sampled_from(KEYS)),
                    min_size=1, max_size=200)
specs = st.sampled_from(["fixed:0", "fixed:0.02", "uniform:0:0.05", "uniform:0.015:0.025",
                         "lognormal:0.01:1.0"])


@given(arrivals, specs, st.integers(0, 2**32))
def test_never_before_arrival_and_fifo_per_path(
        packets: list[tuple[float, bytes]], spec: str, seed: int) -> None:
    sched = DelaySchedule(parse_delay_spec(spec), random.Random(seed))
    now = 100.0
    last: dict[bytes, float] = {}
    for gap, key in packets:
        now += gap
        t = sched.release(now, key)
        assert t >= now
        assert t >= last.get(key, -math.inf)  # never overtakes an earlier packet
        last[key] = t


def test_fixed_delay_is_exact_and_the_rng_untouched() -> None:
    rng = random.Random(1)
    state = rng.getstate()
    sched = DelaySchedule(Fixed(0.02), rng)
    for i in range(100):
        assert sched.release(i * 0.001, b"k") == pytest.approx(i * 0.001 + 0.02)
    assert rng.getstate() == state


def test_uniform_samples_when_packets_are_sparse() -> None:
    """Gaps longer than the spread: FIFO never binds, so the delays are the spec's."""
    sched = DelaySchedule(Uniform(0.015, 0.025), random.Random(7))
    delays = [sched.release(i * 0.1, b"k") - i * 0.1 for i in range(4000)]
    assert min(delays) >= 0.015 and max(delays) <= 0.025
    assert statistics.mean(delays) == pytest.approx(0.020, abs=0.0003)
    # Deciles of U(15, 25) ms: 16, 17, ... 24 ms.
    deciles = statistics.quantiles(delays, n=10)
    for i, q in enumerate(deciles, start=1):
        assert q == pytest.approx(0.015 + i * 0.001, abs=0.0004)


def test_dense_traffic_shifts_a_spread_delay_up_and_other_paths_are_free() -> None:
    """Gaps far below the spread: each packet waits for the slowest before it, so
    ``uniform:15:25ms`` delays crowd towards 25 ms (median 23.5 ms at 5,000/s); a
    second path's packets are not held behind the first's."""
    sched = DelaySchedule(Uniform(0.015, 0.025), random.Random(7))
    dense = [sched.release(i * 0.0002, b"a") - i * 0.0002 for i in range(5000)]
    assert statistics.median(dense) > 0.023  # the spec's median is 0.020
    sparse = [sched.release(i * 0.1 + 0.00005, b"b") - (i * 0.1 + 0.00005)
              for i in range(10)]
    assert min(sparse) < 0.020


def test_same_seed_same_schedule() -> None:
    def run(seed: int) -> list[float]:
        s = DelaySchedule(LogNormal(0.01, 0.5), random.Random(seed))
        return [s.release(i * 0.01, bytes([i % 3])) for i in range(50)]
    assert run(3) == run(3) and run(3) != run(4)


def test_per_key_override() -> None:
    sched = DelaySchedule(Fixed(0.01), random.Random(0), per_key={b"far": Fixed(0.1)})
    assert sched.release(1.0, b"far") == pytest.approx(1.1)
    assert sched.release(1.0, b"near") == pytest.approx(1.01)


def test_paths_that_no_longer_constrain_are_forgotten() -> None:
    sched = DelaySchedule(Fixed(0.001), random.Random(0))
    for i in range(3 * DelaySchedule.PRUNE_AT):
        sched.release(float(i), i.to_bytes(4, "big"))
    assert sched.paths <= DelaySchedule.PRUNE_AT + 1


# -- headers ---------------------------------------------------------------------------

def test_ipv4_and_ipv6_headers() -> None:
    h = parse_header(ipv4("10.211.250.2", proto=17))
    assert (h.version, h.protocol, h.protocol_name) == (4, 17, "udp")
    assert h.source == ipaddress.IPv4Address("10.211.250.1").packed
    assert h.destination == ipaddress.IPv4Address("10.211.250.2").packed
    h6 = parse_header(ipv6("fd00:211:250::2", next_header=6))
    assert (h6.version, h6.protocol_name) == (6, "tcp")
    assert h6.source == ipaddress.IPv6Address("fd00:211:250::1").packed
    assert h6.destination == ipaddress.IPv6Address("fd00:211:250::2").packed
    assert flow_key(ipv4("10.211.250.2")) == h.source + h.destination
    assert flow_key(ipv6("fd00:211:250::2")) == h6.source + h6.destination
    # A copy range of exactly the fixed header is enough.
    assert parse_header(ipv4("10.0.0.9")[:20]).destination == bytes([10, 0, 0, 9])
    assert parse_header(ipv6("::1")[:40]).destination == ipaddress.IPv6Address("::1").packed


@pytest.mark.parametrize(("data", "match"), [
    (b"", "empty"), (ipv4("10.0.0.1")[:19], "IPv4 header truncated"),
    (ipv6("::1")[:39], "IPv6 header truncated"), (ipv4("10.0.0.1", ihl=4), "header length"),
    (b"\x20" + b"\0" * 40, "not an IP packet"),
])
def test_garbage_headers_say_why(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_header(data)
    assert flow_key(data) == DEFAULT_KEY


@given(st.binary(max_size=80))
@settings(max_examples=500)
def test_any_bytes_parse_or_raise_valueerror(data: bytes) -> None:
    try:
        h = parse_header(data)
    except ValueError:
        assert flow_key(data) == DEFAULT_KEY
    else:
        assert len(h.destination) == len(h.source) == (4 if h.version == 4 else 16)
        assert flow_key(data) == h.source + h.destination
    assert flow_key(memoryview(data)) == flow_key(data)


# -- lateness histogram ----------------------------------------------------------------

@pytest.mark.parametrize("mean", [0.0003, 0.05])  # linear buckets, then log buckets
def test_histogram_quantiles_within_two_percent(mean: float) -> None:
    rng = random.Random(5)
    values = [rng.expovariate(1 / mean) for _ in range(20000)]
    h = LatenessHistogram()
    for v in values:
        h.add(v)
    exact = sorted(values)
    for q in (0.5, 0.9, 0.99):
        want = exact[int(q * (len(exact) - 1))]
        assert h.quantile(q) == pytest.approx(want, rel=0.03)
    assert h.max == max(values) and h.count == len(values)
    assert h.quantile(1.0) <= h.max


def test_histogram_edges() -> None:
    h = LatenessHistogram()
    assert h.quantile(0.5) == 0.0 and h.summary()["count"] == 0
    for v in (-1.0, float("nan"), 0.0, 5e-7):
        h.add(v)
    assert h.quantile(0.99) <= 5e-7 and h.max == 5e-7 and h.count == 4
    with pytest.raises(ValueError):
        h.quantile(1.5)
