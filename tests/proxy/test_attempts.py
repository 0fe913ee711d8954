"""The attempt core on a virtual clock: where each try goes, what is retried and after
how long, when a request gives up and with which status."""

from __future__ import annotations

import dataclasses
import random

import pytest

from rumor.policy.documents import (
    BAD_GATEWAY,
    CONNECT_FAILURE,
    GATEWAY_TIMEOUT,
    CircuitBreaker,
    ResilienceSpec,
    RetryBudget,
)
from rumor.proxy.attempts import (
    Answer,
    Attempts,
    BreakerRejected,
    BudgetExhausted,
    Deliver,
    Ejected,
    Endpoint,
    Readmitted,
    Retrying,
    Send,
    ServiceState,
    Wait,
)
from rumor.proxy.balancers import PeakEwmaBalancer as Balancer

EPS = [Endpoint(f"n{i}/web", f"n{i}", "web", "v1", (), "10.0.0.1", 15002, None)
       for i in range(3)]


def _spec(**retries: object) -> ResilienceSpec:
    d = ResilienceSpec.default("web")
    return dataclasses.replace(d, retries=dataclasses.replace(d.retries, **retries))


def _begin(now: float = 0.0, *, spec: ResilienceSpec | None = None, method: str = "GET",
           replayable: bool = True, state: ServiceState | None = None,
           balancer: Balancer | None = None, cands: list[Endpoint] | None = None) -> Attempts:
    state = state or ServiceState(spec or _spec())
    return Attempts.begin(now, state, balancer or Balancer(random.Random(1)),
                          list(EPS) if cands is None else cands,
                          service="web", total=len(EPS), method=method,
                          replayable=replayable, rng=random.Random(2))


def _send(a: Attempts, now: float) -> Send:
    step = a.next(now)
    assert isinstance(step, Send), step
    assert a.start(now, new_connection=False) is None
    return step


def test_a_good_answer_is_delivered_after_one_try() -> None:
    a = _begin()
    s = _send(a, 0.0)
    assert (s.attempt, s.per_try, s.connect) == (1, 15.0, 2.0)
    assert a.responded(0.01, 200) == Deliver(1)
    assert a.balancer.snapshot(0.01)[s.endpoint.key]["outstanding"] == 0


def test_a_503_is_retried_on_another_instance_after_a_jittered_pause() -> None:
    a = _begin()
    first = _send(a, 0.0)
    wait = a.responded(0.01, 503)
    assert isinstance(wait, Wait) and 0.01 <= wait.until <= 0.01 + 0.025
    assert a.take_events() == [Retrying(2)]
    second = _send(a, wait.until)
    assert second.attempt == 2 and second.endpoint != first.endpoint  # untried first
    assert a.responded(wait.until + 0.01, 200) == Deliver(2)


def test_attempts_run_out_and_the_last_answer_is_delivered() -> None:
    a = _begin()
    now = 0.0
    for _ in range(2):
        _send(a, now)
        w = a.responded(now, 503)
        assert isinstance(w, Wait)
        now = w.until
    _send(a, now)
    assert a.responded(now, 503) == Deliver(3)  # 3 attempts in all: relay the 503


@pytest.mark.parametrize(("condition", "replayable", "retried"), [
    (CONNECT_FAILURE, False, True),   # never reached the instance: always safe
    (BAD_GATEWAY, False, False),      # a streamed body was (partly) sent
    (BAD_GATEWAY, True, True),
    (GATEWAY_TIMEOUT, True, False),   # not in the default ``on`` list
])
def test_failures_are_retried_by_condition_and_body(condition: str, replayable: bool,
                                                    retried: bool) -> None:
    a = _begin(replayable=replayable)
    _send(a, 0.0)
    step = a.failed(0.5, condition, "why")
    if retried:
        assert isinstance(step, Wait)
    else:
        assert isinstance(step, Answer)
        assert step.status == (503 if condition == CONNECT_FAILURE else int(condition))
        assert step.attempts == 1 and step.endpoint is not None and "why" in step.reason


