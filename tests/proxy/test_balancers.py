"""The per-service balancers (proxy/balancers.py): shares under weights, drain, exclude,
consistent hashing and slow start (peak_ewma's own rules: tests/proxy/test_balancer.py).

Traffic tests are an open-loop discrete-event simulation as in test_balancer.py: a
request arrives every 1/rate s, completions due by an arrival are processed before its
pick, so outstanding counts are the true ones. Everything is seeded and ``now`` is
explicit."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.policy.documents import BALANCERS, BalancerSpec, HashOn, SlowStart
from rumor.proxy.balancers import (
    HashBalancer,
    LeastRequestBalancer,
    LoadBalancer,
    PeakEwmaBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    maglev_table,
    make_balancer,
    table_size_for,
)

OFF = SlowStart(0.0)


@dataclass(frozen=True, slots=True)
class Ep:
    key: str
    weight: int = 1


def eps(**weights: int) -> list[Ep]:
    return [Ep(k, w) for k, w in weights.items()]


def build(algorithm: str, seed: int = 1, slow_start: SlowStart = OFF) -> LoadBalancer:
    hash_on = HashOn(header="x-user") if algorithm == "hash" else None
    return make_balancer(BalancerSpec(algorithm, hash_on, slow_start), random.Random(seed),
                         10.0)


Latency = Callable[[str, float, random.Random], float]


def simulate(lb: LoadBalancer, candidates: Callable[[float], Sequence[Ep]],
             latency: Latency, *, seconds: float, rate: int = 1000,
             seed: int = 2) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    done: list[tuple[float, int, str, float]] = []
    log: list[tuple[float, str]] = []
    for n in range(int(seconds * rate)):
        now = n / rate
        while done and done[0][0] <= now:
            t, _, k, lat = heapq.heappop(done)
            lb.finish(k, t, lat, True)
        ep = lb.pick(now, candidates(now))
        assert ep is not None
        lat = latency(ep.key, now, rng)
        lb.start(ep.key, now)
        heapq.heappush(done, (now + lat, n, ep.key, lat))
        log.append((now, ep.key))
    return log


def share(log: Sequence[tuple[float, str]], key: str, start: float = 0.0,
          end: float = float("inf")) -> float:
    window = [k for t, k in log if start <= t < end]
    return window.count(key) / len(window)


# --- the interface ------------------------------------------------------------------------


def test_make_balancer_builds_each_algorithm() -> None:
    kinds = {a: type(build(a)) for a in BALANCERS}
    assert kinds == {"peak_ewma": PeakEwmaBalancer, "least_request": LeastRequestBalancer,
                     "round_robin": RoundRobinBalancer, "random": RandomBalancer,
                     "hash": HashBalancer}
    assert all(build(a).algorithm == a for a in BALANCERS)
    with pytest.raises(ValueError):
        make_balancer(BalancerSpec("fastest"), random.Random(1), 10.0)
    with pytest.raises(ValueError):
        build("random", slow_start=SlowStart(10.0, aggression=0.0))


@pytest.mark.parametrize("algorithm", BALANCERS)
def test_empty_single_and_all_draining(algorithm: str) -> None:
    lb = build(algorithm)
    assert lb.pick(0.0, [], b"k") is None
    assert lb.pick(0.0, [Ep("a", 0), Ep("b", 0)], b"k") is None
    only = Ep("a", 2)
    assert lb.pick(0.0, [only], b"k") is only
    assert lb.pick(0.0, [only], b"k", exclude={"a"}) is only  # all excluded: all allowed


@pytest.mark.parametrize("algorithm", BALANCERS)
def test_draining_endpoint_gets_nothing_new_and_its_requests_finish(algorithm: str) -> None:
    lb = build(algorithm)
    a, _b, c = Ep("a"), Ep("b"), Ep("c")
    lb.start("b", 0.0)  # in flight before b started draining
    drained = [a, Ep("b", 0), c]
    keys = Counter()
    for n in range(2000):
        ep = lb.pick(n / 1000, drained, str(n).encode())
        assert ep is not None
        keys[ep.key] += 1
        # Even when every other candidate was already tried, never the drained one.
        assert lb.pick(n / 1000, drained, str(n).encode(), exclude={"a", "c"}) is not None
        assert lb.pick(n / 1000, drained, None, exclude={"a", "c"}) != Ep("b", 0)
    assert keys["b"] == 0 and keys["a"] > 500 and keys["c"] > 500
    lb.finish("b", 2.0, 0.01, True)
    assert lb.snapshot(2.0)["b"]["outstanding"] == 0
    lb.forget_except({"a", "c"})
    assert "b" not in lb.snapshot(2.0)


@pytest.mark.parametrize("algorithm", BALANCERS)
def test_exclude_is_avoided_while_others_are_left(algorithm: str) -> None:
    lb = build(algorithm)
    cands = eps(a=1, b=5, c=1)
    for n in range(500):
        ep = lb.pick(n / 100, cands, str(n).encode(), exclude={"b"})
        assert ep is not None and ep.key != "b"
        ep = lb.pick(n / 100, cands, str(n).encode(), exclude={"a", "b"})
        assert ep is not None and ep.key == "c"


@pytest.mark.parametrize("algorithm", BALANCERS)
def test_forget_and_forget_except_keep_in_flight(algorithm: str) -> None:
    lb = build(algorithm, slow_start=SlowStart(10.0))
    cands = eps(a=1, b=1, c=1)
    lb.pick(0.0, cands, b"x")
    lb.start("b", 0.0)
    lb.start("c", 0.0)
    lb.pick(0.0, eps(d=1, e=1), b"y")
    lb.forget_except({"a"})
    assert set(lb.snapshot(0.0)) == {"a", "b", "c"}  # d and e are gone, b and c in flight
    lb.forget(["c"])
    assert set(lb.snapshot(0.0)) == {"a", "b"}
    lb.finish("b", 1.0, 0.01)
    lb.forget_except(())
    assert lb.snapshot(1.0) == {}


# --- shares under weights -----------------------------------------------------------------


def test_round_robin_is_exactly_weighted_and_smooth() -> None:
    lb = build("round_robin")
    cands = eps(a=3, b=1, c=1)
    picks = [lb.pick(0.0, cands) for _ in range(10_000)]
    counts = Counter(p.key for p in picks if p is not None)
    assert counts == {"a": 6000, "b": 2000, "c": 2000}
    # Smooth: nginx's sequence, never a burst of three a's.
    assert [p.key for p in picks[:5] if p is not None] == ["a", "b", "a", "c", "a"]


def test_random_is_weighted_within_tolerance() -> None:
    lb = build("random", seed=4)
    cands = eps(a=3, b=1, c=0)
    counts = Counter(getattr(lb.pick(0.0, cands), "key", None) for _ in range(20_000))
    assert counts["c"] == 0
    assert counts["a"] / 20_000 == pytest.approx(0.75, abs=0.015)


@pytest.mark.parametrize("algorithm", ["least_request", "peak_ewma"])
def test_p2c_shares_follow_weights_under_load(algorithm: str) -> None:
    # 1,000 req/s of 40 ms each: about 40 requests in flight, so the outstanding counts
    # can express a 3:1 ratio (they settle where (o + 1) / weight is equal).
    lb = build(algorithm, seed=5)
    cands = eps(a=3, b=1)
    log = simulate(lb, lambda now: cands, lambda k, now, rng: 0.040, seconds=12.0)
    ratio = share(log, "a", 2.0) / share(log, "b", 2.0)
    assert 2.6 < ratio < 3.5, ratio


@pytest.mark.parametrize("algorithm", ["least_request", "peak_ewma"])
def test_p2c_equal_weights_share_evenly(algorithm: str) -> None:
    lb = build(algorithm, seed=6)
    cands = eps(a=1, b=1, c=1, d=1)
    log = simulate(lb, lambda now: cands, lambda k, now, rng: rng.expovariate(1 / 0.005),
                   seconds=12.0)
    # Peak EWMA chases latency peaks, so its shares wander more (test_balancer.py).
    tolerance = 0.05 if algorithm == "peak_ewma" else 0.02
    for k in "abcd":
        assert share(log, k) == pytest.approx(0.25, abs=tolerance)


def test_least_request_prefers_fewer_outstanding() -> None:
    lb = build("least_request")
    cands = eps(a=1, b=1)
    lb.start("a", 0.0)
    assert {getattr(lb.pick(0.0, cands), "key", None) for _ in range(50)} == {"b"}
    lb.start("b", 0.0)
    lb.start("b", 0.0)
    assert {getattr(lb.pick(0.0, cands), "key", None) for _ in range(50)} == {"a"}
    heavy = eps(a=3, b=1)  # 3 / 2 > 1 / 3
    assert {getattr(lb.pick(0.0, heavy), "key", None) for _ in range(50)} == {"a"}


# --- hash ---------------------------------------------------------------------------------


def _owners(lb: LoadBalancer, cands: Sequence[Ep], n: int = 10_000) -> dict[int, str]:
    out = {}
    for i in range(n):
        ep = lb.pick(0.0, cands, f"user-{i}".encode())
        assert ep is not None
        out[i] = ep.key
    return out


def test_maglev_table_fills_by_weight() -> None:
    assert table_size_for(3) == 5003
    # Tiers: the size (and so every key's slot) stays as one endpoint comes or goes.
    assert table_size_for(50) == 5003 and table_size_for(51) == 50021
    assert table_size_for(60) == table_size_for(59) == 50021
    assert table_size_for(1000) == 500009
    assert table_size_for(6000) == 600011  # past the tiers: the next prime >= 100 x
    t = maglev_table(["a", "b", "c"], [1, 1, 2], 65537)
    counts = Counter(t)
    assert -1 not in counts
    assert counts[2] / 65537 == pytest.approx(0.5, abs=0.001)
    assert counts[0] / 65537 == pytest.approx(0.25, abs=0.001)


def test_hash_same_key_same_instance_and_weights_respected() -> None:
    lb = build("hash")
    cands = eps(a=1, b=1, c=2)
    first = _owners(lb, cands)
    # Another balancer (another sidecar) with the candidates in another order agrees.
    other = build("hash", seed=99)
    assert _owners(other, list(reversed(cands))) == first
    assert _owners(lb, cands) == first
    counts = Counter(first.values())
    assert counts["c"] / 10_000 == pytest.approx(0.5, abs=0.03)
    assert isinstance(lb, HashBalancer) and lb.builds == 1  # one table, cached


def test_hash_removing_one_of_ten_moves_about_a_tenth() -> None:
    n = 10
    cands = [Ep(f"node-{i}/web") for i in range(n)]
    before = _owners(build("hash"), cands)
    gone = cands[3].key
    after = _owners(build("hash"), [e for e in cands if e.key != gone])
    moved = sum(1 for i in before if before[i] != after[i])
    assert 0.7 / n < moved / 10_000 < 1.5 / n, moved
    # The keys that move are (almost all) the removed instance's; the others stay.
    stayed = [i for i in before if before[i] != gone]
    assert sum(1 for i in stayed if after[i] != before[i]) / len(stayed) < 0.02
    # And adding it back restores the original mapping.
    assert _owners(build("hash"), cands) == before


@pytest.mark.parametrize("algorithm", ["hash", "random"])
def test_cached_pool_follows_a_new_candidate_list(algorithm: str) -> None:
    # Both cache their table or running sums per candidate list object: a new list
    # (the catalog changed) must be read afresh, never answered from the old one.
    lb = build(algorithm, seed=3)
    first = eps(a=1, b=1, c=1)
    for i in range(200):
        lb.pick(0.0, first, f"k{i}".encode())
    second = eps(b=1, c=0)
    picks = {getattr(lb.pick(0.0, second, f"k{i}".encode()), "key", None) for i in range(200)}
    assert picks == {"b"}


def test_hash_retry_goes_to_the_next_distinct_instance() -> None:
    lb = build("hash")
    cands = [Ep(f"n{i}") for i in range(5)]
    for i in range(500):
        key = f"k{i}".encode()
        p = lb.pick(0.0, cands, key)
        assert p is not None
        r1 = lb.pick(0.0, cands, key, exclude={p.key})
        assert r1 is not None and r1.key != p.key
        assert lb.pick(0.0, cands, key, exclude={p.key}) == r1  # deterministic
        r2 = lb.pick(0.0, cands, key, exclude={p.key, r1.key})
        assert r2 is not None and r2.key not in {p.key, r1.key}


def test_hash_without_key_spreads_by_weight() -> None:
    lb = build("hash", seed=3)
    cands = eps(a=1, b=1, c=2)
    counts = Counter(getattr(lb.pick(0.0, cands, None), "key", None) for _ in range(10_000))
    assert counts["c"] / 10_000 == pytest.approx(0.5, abs=0.03)
    assert counts["a"] / 10_000 == pytest.approx(0.25, abs=0.03)


# --- slow start ---------------------------------------------------------------------------

RAMP = SlowStart(8.0, aggression=1.0, min_percent=10.0)


def _ramp_shares(lb: LoadBalancer, latency: Latency) -> list[float]:
    """c joins at t = 2 (the first picks saw a and b only); its share around a quarter,
    half and all of the window, and after it."""
    ab = eps(a=1, b=1)
    abc = eps(a=1, b=1, c=1)
    log = simulate(lb, lambda now: ab if now < 2.0 else abc, latency, seconds=14.0)
    return [share(log, "c", s, e) for s, e in ((3.5, 4.5), (5.5, 6.5), (9.0, 10.0),
                                                (12.0, 14.0))]


@pytest.mark.parametrize("algorithm", BALANCERS)
def test_slow_start_ramps_up_not_a_step(algorithm: str) -> None:
    lb = build(algorithm, seed=7, slow_start=RAMP)
    if algorithm == "hash":
        ab, abc = eps(a=1, b=1), eps(a=1, b=1, c=1)
        keys = [f"u{i}".encode() for i in range(3000)]
        for k in keys:
            lb.pick(0.0, ab, k)
        shares = []
        for t in (2.0 + 2.0, 2.0 + 4.0, 2.0 + 7.5, 12.0):
            got = Counter(getattr(lb.pick(t, abc, k), "key", "") for k in keys)
            shares.append(got["c"] / len(keys))
    else:
        shares = _ramp_shares(lb, lambda k, now, rng: 0.030)
    quarter, half, full, after = shares
    assert 0.02 < quarter < half < full, shares
    assert after == pytest.approx(1 / 3, abs=0.05)
    assert quarter < 0.6 * after  # it did ramp: not a step at the window's start


def test_slow_start_hash_moves_keys_onto_the_new_instance_monotonically() -> None:
    lb = build("hash", slow_start=RAMP)
    ab, abc = eps(a=1, b=1), eps(a=1, b=1, c=1)
    keys = [f"u{i}".encode() for i in range(3000)]
    for k in keys:
        lb.pick(0.0, ab, k)
    on_c: set[bytes] = set()
    for t in (3.0, 5.0, 8.0, 10.0, 11.0):
        now_c = {k for k in keys if lb.pick(t, abc, k) == Ep("c")}
        assert on_c <= now_c
        on_c = now_c


def test_slow_start_readmitted_ramps_again() -> None:
    lb = build("round_robin", slow_start=RAMP)
    cands = eps(a=1, b=1)
    lb.pick(0.0, cands)
    lb.readmitted("b", 100.0)
    counts = Counter(getattr(lb.pick(100.0 + t / 1000, cands), "key", "") for t in range(1000))
    # Over its first second b's weight is 10-12.5 % of a's.
    assert 0.08 < counts["b"] / 1000 < 0.13
    assert lb.snapshot(109.0)["b"]["slow_start"] == 1.0


def _first_answer_slow(ratio: float, always: bool = False) -> Latency:
    """Every answer takes 4 ms, but c's first (or, ``always``, every one) ``ratio`` × 4."""
    answered: set[str] = set()

    def latency(k: str, now: float, rng: random.Random) -> float:
        if k == "c" and (always or k not in answered):
            answered.add(k)
            return 0.004 * ratio
        return 0.004

    return latency


