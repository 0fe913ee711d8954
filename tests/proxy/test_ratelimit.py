"""The mesh-wide rate limit: shares by weight, token buckets, Retry-After, and the
accuracy the module's docstring states, simulated over several instances."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.policy.documents import RateLimitSpec, SourceLimit
from rumor.proxy.ratelimit import (
    MAX_RETRY_AFTER,
    MeshRateLimit,
    local_share,
    retry_after_header,
)

# --- the share -----------------------------------------------------------------------------


def test_local_share_follows_the_weights() -> None:
    live = {"a": 1.0, "b": 1.0, "c": 2.0}
    assert local_share(100, 1, live, own="a") == pytest.approx(25)
    assert local_share(100, 2, live, own="c") == pytest.approx(50)
    # Not listed yet: counted on top (W + w).
    assert local_share(100, 1, live, own="d") == pytest.approx(20)
    # Listed with another weight: the instance's own weight is the one that counts.
    assert local_share(100, 2, {"a": 1.0, "b": 1.0}, own="a") == pytest.approx(200 / 3)
    # Draining instances count 0; a draining instance's own share is 0.
    assert local_share(100, 1, {"a": 1.0, "b": 0.0, "c": 1.0}, own="a") == pytest.approx(50)
    assert local_share(100, 0, live, own="a") == 0.0
    assert local_share(100, 1, {}, own="a") == 100
    assert local_share(0, 1, live, own="a") == 0.0


def limiter(rate: float | None = 10.0, burst: float = 2.0,
            sources: tuple[SourceLimit, ...] = (), *, weight: float = 1.0,
            live: dict[str, float] | None = None) -> MeshRateLimit:
    spec = RateLimitSpec("api", rate, burst, sources)
    return MeshRateLimit(spec, instance="me", own_weight=weight,
                         live_weights=live if live is not None else {"me": weight})


# --- the buckets ---------------------------------------------------------------------------


def test_a_burst_then_the_refill_rate() -> None:
    rl = limiter(rate=10.0, burst=2.0)  # alone: share 10/s, capacity 20
    assert rl.share == 10 and rl.capacity == 20
    assert all(rl.admit(0.0, None).ok for _ in range(20))
    refused = rl.admit(0.0, None)
    assert (refused.ok, refused.limit) == (False, "total")
    assert refused.retry_after == pytest.approx(0.1)
    assert retry_after_header(refused.retry_after) == b"1"
    assert not rl.admit(0.09, None).ok
    assert rl.admit(0.1, None).ok
    # One second later: ten more, not twenty.
    assert sum(rl.admit(1.1, None).ok for _ in range(30)) == 10


def test_a_small_share_still_admits_one_at_a_time() -> None:
    """share × burst < 1 would never hold a token: the bucket holds at least one."""
    rl = limiter(rate=1.0, burst=1.0, live={"me": 1, **{f"p{i}": 1 for i in range(9)}})
    assert rl.share == pytest.approx(0.1) and rl.capacity == 1.0
    assert rl.admit(0.0, None).ok
    refused = rl.admit(0.0, None)
    assert not refused.ok and refused.retry_after == pytest.approx(10)
    assert retry_after_header(refused.retry_after) == b"10"
    assert rl.admit(10.0, None).ok


def test_source_limits_and_the_total_both_apply() -> None:
    rl = limiter(rate=10.0, burst=1.0, sources=(SourceLimit("batch", 2.0),))
    assert rl.source_share("batch") == 2 and rl.source_share("web") is None
    assert [rl.admit(0.0, "batch").ok for _ in range(3)] == [True, True, False]
    refused = rl.admit(0.0, "batch")
    assert refused.limit == "source:batch" and refused.retry_after == pytest.approx(0.5)
    # The refused batch requests took no token from the total: 8 remain for the rest.
    assert sum(rl.admit(0.0, src).ok for src in ["web", None] * 10) == 8
    # The total refuses now, batch included, with the total's wait when it is longer.
    assert rl.admit(0.0, "web").limit == "total"
    # Unnamed sources keep no state of their own.
    assert set(rl._sources) == {"batch"}


def test_source_limits_without_a_total() -> None:
    rl = limiter(rate=None, burst=1.0, sources=(SourceLimit("batch", 1.0),
                                                 SourceLimit("batch", 50.0)))
    assert rl.share is None
    assert rl.source_share("batch") == 1.0  # the first limit of a source named twice
    assert all(rl.admit(0.0, "web").ok for _ in range(1000))
    assert [rl.admit(0.0, "batch").ok for _ in range(2)] == [True, False]


def test_resize_keeps_the_fill_as_a_fraction() -> None:
    rl = limiter(rate=10.0, burst=2.0, live={"me": 1.0, "b": 1.0})  # share 5, capacity 10
    assert sum(rl.admit(0.0, None).ok for _ in range(5)) == 5  # half full
    rl.resize(1.0, {"me": 1.0}, now=0.0)  # alone now: share 10, capacity 20
    assert rl.share == 10 and rl.capacity == 20
    assert sum(rl.admit(0.0, None).ok for _ in range(100)) == 10  # still half: 10 of 20
    # Resized again (a peer joins): an empty bucket stays empty, no fresh burst.
    rl.resize(1.0, {"me": 1.0, "b": 1.0, "c": 2.0}, now=0.0)
    assert not rl.admit(0.0, None).ok
    # With ``now``, what accrued before the resize accrued at the old rate.
    rl.resize(1.0, {"me": 1.0}, now=1.0)  # 1 s at 2.5/s: 2.5 of capacity 5, i.e. half
    assert sum(rl.admit(1.0, None).ok for _ in range(100)) == 10


def test_a_clock_going_back_refills_nothing() -> None:
    rl = limiter(rate=1.0, burst=1.0)
    assert rl.admit(10.0, None).ok
    assert not rl.admit(5.0, None).ok
    assert not rl.admit(10.5, None).ok
    assert rl.admit(11.0, None).ok


def test_retry_after_header() -> None:
    assert retry_after_header(0.0) == b"0"
    assert retry_after_header(0.01) == b"1"
    assert retry_after_header(1.0) == b"1"
    assert retry_after_header(1.2) == b"2"
    assert retry_after_header(-3.0) == b"0"
    for bad in (math.inf, math.nan, 1e12):
        assert retry_after_header(bad) == b"%d" % MAX_RETRY_AFTER


def test_a_draining_instance_admits_nothing() -> None:
    rl = limiter(rate=10.0, weight=0.0, live={"me": 0.0, "b": 1.0})
    refused = rl.admit(0.0, None)
    assert not refused.ok and math.isfinite(refused.retry_after)


# --- accuracy across the mesh ----------------------------------------------------------------

R = 90.0
BURST = 1.0
T = 60.0


def offered(rate: float, start: float = 0.0, end: float = T) -> list[float]:
    """Arrival times of ``rate`` requests/s, evenly spaced over [start, end)."""
    n = round(rate * (end - start))
    return [start + k / rate for k in range(n)]


def test_uneven_load_admits_the_sum_of_min_load_share() -> None:
    """3 equal instances, R = 90/s (30/s each), offered 2R = 180/s split 70/20/10 %:
    126, 36 and 18/s. The mesh admits Σ min(load_i, share_i) = 30 + 30 + 18 = 78/s,
    less than R, plus at most the bursts; and never more than R·(t + burst)."""
    live = {"a": 1.0, "b": 1.0, "c": 1.0}
    spec = RateLimitSpec("api", R, BURST, ())
    loads = {"a": 0.7 * 2 * R, "b": 0.2 * 2 * R, "c": 0.1 * 2 * R}
    admitted = {}
    for name, load in loads.items():
        rl = MeshRateLimit(spec, instance=name, own_weight=1.0, live_weights=live)
        admitted[name] = sum(rl.admit(t, None).ok for t in offered(load))
    total = sum(admitted.values())
    shares = {name: R / 3 for name in loads}
    floor = sum(min(loads[n], shares[n]) for n in loads) * T
    bursts = sum(max(shares[n] * BURST, 1) for n in loads)
    assert floor - len(loads) <= total <= floor + bursts
    assert total <= R * (T + BURST)
    assert total < R * T  # uneven load: the mesh admits less than R
    assert admitted["c"] == loads["c"] * T  # under its share: everything
    assert admitted["a"] <= shares["a"] * (T + BURST)


def test_an_instance_joining_and_leaving_stays_within_one_resize() -> None:
    """a and b, saturated (200/s each); c joins at 20 s and leaves at 40 s, each agent
    resizing when its catalog changes. The mesh admits at most R·(t + burst) plus
    one resize's worth: the joiner's own full bucket, share × burst = 30."""
    spec = RateLimitSpec("api", R, BURST, ())
    two = {"a": 1.0, "b": 1.0}
    three = {**two, "c": 1.0}
    a = MeshRateLimit(spec, instance="a", own_weight=1.0, live_weights=two)
    b = MeshRateLimit(spec, instance="b", own_weight=1.0, live_weights=two)
    c: MeshRateLimit | None = None
    events: list[tuple[float, str]] = [(t, "a") for t in offered(200)]
    events += [(t, "b") for t in offered(200)]
    events += [(t, "c") for t in offered(200, 20.0, 40.0)]
    events += [(20.0, "join"), (40.0, "leave")]
    order = {"join": 0, "leave": 0, "a": 1, "b": 1, "c": 1}
    events.sort(key=lambda e: (e[0], order[e[1]]))
    admitted = 0
    for t, what in events:
        if what == "join":
            c = MeshRateLimit(spec, instance="c", own_weight=1.0, live_weights=three)
            a.resize(1.0, three, now=t)
            b.resize(1.0, three, now=t)
        elif what == "leave":
            c = None
            a.resize(1.0, two, now=t)
            b.resize(1.0, two, now=t)
        elif what == "c":
            if c is not None:
                admitted += c.admit(t, None).ok
        else:
            admitted += (a if what == "a" else b).admit(t, None).ok
    one_resize = R / 3 * BURST
    assert admitted <= R * (T + BURST) + one_resize
    assert admitted >= R * T - 3  # saturated: the mesh admits its R


# --- the bound, for any sequence -------------------------------------------------------------

SOURCES = [None, "web", "batch", "other"]


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.5, 1000), burst=st.floats(0.0, 10.0),
       batch=st.floats(0.1, 100), peers=st.integers(0, 5),
       steps=st.lists(st.tuples(st.floats(0.0, 2.0), st.sampled_from(SOURCES)),
                      min_size=1, max_size=300))
def test_admitted_never_exceeds_capacity_plus_refill(
        rate: float, burst: float, batch: float, peers: int,
        steps: list[tuple[float, str | None]]) -> None:
    live = {"me": 1.0, **{f"p{i}": 1.0 for i in range(peers)}}
    spec = RateLimitSpec("api", rate, burst, (SourceLimit("batch", batch),))
    rl = MeshRateLimit(spec, instance="me", own_weight=1.0, live_weights=live)
    share, capacity = rl.share, rl.capacity
    assert share is not None and capacity is not None
    batch_share = rl.source_share("batch")
    assert batch_share is not None
    batch_capacity = max(batch_share * burst, 1.0)
    now = start = 100.0
    total = from_batch = 0
    for dt, source in steps:
        now += dt
        got = rl.admit(now, source)
        assert got.ok or got.retry_after > 0
        if got.ok:
            total += 1
            from_batch += source == "batch"
        elapsed = now - start
        assert total <= capacity + share * elapsed + 1e-6
        assert from_batch <= batch_capacity + batch_share * elapsed + 1e-6
