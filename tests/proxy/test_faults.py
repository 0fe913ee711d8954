"""Fault injection decisions: rates by source and by header within a binomial tolerance,
rules in order, no match, exact replay from a seed."""

from __future__ import annotations

import math
import random

import pytest

from rumor.policy.documents import FaultAbort, FaultDelay, FaultRule, FaultSpec, HeaderMatch
from rumor.proxy.faults import FaultDecision, FaultTable, decide_fault

N = 10_000


def within_binomial(hits: int, n: int, percent: float, sigmas: float = 4.0) -> bool:
    """|hits − n·p| ≤ 4 standard deviations of Binomial(n, p) (plus one for rounding):
    a correct sampler fails this about once in 16,000 runs; the seeds here are fixed,
    so the tests are deterministic, but the tolerance is what a fresh seed allows."""
    p = percent / 100
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def rule(name: str, *, sources: tuple[str, ...] = (), headers: tuple[HeaderMatch, ...] = (),
         route_rule: str | None = None, delay: FaultDelay | None = None,
         abort: FaultAbort | None = None) -> FaultRule:
    return FaultRule(name, sources, headers, route_rule, delay, abort)


SPEC = FaultSpec("payments", (
    rule("canary-header", headers=(HeaderMatch("x-canary", "exact", "1"),),
         delay=FaultDelay(0.5, 50.0), abort=FaultAbort(503, 20.0)),
    rule("from-web", sources=("web",), delay=FaultDelay(2.0, 10.0)),
    rule("from-batch", sources=("batch",), abort=FaultAbort(None, 30.0)),
    rule("slow-route", route_rule="beta", delay=FaultDelay(1.0, 100.0)),
))


def run(table: FaultTable, n: int, seed: int, **request: object) -> list[FaultDecision | None]:
    rng = random.Random(seed)
    return [table.decide(rng=rng, **request) for _ in range(n)]  # type: ignore[arg-type]


def test_rates_by_source_within_tolerance() -> None:
    table = FaultTable(SPEC)
    web = run(table, N, 1, source="web", headers={}, route_rule=None)
    delayed = [d for d in web if d is not None]
    assert all(d.rule == "from-web" and d.delay == 2.0 and not d.aborts for d in delayed)
    assert within_binomial(len(delayed), N, 10.0)

    batch = run(table, N, 2, source="batch", headers={}, route_rule=None)
    resets = [d for d in batch if d is not None]
    assert all(d.reset and d.abort_status is None and d.delay == 0 for d in resets)
    assert within_binomial(len(resets), N, 30.0)


def test_rates_by_header_are_drawn_independently() -> None:
    """The canary rule: a delay at 50 % and an abort at 20 %, drawn independently, so
    both hit 10 % of the time, and each rate holds whatever the other draw did."""
    table = FaultTable(SPEC)
    got = run(table, N, 3, source="web", headers={"x-canary": "1"}, route_rule=None)
    delays = sum(1 for d in got if d is not None and d.delay == 0.5)
    aborts = sum(1 for d in got if d is not None and d.abort_status == 503)
    both = sum(1 for d in got if d is not None and d.delay and d.abort_status)
    assert within_binomial(delays, N, 50.0)
    assert within_binomial(aborts, N, 20.0)
    assert within_binomial(both, N, 10.0)
    assert all(d is None or (d.rule == "canary-header" and not d.reset) for d in got)
    # Another header value does not match: the caller falls to its source's rule.
    other = run(table, 1_000, 4, source="web", headers={"x-canary": "0"}, route_rule=None)
    assert {d.rule for d in other if d is not None} == {"from-web"}


def test_rules_apply_in_order_and_the_first_match_is_final() -> None:
    table = FaultTable(SPEC)
    # web with the canary header: the header rule comes first, even when its draws miss
    # (a miss is None, not the next rule's chance).
    got = run(table, 2_000, 5, source="web", headers={"x-canary": "1"}, route_rule="beta")
    assert {d.rule for d in got if d is not None} == {"canary-header"}
    assert got.count(None) > 0
    # The beta route's 100 % delay applies to callers no earlier rule names.
    got = run(table, 100, 6, source="mobile", headers={}, route_rule="beta")
    assert got == [FaultDecision("slow-route", 1.0, None, False)] * 100


def test_no_match_is_none() -> None:
    table = FaultTable(SPEC)
    rng = random.Random(7)
    for source in (None, "mobile", "WEB"):
        assert table.decide(source=source, headers={}, route_rule="stable", rng=rng) is None
    # A source restriction never matches an unknown caller.
    assert table.decide(source=None, headers={}, route_rule=None, rng=rng) is None
    assert decide_fault(None, source="web", headers={}, route_rule=None, rng=rng) is None
    empty = FaultSpec("payments", ())
    assert decide_fault(empty, source="web", headers={}, route_rule=None, rng=rng) is None


def test_percent_edges() -> None:
    spec = FaultSpec("s", (rule("never", delay=FaultDelay(1.0, 0.0),
                                abort=FaultAbort(500, 0.0)),))
    assert all(d is None for d in run(FaultTable(spec), 1_000, 8, source=None, headers={},
                                      route_rule=None))
    spec = FaultSpec("s", (rule("always", abort=FaultAbort(418, 100.0)),))
    got = run(FaultTable(spec), 1_000, 9, source=None, headers={}, route_rule=None)
    assert got == [FaultDecision("always", 0.0, 418, False)] * 1_000


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_a_seeded_rng_replays_exactly(seed: int) -> None:
    requests = [("web", {"x-canary": "1"}, None), ("batch", {}, None), ("web", {}, None),
                (None, {}, "beta"), ("mobile", {}, None)]

    def replay() -> list[FaultDecision | None]:
        rng = random.Random(seed)
        table = FaultTable(SPEC)
        return [table.decide(source=s, headers=h, route_rule=r, rng=rng)
                for _ in range(500) for s, h, r in requests]

    assert replay() == replay()
    # decide_fault (compiling each time) decides exactly as the table does.
    rng = random.Random(seed)
    once = [decide_fault(SPEC, source=s, headers=h, route_rule=r, rng=rng)
            for _ in range(500) for s, h, r in requests]
    assert once == replay()


def test_draws_depend_only_on_the_rule_that_applied() -> None:
    """Unmatched requests take no draw; a matched rule takes one per fault it has."""
    table = FaultTable(SPEC)
    rng, ref = random.Random(10), random.Random(10)
    table.decide(source="mobile", headers={}, route_rule=None, rng=rng)  # no rule: 0
    assert rng.random() == ref.random()
    table.decide(source="web", headers={"x-canary": "1"}, route_rule=None, rng=rng)  # 2
    ref.random(), ref.random()
    assert rng.random() == ref.random()


def test_header_names_are_the_consulted_ones() -> None:
    assert FaultTable(SPEC).header_names == frozenset({b"x-canary"})
    spec = FaultSpec("s", (rule("a", headers=(HeaderMatch("x-a", "present"),
                                              HeaderMatch("x-b", "prefix", "v")),
                                abort=FaultAbort(500, 1.0)),
                           rule("b", sources=("web",), abort=FaultAbort(500, 1.0))))
    assert FaultTable(spec).header_names == frozenset({b"x-a", b"x-b"})
    assert FaultTable(FaultSpec("s", ())).header_names == frozenset()