def test_peak_ewma_without_slow_start_starves_an_instance_whose_first_answer_was_slow() -> None:
    # The problem being fixed: without slow start, c's first 40 ms answer latches.
    lb = build("peak_ewma", seed=8, slow_start=OFF)
    quarter, half, full, _ = _ramp_shares(lb, _first_answer_slow(10.0))
    assert quarter == half == full == 0


def test_peak_ewma_slow_start_lets_a_slow_first_answer_be_outgrown() -> None:
    lb = build("peak_ewma", seed=8, slow_start=RAMP)
    quarter, half, full, after = _ramp_shares(lb, _first_answer_slow(10.0))
    assert 0.005 < quarter < half < full, (quarter, half, full)
    assert half > 0.1
    # After the window: about its third (its mean still holds a trace of the 40 ms).
    assert 0.2 < after < 0.4


def test_peak_ewma_slow_start_still_finds_a_genuinely_slow_instance() -> None:
    lb = build("peak_ewma", seed=8, slow_start=RAMP)
    quarter, half, full, after = _ramp_shares(lb, _first_answer_slow(10.0, always=True))
    # Judged by the median of its answers once it has GRACE_MIN of them: a handful of
    # requests, then next to nothing, in the window and after it.
    assert quarter < 0.01 and half < 0.01 and full < 0.01 and after < 0.01


