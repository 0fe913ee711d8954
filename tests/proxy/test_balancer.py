"""The balancer: the peak-EWMA arithmetic by hand, then whole-traffic behaviour in a
discrete-event simulation at 1,000 requests per second. The simulation is an open
loop: a request arrives every millisecond whatever happens, each completes at
arrival + its latency, and the balancer's start/finish calls are made in time order,
so its outstanding counts are the true ones."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import pytest

from rumor.policy.documents import SlowStart
from rumor.proxy.attempts import Endpoint
from rumor.proxy.balancer import DEFAULT_DECAY, FAILURE_PENALTY, MIN_ESTIMATE, PeakEwma
from rumor.proxy.balancers import PeakEwmaBalancer


class Balancer(PeakEwmaBalancer):
    """The production peak_ewma balancer (slow start off), picking among keys: these
    tests name endpoints by key only."""

    def __init__(self, rng: random.Random, decay: float = DEFAULT_DECAY) -> None:
        super().__init__(rng, decay, SlowStart(0.0))
        self._endpoints: dict[str, Endpoint] = {}

    def pick(self, now: float, keys: Sequence[str], hash_key: bytes | None = None,  # type: ignore[override]
             exclude: Collection[str] = ()) -> str | None:
        eps = [self._endpoints.setdefault(k, Endpoint(k, k, k, "", (), "h", 1, None))
               for k in keys]
        e = super().pick(now, eps, hash_key, exclude)
        return e.key if e is not None else None

    def __len__(self) -> int:
        return len(self._ewmas)

FAST = 0.0003
PROBE_RTT = 0.0005

# --- PeakEwma ----------------------------------------------------------------------------


def test_unknown_then_seed_then_first_observation_replaces_seed() -> None:
    e = PeakEwma(decay=10.0)
    assert e.estimate(0.0) is None
    assert e.cost(0.0, unknown=2.0) == 2.0
    e = PeakEwma(decay=10.0, initial=0.004)
    assert e.estimate(100.0) == 0.004  # a seed does not decay
    e.observe(1.0, 0.001)  # lower than the seed, but it replaces it
    assert e.estimate(1.0) == 0.001
    assert e.observed


def test_peak_jumps_up_and_ewma_comes_down() -> None:
    e = PeakEwma(decay=10.0)
    e.observe(0.0, 0.010)
    e.observe(1.0, 0.050)  # above the estimate: taken at once
    assert e.estimate(1.0) == 0.050
    e.observe(3.0, 0.010)  # below: w = exp(-2/10)
    w = math.exp(-0.2)
    assert e.estimate(3.0) == pytest.approx(0.050 * w + 0.010 * (1 - w))
    assert e.estimate(3.0) == pytest.approx(0.042749, abs=1e-6)


def test_reading_decays_toward_zero_without_changing_state() -> None:
    e = PeakEwma(decay=10.0)
    e.observe(0.0, 0.050)
    assert e.estimate(10.0) == pytest.approx(0.050 / math.e)
    assert e.estimate(20.0) == pytest.approx(0.050 / math.e**2)
    assert e.estimate(10.0) == pytest.approx(0.050 / math.e)  # reads stored nothing
    assert (e.value, e.stamp) == (0.050, 0.0)
    # Decayed below a new observation: the observation is a peak again.
    e.observe(20.0, 0.010)
    assert e.estimate(20.0) == 0.010


def test_cost_is_estimate_times_outstanding_plus_one() -> None:
    e = PeakEwma(decay=10.0, initial=0.002)
    assert e.cost(0.0) == 0.002
    e.start()
    e.start()
    assert e.cost(0.0) == pytest.approx(0.006)
    e.finish(1.0, 0.001)
    assert e.outstanding == 1
    assert e.cost(1.0) == pytest.approx(0.002)
    e.finish(1.0, 0.001)
    e.finish(1.0, 0.001)  # an extra finish doesn't go negative
    assert e.outstanding == 0
    z = PeakEwma(decay=10.0, initial=0.0)
    z.start()
    assert z.cost(0.0) == 2 * MIN_ESTIMATE  # an estimate of 0 still counts requests


def test_failure_counts_as_penalty_latency() -> None:
    e = PeakEwma(decay=10.0)
    e.start()
    e.finish(0.0, 0.0001, ok=False)  # a fast 503
    assert e.estimate(0.0) == FAILURE_PENALTY
    e.start()
    e.finish(0.0, 5.0, ok=False)  # a timeout: slower than the penalty
    assert e.estimate(0.0) == 5.0


def test_bad_decay_rejected() -> None:
    with pytest.raises(ValueError):
        PeakEwma(decay=0.0)
    with pytest.raises(ValueError):
        Balancer(random.Random(1), decay=-1.0)


# --- Balancer, small cases ---------------------------------------------------------------


def test_zero_one_and_two_distinct_candidates() -> None:
    lb = Balancer(random.Random(1))
    assert lb.pick(0.0, []) is None
    assert lb.pick(0.0, ["only"]) == "only"
    lb.seed("a", 0.001)
    lb.seed("b", 0.002)
    # Two candidates are both sampled every time: the cheaper one always wins.
    assert {lb.pick(0.0, ["a", "b"]) for _ in range(100)} == {"a"}
    assert len(lb) == 2  # picking created no state


def test_cold_start_prefers_lower_probe_rtt_until_it_is_loaded() -> None:
    lb = Balancer(random.Random(7))
    lb.seed("near", 0.001)
    lb.seed("far", 0.010)
    picks = []
    for _ in range(12):
        k = lb.pick(0.0, ["near", "far"])
        assert k is not None
        lb.start(k, 0.0)
        picks.append(k)
    # near costs 0.001 × (n + 1): it wins until 10 requests are in flight on it
    # (0.011 > 0.010); at exactly 0.010 the tie goes either way.
    assert picks[:9] == ["near"] * 9
    assert "far" in picks[9:]


def test_seed_ignored_after_an_observation() -> None:
    lb = Balancer(random.Random(1))
    lb.seed("a", 0.001)
    lb.start("a", 0.0)
    lb.finish("a", 0.0, 0.020, True)
    lb.seed("a", 0.001)
    assert lb.snapshot(0.0)["a"]["estimate_ms"] == pytest.approx(20.0)


def test_unknown_endpoint_is_as_fast_as_its_rival_until_it_has_a_request() -> None:
    lb = Balancer(random.Random(3))
    lb.seed("known", 0.001)
    # Idle against idle: a tie, broken at random, so the new one does get traffic.
    assert Counter(lb.pick(0.0, ["known", "new"]) for _ in range(400))["new"] > 150
    lb.start("new", 0.0)
    # One request in flight and nothing learnt yet: the known one wins.
    assert {lb.pick(0.0, ["known", "new"]) for _ in range(100)} == {"known"}
    # Two unknowns: the outstanding counts decide.
    assert {lb.pick(0.0, ["new", "other"]) for _ in range(100)} == {"other"}


def test_unmeasured_endpoint_with_a_higher_seed_is_not_starved() -> None:
    # The seed (probe RTT) is above what "fast" answers in: were the seed taken at
    # face value, "new" would never get a request while "fast" is idle.
    lb = Balancer(random.Random(11))
    lb.seed("fast", 0.0005)
    lb.start("fast", 0.0)
    lb.finish("fast", 0.0003, 0.0003, True)
    lb.seed("new", 0.0005)
    assert "new" in {lb.pick(1.0, ["fast", "new"]) for _ in range(50)}
    # A seed below the rival's measurement does count: it wins outright.
    lb.seed("near", 0.0001)
    assert {lb.pick(1.0, ["fast", "near"]) for _ in range(50)} == {"near"}
    # Once measured, the measurement decides.
    lb.start("new", 1.0)
    lb.finish("new", 1.01, 0.010, True)
    assert {lb.pick(1.01, ["fast", "new"]) for _ in range(50)} == {"fast"}


def test_fast_failures_do_not_attract_traffic() -> None:
    lb = Balancer(random.Random(5))
    for k in ("good", "bad"):
        lb.start(k, 0.0)
    lb.finish("good", 0.001, 0.001, True)
    lb.finish("bad", 0.0001, 0.0001, False)
    assert {lb.pick(1.0, ["good", "bad"]) for _ in range(100)} == {"good"}


def test_forget_except_keeps_endpoints_in_flight() -> None:
    lb = Balancer(random.Random(1))
    for k in ("a", "b", "c"):
        lb.seed(k, 0.001)
    lb.start("b", 0.0)
    lb.forget_except({"a"})
    assert "a" in lb and "b" in lb and "c" not in lb
    lb.finish("b", 0.1, 0.1, True)
    lb.forget_except(["a"])
    assert "b" not in lb
    lb.forget(["a"])
    assert len(lb) == 0


def test_snapshot() -> None:
    lb = Balancer(random.Random(1))
    lb.seed("a", 0.002)
    lb.start("a", 0.0)
    lb.start("b", 0.0)
    snap = lb.snapshot(0.0)
    assert snap["a"] == {"estimate_ms": pytest.approx(2.0), "outstanding": 1,
                         "cost": pytest.approx(4.0), "observed": False, "slow_start": 1.0}
    assert snap["b"] == {"estimate_ms": None, "outstanding": 1, "cost": None,
                         "observed": False, "slow_start": 1.0}
    lb.finish("a", 10.0, 0.004, True)
    assert lb.snapshot(20.0)["a"]["estimate_ms"] == pytest.approx(4.0 / math.e)
    assert lb.snapshot(20.0)["a"]["observed"] is True


# --- Balancer, simulated traffic ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Served:
    at: float
    key: str
    latency: float


Latency = Callable[[str, float, random.Random], float]


def simulate(latency: Latency, keys: Sequence[str], *, seconds: float = 60.0,
             rate: int = 1000, seed: int = 1, decay: float = 10.0,
             fails: Callable[[str, float], bool] | None = None) -> list[Served]:
    """Open-loop arrivals every 1/rate s. Each request is picked among ``keys`` (all
    seeded with the same probe RTT), started, and finished at arrival + latency:
    every completion due by an arrival is processed before that arrival's pick."""
    rng = random.Random(seed)
    lb = Balancer(random.Random(seed + 1), decay=decay)
    for k in keys:
        lb.seed(k, PROBE_RTT)
    done: list[tuple[float, int, str, float, bool]] = []
    log: list[Served] = []
    for n in range(int(seconds * rate)):
        now = n / rate
        while done and done[0][0] <= now:
            t, _, k, lat, ok = heapq.heappop(done)
            lb.finish(k, t, lat, ok)
        key = lb.pick(now, keys)
        assert key is not None
        lat = latency(key, now, rng)
        lb.start(key, now)
        ok = fails is None or not fails(key, now)
        heapq.heappush(done, (now + lat, n, key, lat, ok))
        log.append(Served(now, key, lat))
    return log