def test_non_idempotent_methods_are_retried_only_when_the_policy_says_so() -> None:
    a = _begin(method="POST")
    _send(a, 0.0)
    assert a.responded(0.0, 503) == Deliver(1)
    b = _begin(method="POST", spec=_spec(non_idempotent=True))
    _send(b, 0.0)
    assert isinstance(b.responded(0.0, 503), Wait)


def test_the_overall_deadline_cuts_the_per_try_timeout_and_ends_the_request() -> None:
    spec = ResilienceSpec.default("web")
    spec = dataclasses.replace(spec, timeouts=dataclasses.replace(
        spec.timeouts, overall=1.0, per_try=0.8))
    a = _begin(spec=spec)
    _send(a, 0.0)
    w = a.failed(0.8, CONNECT_FAILURE)
    assert isinstance(w, Wait)
    s = _send(a, w.until)
    assert s.per_try == pytest.approx(1.0 - w.until)  # what is left of the overall time
    a.failed(1.0, CONNECT_FAILURE)
    last = a.next(1.0)
    assert isinstance(last, Answer) and last.status == 504 and "overall" in last.reason


def test_no_retry_when_its_pause_would_pass_the_deadline() -> None:
    spec = ResilienceSpec.default("web")
    spec = dataclasses.replace(
        spec, timeouts=dataclasses.replace(spec.timeouts, overall=0.1, per_try=0.1),
        retries=dataclasses.replace(spec.retries, backoff=10.0, max_backoff=10.0))
    a = _begin(spec=spec)
    _send(a, 0.0)
    # Decided before anything is released: the response is still there to relay.
    assert a.responded(0.05, 503) == Deliver(1)


def test_an_empty_retry_budget_stops_retries_and_says_so() -> None:
    spec = _spec(budget=RetryBudget(ratio=0.0, min_per_second=0, window=10.0))
    a = _begin(spec=spec)
    _send(a, 0.0)
    assert a.responded(0.0, 503) == Deliver(1)
    assert a.take_events() == [BudgetExhausted()]


def test_consecutive_failures_eject_an_instance_until_its_time_is_up() -> None:
    state = ServiceState(_spec(attempts=1))
    balancer = Balancer(random.Random(1))
    bad = EPS[0]
    now = 0.0
    for i in range(5):  # five consecutive failures of the bad instance
        a = _begin(now, state=state, balancer=balancer, cands=[bad])
        _send(a, now)
        a.failed(now, CONNECT_FAILURE)
        events = a.take_events()
        assert (events == [Ejected(bad.key, now + 30.0)]) == (i == 4), events
        now += 0.1
    for _ in range(50):  # while ejected, no try goes there
        a = _begin(now, state=state, balancer=balancer)
        assert _send(a, now).endpoint != bad
        a.responded(now, 200)
    a = _begin(now + 31.0, state=state, balancer=balancer)
    a.next(now + 31.0)
    assert Readmitted(bad.key) in a.take_events()


def test_the_breaker_bounds_tries_that_wait_for_a_new_connection() -> None:
    spec = dataclasses.replace(ResilienceSpec.default("web"),
                               circuit_breaker=CircuitBreaker(max_requests=10, max_pending=1))
    state = ServiceState(spec)
    first = _begin(state=state)
    first.next(0.0)
    assert first.start(0.0, new_connection=True) is None  # waits for a connection
    second = _begin(state=state)
    second.next(0.0)
    refused = second.start(0.0, new_connection=True)
    assert isinstance(refused, Answer) and refused.status == 503
    assert "waiting for a connection to web" in refused.reason
    assert second.take_events() == [BreakerRejected(pending=True)]
    first.connection_done()  # the first one's connection is up: room again
    third = _begin(state=state)
    third.next(0.0)
    assert third.start(0.0, new_connection=True) is None


def test_a_client_that_leaves_is_not_held_against_the_instance() -> None:
    state = ServiceState(_spec())
    a = _begin(state=state)
    s = _send(a, 0.0)
    a.client_gone(1.0)
    assert state.outliers.is_ejected(1.0, s.endpoint.key) is False
    assert a.balancer.snapshot(1.0)[s.endpoint.key]["outstanding"] == 0