def _sequential(lb: LoadBalancer, cands: list[Ep], n: int,
                latency: Callable[[str, int], float]) -> Counter[str]:
    """A client sending one request at a time, 1 ms apart; ``latency(key, i)``."""
    got: Counter[str] = Counter()
    for i in range(n):
        now = i * 0.001
        e = lb.pick(now, cands)
        assert e is not None
        lb.start(e.key, now)
        lb.finish(e.key, now + 0.0005, latency(e.key, got[e.key]))
        got[e.key] += 1
    return got


def test_peak_ewma_first_instances_cold_first_answer_is_outvoted() -> None:
    # rumor demo's start: every instance is new at the first pick and c's first answer
    # is cold (10x). Judged by the median of its first three answers, c gets its share;
    # judged by its first answer alone (slow start off) it got 1 of 300.
    cold = lambda k, nth: 0.005 if k == "c" and nth == 0 else 0.0005  # noqa: E731
    on = _sequential(PeakEwmaBalancer(random.Random(3), 10.0, RAMP), eps(a=1, b=1, c=1),
                     300, cold)
    assert on["c"] > 300 * 0.2, on
    off = _sequential(PeakEwmaBalancer(random.Random(3), 10.0, OFF), eps(a=1, b=1, c=1),
                      300, cold)
    assert off["c"] < 300 * 0.05, off