def share(log: Sequence[Served], key: str, since: float = 0.0) -> float:
    window = [s for s in log if s.at >= since]
    return sum(1 for s in window if s.key == key) / len(window)


def test_scenario_a_one_instance_50ms_slower_is_avoided() -> None:
    log = simulate(lambda k, now, rng: FAST + 0.050 if k == "slow" else FAST,
                   ["a", "b", "slow"])
    after_warmup = share(log, "slow", since=5.0)
    assert after_warmup < 0.001
    # Not starved forever either: the decay sends it a probe now and then.
    assert share(log, "slow") > 0


def test_scenario_b_one_instance_with_10_percent_slow_requests() -> None:
    def latency(k: str, now: float, rng: random.Random) -> float:
        return FAST + 0.200 if k == "flaky" and rng.random() < 0.1 else FAST

    log = simulate(latency, ["a", "b", "flaky"])
    slowed = sum(1 for s in log if s.latency > 0.1)
    assert slowed / len(log) < 0.001
    assert slowed >= 1  # the scenario did exercise the slow path


def test_equal_instances_share_evenly() -> None:
    keys = ["a", "b", "c", "d"]
    log = simulate(lambda k, now, rng: rng.expovariate(1 / 0.005), keys, seconds=20.0)
    counts = Counter(s.key for s in log)
    for k in keys:
        assert counts[k] / len(log) == pytest.approx(0.25, abs=0.04)


