"""Retry budget, circuit breaker, outlier ejection and backoff, against expectations
computed by hand from the policy settings."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from rumor.policy.documents import CircuitBreaker as BreakerSpec
from rumor.policy.documents import OutlierEjection, ResilienceSpec, RetryBudget, RetryPolicy
from rumor.proxy.resilience import CircuitBreaker, OutlierDetector, RetryBudgetTracker, backoff

# --- retry budget ------------------------------------------------------------------------

BUDGET = RetryBudget(ratio=0.2, min_per_second=10, window=10.0)


def test_full_outage_retries_stay_within_ratio_plus_floor() -> None:
    """1,000 req/s, every try fails, and each request would retry twice. The budget
    allows 0.2 × 10,000 + 10 × 10 = 2,100 retries per 10 s window, so 210/s on
    average, not the 2,000/s the attempts alone would allow."""
    tracker = RetryBudgetTracker(BUDGET)
    requests: Counter[int] = Counter()
    retries: Counter[int] = Counter()
    refused = 0
    for n in range(60_000):
        now = n / 1000
        tracker.record_request(now)
        requests[int(now)] += 1
        for _ in range(2):
            if not tracker.try_retry(now):
                refused += 1
                break
            retries[int(now)] += 1
    # The first second: the 100-retry floor plus 0.2 of the requests seen so far.
    assert retries[0] == pytest.approx(300, abs=1)
    # Every window the tracker can see (ten 1-second slices) stays within the budget.
    for end in range(60):
        window = range(max(0, end - 9), end + 1)
        allowed = 0.2 * sum(requests[s] for s in window) + 100
        assert sum(retries[s] for s in window) <= allowed
    # Steady state: exactly 2,100 per 10 s.
    assert sum(retries[s] for s in range(10, 60)) == 5 * 2100
    assert tracker.retries == sum(retries.values())
    assert tracker.requests == 60_000
    assert tracker.exhausted == refused
    # Each request stopped at its first refusal, or after two retries.
    assert refused + sum(retries.values()) // 2 >= 60_000 - 1


def test_quiet_service_can_still_retry_through_the_floor() -> None:
    tracker = RetryBudgetTracker(RetryBudget(ratio=0.2, min_per_second=1, window=10.0))
    tracker.record_request(0.0)
    # 0.2 × 1 + 1 × 10 = 10.2: ten retries, not eleven.
    assert [tracker.try_retry(0.0) for _ in range(11)] == [True] * 10 + [False]
    assert tracker.exhausted == 1
    assert tracker.available(0.0) == 0


def test_no_floor_and_no_requests_means_no_retries() -> None:
    tracker = RetryBudgetTracker(RetryBudget(ratio=0.5, min_per_second=0, window=1.0))
    assert not tracker.try_retry(0.0)
    tracker.record_request(0.0)
    tracker.record_request(0.0)
    assert tracker.try_retry(0.0)  # 0.5 × 2 = 1
    assert not tracker.try_retry(0.0)


def test_budget_comes_back_as_the_window_slides() -> None:
    tracker = RetryBudgetTracker(RetryBudget(ratio=0.0, min_per_second=1, window=10.0))
    for _ in range(10):
        assert tracker.try_retry(0.5)  # the whole floor, in the first 1 s slice
    assert not tracker.try_retry(9.9)  # still inside the window
    assert tracker.available(9.9) == 0
    assert tracker.available(10.0) == 10  # the slice holding t=0.5 has left
    assert tracker.try_retry(10.0)
    # A gap longer than the window clears everything at once.
    assert tracker.available(1000.0) == 10


def test_requests_age_out_of_the_window() -> None:
    tracker = RetryBudgetTracker(RetryBudget(ratio=0.5, min_per_second=0, window=1.0))
    for _ in range(10):
        tracker.record_request(0.0)
    assert tracker.allowance(0.05) == pytest.approx(5.0)
    assert tracker.allowance(0.95) == pytest.approx(5.0)
    assert tracker.allowance(1.0) == 0.0


# --- circuit breaker ---------------------------------------------------------------------


def test_breaker_limits_requests_in_flight() -> None:
    b = CircuitBreaker(BreakerSpec(max_requests=2, max_pending=1))
    assert b.try_acquire() and b.try_acquire()
    assert b.open
    assert not b.try_acquire()
    assert b.rejected == 1
    b.release()
    assert not b.open
    assert b.try_acquire()
    b.release()
    b.release()
    b.release()  # one too many: ignored
    assert b.in_flight == 0
    assert b.try_acquire() and b.try_acquire() and not b.try_acquire()
    assert b.to_json() == {"in_flight": 2, "pending": 0, "rejected": 2, "pending_rejected": 0}


def test_breaker_limits_pending() -> None:
    b = CircuitBreaker(BreakerSpec(max_requests=10, max_pending=1))
    assert b.try_enqueue()
    assert not b.try_enqueue()
    b.dequeue()
    assert b.try_enqueue()
    assert b.pending_rejected == 1
    none = CircuitBreaker(BreakerSpec(max_requests=10, max_pending=0))
    assert not none.try_enqueue()  # no request may wait


def test_new_breaker_inherits_counts() -> None:
    old = CircuitBreaker(BreakerSpec(max_requests=3, max_pending=0))
    for _ in range(4):
        old.try_acquire()
    new = CircuitBreaker(BreakerSpec(max_requests=2, max_pending=0))
    new.inherit(old)
    assert (new.in_flight, new.rejected) == (3, 1)
    assert not new.try_acquire()  # 3 in flight under a new limit of 2
    new.release()
    new.release()
    assert new.try_acquire()


# --- outlier ejection --------------------------------------------------------------------

EJECT = OutlierEjection(enabled=True, consecutive_failures=3, base_ejection_time=10.0,
                        max_ejection_time=40.0, max_ejected_percent=50)


def fail(d: OutlierDetector, now: float, key: str, times: int, total: int = 4) -> list[bool]:
    return [d.record(now, key, False, total=total) for _ in range(times)]


def test_ejects_after_consecutive_failures_and_readmits() -> None:
    d = OutlierDetector(EJECT)
    assert fail(d, 0.0, "a", 2) == [False, False]
    assert not d.record(0.0, "a", True, total=4)  # a success resets the count
    assert fail(d, 1.0, "a", 3) == [False, False, True]
    assert d.is_ejected(1.0, "a") and d.is_ejected(10.9, "a")
    assert d.ejected(5.0) == {"a"}
    assert d.ejected_until("a") == 11.0
    assert d.next_deadline() == 11.0
    assert d.readmit(10.0) == []
    assert not d.is_ejected(11.0, "a")  # back at the deadline, without any call
    assert d.readmit(12.0) == [("a", 11.0)]
    assert d.readmit(13.0) == []
    assert (d.ejections, d.readmissions) == (1, 1)
    assert d.next_deadline() is None
    assert d.ejected_until("never") == 0.0


def test_results_while_ejected_are_ignored() -> None:
    d = OutlierDetector(EJECT)
    assert fail(d, 0.0, "a", 3)[-1]
    # Tries sent before the ejection come back failed: no extension, no new count.
    assert fail(d, 5.0, "a", 5) == [False] * 5
    assert d.ejected_until("a") == 10.0
    # After readmission it needs three fresh failures.
    assert fail(d, 10.0, "a", 3) == [False, False, True]


def test_ejection_time_grows_then_resets_after_a_healthy_stretch() -> None:
    d = OutlierDetector(EJECT)
    now = 0.0
    lengths = []
    for _ in range(5):
        assert fail(d, now, "a", 3)[-1]
        lengths.append(d.ejected_until("a") - now)
        now = d.ejected_until("a") + 1.0  # fails again soon after coming back
    assert lengths == [10.0, 20.0, 30.0, 40.0, 40.0]  # base × n, capped at max
    assert d.times_ejected("a") == 5
    # In for max_ejection_time (40 s) since its last return: counted afresh.
    back = d.ejected_until("a")
    assert fail(d, back + 40.0, "a", 3)[-1]
    assert d.ejected_until("a") == back + 40.0 + 10.0
    assert d.times_ejected("a") == 1


def test_at_most_max_ejected_percent_out_at_once() -> None:
    d = OutlierDetector(EJECT)
    # 4 instances at 50%: at most 2 out.
    assert fail(d, 0.0, "a", 3)[-1]
    assert fail(d, 1.0, "b", 3)[-1]
    assert fail(d, 1.0, "c", 3) == [False, False, False]
    assert d.capped == 1
    assert d.ejected(1.0) == {"a", "b"}
    assert not d.record(5.0, "c", False, total=4)  # still no room
    assert d.capped == 2
    # Once "a" is back, the next failure of "c" ejects it: its count was kept.
    assert d.record(10.0, "c", False, total=4)
    assert d.ejected(10.0) == {"b", "c"}
    assert d.readmit(10.0) == [("a", 10.0)]


def test_small_services_and_disabled_ejection() -> None:
    d = OutlierDetector(EJECT)
    assert fail(d, 0.0, "solo", 10, total=1) == [False] * 10  # never the only one
    assert fail(d, 0.0, "x", 3, total=2)[-1]  # 50% of 2: one may go
    assert fail(d, 0.0, "y", 3, total=2) == [False] * 3
    off = OutlierDetector(ResilienceSpec.default("web").outlier_ejection)
    if not off.spec.enabled:
        assert fail(off, 0.0, "a", 100) == [False] * 100
    disabled = OutlierDetector(OutlierEjection(False, 1, 1.0, 1.0, 100))
    assert fail(disabled, 0.0, "a", 10) == [False] * 10
    assert disabled.ejected(0.0) == set()


def test_readmission_reported_even_when_ejected_again() -> None:
    d = OutlierDetector(EJECT)
    assert fail(d, 0.0, "a", 3)[-1]
    assert fail(d, 12.0, "a", 3)[-1]  # came back at 10, out again at 12
    assert d.readmit(13.0) == [("a", 10.0)]
    assert d.is_ejected(13.0, "a")
    assert (d.ejections, d.readmissions) == (2, 1)


def test_forget_except_frees_state_and_room_under_the_cap() -> None:
    d = OutlierDetector(EJECT)
    assert fail(d, 0.0, "a", 3, total=2)[-1]
    assert fail(d, 0.0, "b", 3, total=2) == [False] * 3  # cap: 1 of 2
    d.forget_except({"b", "c"})  # "a" left the catalog
    assert not d.is_ejected(0.0, "a")
    assert d.ejected_until("a") == 0.0
    assert d.record(0.0, "b", False, total=2)
    assert d.to_json(0.0) == {"ejected": {"b": 10.0}, "ejections": 2, "readmissions": 0,
                              "capped": 1}


# --- backoff -----------------------------------------------------------------------------

POLICY = RetryPolicy(attempts=4, on=("502",), non_idempotent=False, backoff=0.025,
                     max_backoff=0.25, budget=BUDGET)


def test_backoff_is_full_jitter_under_the_ceiling() -> None:
    rng = random.Random(42)
    for retry, ceiling in ((1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (40, 0.25)):
        assert POLICY.backoff_ceiling(retry) == ceiling
        waits = [backoff(rng, POLICY, retry) for _ in range(2000)]
        assert all(0.0 <= w < ceiling for w in waits)
        # Uniform: mean ceiling/2, and both halves of the range used.
        assert sum(waits) / len(waits) == pytest.approx(ceiling / 2, rel=0.05)
        assert min(waits) < ceiling * 0.05 and max(waits) > ceiling * 0.95


def test_backoff_is_reproducible_from_the_rng() -> None:
    a = [backoff(random.Random(7), POLICY, r) for r in range(1, 6)]
    b = [backoff(random.Random(7), POLICY, r) for r in range(1, 6)]
    assert a == b