def test_peak_ewma_first_instances_slow_every_time_found_after_three_answers() -> None:
    # The first pick's endpoints get no window of grace (it hides a degraded instance's
    # tail): one that answers 10x slow every time is judged after GRACE_MIN answers.
    got = _sequential(PeakEwmaBalancer(random.Random(3), 10.0, RAMP), eps(a=1, b=1, c=1),
                      3000, lambda k, nth: 0.005 if k == "c" else 0.0005)
    assert got["c"] <= 3, got


def test_peak_ewma_failure_ends_the_grace() -> None:
    lb = PeakEwmaBalancer(random.Random(1), 10.0, RAMP)
    ab, abc = eps(a=1, b=1), eps(a=1, b=1, c=1)
    lb.pick(0.0, ab)
    for k in "ab":
        lb.start(k, 0.0)
        lb.finish(k, 0.0, 0.004)
    lb.pick(1.0, abc)  # c ramps from t = 1
    lb.start("c", 1.0)
    lb.finish("c", 1.01, 0.001, ok=False)
    got = Counter(getattr(lb.pick(8.0, abc), "key", "") for _ in range(1000))
    assert got["c"] == 0  # judged by its 1 s failure penalty, grace or not


# --- property -----------------------------------------------------------------------------

endpoint_sets = st.lists(
    st.builds(Ep, st.sampled_from([f"e{i}" for i in range(8)]), st.integers(0, 5)),
    max_size=8, unique_by=lambda e: e.key)


@settings(max_examples=150, deadline=None)
@given(algorithm=st.sampled_from(BALANCERS), rounds=st.lists(
    st.tuples(endpoint_sets, st.one_of(st.none(), st.binary(max_size=8)),
              st.sets(st.sampled_from([f"e{i}" for i in range(8)])),
              st.booleans()), max_size=12))
def test_pick_returns_a_weighted_candidate_or_none(
        algorithm: str, rounds: list[tuple[list[Ep], bytes | None, set[str], bool]]) -> None:
    lb = build(algorithm, slow_start=SlowStart(5.0))
    now = 0.0
    inflight: list[str] = []
    for cands, key, exclude, finish in rounds:
        now += 0.7
        ep = lb.pick(now, cands, key, exclude)
        pickable = [e for e in cands if e.weight > 0]
        if not pickable:
            assert ep is None
            continue
        assert ep is not None and ep in pickable
        if any(e.key not in exclude for e in pickable):
            assert ep.key not in exclude
        lb.start(ep.key, now)
        inflight.append(ep.key)
        if finish:
            lb.finish(inflight.pop(0), now, 0.01, key is not None)