def test_fast_failing_instance_is_avoided() -> None:
    log = simulate(lambda k, now, rng: 0.0001 if k == "broken" else 0.001,
                   ["a", "b", "broken"], seconds=20.0,
                   fails=lambda k, now: k == "broken")
    assert share(log, "broken", since=1.0) < 0.001


def test_recovered_instance_gets_traffic_back_within_bounded_time() -> None:
    # Slow (50 ms) for the first 10 s, then as fast as the others. Its last slow
    # observation decays below the fast ones' cost after decay × ln(50.3 / 0.3) s
    # (~51 s at decay 10 s, ~15 s at decay 3 s), and then it gets its share back.
    for decay, seconds in ((10.0, 70.0), (3.0, 30.0)):
        log = simulate(lambda k, now, rng: FAST + 0.050 if k == "c" and now < 10.0 else FAST,
                       ["a", "b", "c"], decay=decay, seconds=seconds)
        per_second: Counter[int] = Counter(int(s.at) for s in log if s.key == "c")
        back = min(t for t in range(10, int(seconds)) if per_second[t] >= 250)
        bound = decay * math.log((FAST + 0.050) / FAST) + 3.0
        assert back <= bound, (decay, back, bound)
        # ...and keeps it: about a third of the traffic from then on.
        assert share(log, "c", since=back + 1) == pytest.approx(1 / 3, abs=0.05)
