"""The observer interface: one fan-out, in order; a request's end gives back its breaker
slot once and is heard once."""

from __future__ import annotations

import random

from rumor.policy.documents import ResilienceSpec
from rumor.proxy.attempts import Attempts, Endpoint, Retrying, ServiceState
from rumor.proxy.observe import Exchange, NullObserver, Observers, RequestEnd, observers

EP = Endpoint("n/web", "n", "web", "v1", (), "127.0.0.1", 1, None)


class Log:
    def __init__(self, name: str, out: list[str]) -> None:
        self.name, self.out = name, out

    def request_started(self, x: Exchange) -> None:
        self.out.append(f"{self.name}:start")

    def try_started(self, x: Exchange, endpoint: Endpoint, now: float) -> None:
        self.out.append(f"{self.name}:try")

    def try_ended(self, x: Exchange, endpoint: Endpoint, now: float, outcome: str) -> None:
        self.out.append(f"{self.name}:tried:{outcome}")

    def decided(self, x: Exchange, event: object) -> None:
        self.out.append(f"{self.name}:decided:{type(event).__name__}")

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        self.out.append(f"{self.name}:end:{sent}:{complete}")


def test_observers_fan_out_in_order_and_skip_none() -> None:
    out: list[str] = []
    both = observers(Log("a", out), None, Log("b", out))
    assert isinstance(both, Observers)
    x = Exchange("outbound", b"GET", b"/", "c", 0.0)
    both.request_started(x)
    both.try_started(x, EP, 0.0)
    both.try_ended(x, EP, 0.1, "200")
    both.decided(x, Retrying(2))
    both.request_ended(x, 0.2, 5, True)
    assert out == ["a:start", "b:start", "a:try", "b:try", "a:tried:200", "b:tried:200",
                   "a:decided:Retrying", "b:decided:Retrying", "a:end:5:True",
                   "b:end:5:True"]
    assert isinstance(observers(None), NullObserver)
    one = Log("only", out)
    assert observers(one) is one


def test_request_end_returns_the_breaker_slot_once() -> None:
    state = ServiceState(ResilienceSpec.default("web"))
    tries = Attempts.begin(0.0, state, state.balancer, [EP], service="web", total=1,
                           method="GET", replayable=True, rng=random.Random(1))
    assert state.breaker.in_flight == 1
    out: list[str] = []
    end = RequestEnd(Log("o", out), Exchange("outbound", b"GET", b"/", "c", 0.0), tries,
                     lambda: 1.0)
    end(10, True)
    tries.end()  # the shell's own safety net: never below zero, never twice
    assert state.breaker.in_flight == 0
    assert out == ["o:end:10:True"]


class EndsOnly(NullObserver):
    def __init__(self, out: list[str]) -> None:
        self.out = out

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        self.out.append("ends:end")


def test_each_call_goes_only_to_the_members_that_watch_it() -> None:
    out: list[str] = []
    ends, log = EndsOnly(out), Log("a", out)
    both = observers(ends, log)
    x = Exchange("outbound", b"GET", b"/", "c", 0.0)
    both.request_started(x)
    both.try_started(x, EP, 0.0)
    both.request_ended(x, 0.2, 5, True)
    assert out == ["a:start", "a:try", "ends:end", "a:end:5:True"]
    # One watcher of a call: called directly, no loop in between.
    assert both.try_started == log.try_started
    # Groups flatten: one fan-out, not a fan-out of fan-outs.
    nested = observers(observers(ends, log), EndsOnly(out))
    assert isinstance(nested, Observers) and len(nested.members) == 3
    assert observers(EndsOnly(out), NullObserver()).try_ended(x, EP, 0.0, "200") is None
