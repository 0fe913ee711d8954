"""One request's tries as a sans-IO state machine.

The outbound listener forwards a request to one instance of a service, and that may
take several tries. This module decides everything about them: which instance each
try goes to (outlier ejection, untried instances first, then the balancer's power of
two choices), how long it may take (the per-try timeout, cut to what is left of the
overall one), whether a failed try or a 502/503/504 answer is retried (attempts left,
the retry policy's conditions and methods, a replayable body, the retry budget) and
after which pause (full-jitter back-off), and when to give up with which status.

The shell (``outbound.py``) does the I/O and reports what happened::

    a = Attempts.begin(now, state, balancer, cands, service="web", total=len(endpoints),
                       method="GET", replayable=True, rng=rng)
    step = a.next(now)              # Send(endpoint, per_try, connect) or Answer(status, ...)
    refused = a.start(now, new_connection=not pool.has_idle(...))  # Answer, or None: go
    ...                             # send it; then one of
    step = a.failed(now, condition)                  # Wait(until) or Answer
    step = a.responded(now, status, connect_seconds) # Wait(until) or Deliver
    # after a Wait, sleep until ``until`` and call ``next`` again

Time comes only from ``now`` and randomness from the injected ``random.Random``, so the
same decisions run under a virtual clock (``tests/proxy/test_attempts.py``) and could
run in the simulator. What the shell should log or count comes out as ``events``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..policy.documents import CONNECT_FAILURE, ResilienceSpec
from .balancer import Balancer
from .resilience import CircuitBreaker, OutlierDetector, RetryBudgetTracker, backoff

#: Answers of an instance that a retry policy may retry (as conditions "502", ...).
RETRYABLE_STATUSES = frozenset({502, 503, 504})


def failure_status(condition: str) -> int:
    """What the caller is answered when a try that failed with ``condition`` (a retry
    condition, documents.py) was the last: 503 if no connection was made, else the
    gateway status the condition is named after."""
    return 503 if condition == CONNECT_FAILURE else int(condition)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance a request can go to."""

    key: str  # node/instance id: the balancer's and the ejector's identity
    node: str
    instance: str
    version: str
    tags: tuple[str, ...]
    host: str  # the node's inbound listener
    port: int
    rtt: float | None
    #: The instance's registered weight (0: draining, no new requests).
    weight: int = 1


class ServiceState:
    """Per destination service: the resilience machinery built from its policy."""

    def __init__(self, spec: ResilienceSpec) -> None:
        self.spec = spec
        self.breaker = CircuitBreaker(spec.circuit_breaker)
        self.budget = RetryBudgetTracker(spec.retries.budget)
        self.outliers = OutlierDetector(spec.outlier_ejection)

    def update(self, spec: ResilienceSpec) -> None:
        """A new policy: rebuild only what changed, so in-flight counts survive."""
        if spec.circuit_breaker != self.spec.circuit_breaker:
            old = self.breaker
            self.breaker = CircuitBreaker(spec.circuit_breaker)
            self.breaker.inherit(old)
        if spec.retries.budget != self.spec.retries.budget:
            self.budget = RetryBudgetTracker(spec.retries.budget)
        if spec.outlier_ejection != self.spec.outlier_ejection:
            self.outliers = OutlierDetector(spec.outlier_ejection)
        self.spec = spec


# ---- outputs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send try number ``attempt`` to ``endpoint``, within ``per_try`` seconds, its
    connection (if a new one is needed) within ``connect``."""

    endpoint: Endpoint
    per_try: float
    connect: float
    attempt: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Back off: call ``next`` at ``until`` (after releasing any response)."""

    until: float


@dataclass(frozen=True, slots=True)
class Answer:
    """Give up: answer the client with ``status``. ``attempts`` were made; the last
    went to ``endpoint`` (None if none was tried)."""

    status: int
    reason: str
    attempts: int
    endpoint: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class Deliver:
    """Relay the instance's response: it is the request's answer."""

    attempts: int


# ---- events (for the shell's log and metrics) -----------------------------------------


@dataclass(frozen=True, slots=True)
class Ejected:
    key: str
    until: float


@dataclass(frozen=True, slots=True)
class Readmitted:
    key: str


@dataclass(frozen=True, slots=True)
class Retrying:
    attempt: int  # the try about to be made


@dataclass(frozen=True, slots=True)
class BudgetExhausted:
    pass


@dataclass(frozen=True, slots=True)
class BreakerRejected:
    pending: bool  # True: too many waiting for a connection; False: too many in flight


Event = Ejected | Readmitted | Retrying | BudgetExhausted | BreakerRejected


@dataclass
class Attempts:
    """The tries of one request to one service's candidate instances."""

    state: ServiceState
    balancer: Balancer
    candidates: list[Endpoint]
    service: str
    #: Instances of the service in all (the ejection cap is a share of them).
    total: int
    method: str
    #: Whether the body can be sent again (buffered, or none); a streamed body
    #: allows a retry only of a try that never connected.
    replayable: bool
    rng: random.Random
    started: float
    deadline: float = 0.0
    attempt: int = 0
    events: list[Event] = field(default_factory=list)
    _tried: set[str] = field(default_factory=set)
    _next: Endpoint | None = None
    _current: Endpoint | None = None
    _sent_at: float = 0.0
    _pending: bool = False

    @classmethod
    def begin(cls, now: float, state: ServiceState, balancer: Balancer,
              candidates: list[Endpoint], *, service: str, total: int, method: str,
              replayable: bool, rng: random.Random) -> Attempts:
        """A new request at ``now`` (counted by the retry budget)."""
        state.budget.record_request(now)
        return cls(state, balancer, candidates, service, total, method, replayable, rng,
                   now, now + state.spec.timeouts.overall)

    def take_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    # ---- inputs ------------------------------------------------------------------------

    def next(self, now: float) -> Send | Answer:
        """The next try (after ``begin`` or a ``Wait``): where, and for how long."""
        spec = self.state.spec
        self.attempt += 1
        per_try = min(spec.timeouts.per_try, self.deadline - now)
        if per_try <= 0:
            return Answer(504, f"overall timeout {spec.timeouts.overall:g} s passed",
                          self.attempt - 1)
        ep = self._choose(now)
        self._tried.add(ep.key)
        self._next = ep
        return Send(ep, per_try, min(spec.timeouts.connect, per_try), self.attempt)

    def start(self, now: float, new_connection: bool) -> Answer | None:
        """The shell is about to send the ``Send``; ``new_connection``: no idle pooled
        connection to the instance, so the try waits for one, and the breaker's
        ``max_pending`` bounds such tries. None: go ahead (``connection_done`` when the
        connection is there or the try ended); else the answer to give now."""
        ep = self._next
        assert ep is not None, "start() without a Send"
        self._next = None
        if new_connection:
            if not self.state.breaker.try_enqueue():
                self.events.append(BreakerRejected(pending=True))
                cb = self.state.spec.circuit_breaker
                return Answer(503, f"circuit breaker open: {cb.max_pending} requests "
                              f"already waiting for a connection to {self.service}",
                              self.attempt - 1)
            self._pending = True
        self._current, self._sent_at = ep, now
        self.balancer.start(ep.key, now)
        return None

    def connection_done(self) -> None:
        if self._pending:
            self._pending = False
            self.state.breaker.dequeue()

    def failed(self, now: float, condition: str, detail: str = "") -> Wait | Answer:
        """The try got no response: ``condition`` is a retry condition (documents.py:
        connect-failure, 502 for a broken connection, 504 for the per-try timeout)."""
        ep = self._finish(now, ok=False, latency=now - self._sent_at)
        retry = (self.replayable or condition == CONNECT_FAILURE) and self._retryable(
            condition)
        if retry:
            wait = self._retry(now)
            if wait is not None:
                return wait
        return Answer(failure_status(condition), f"{ep.node}/{ep.instance}: "
                      f"{detail or condition}", self.attempt, ep)

    def responded(self, now: float, status: int, connect_seconds: float = 0.0,
                  ) -> Wait | Deliver:
        """The instance answered with ``status``. ``connect_seconds`` of the try went
        to opening its connection: the balancer measures the instance, not the
        handshake (which would brand a new connection's instance slow)."""
        self._finish(now, ok=status < 500, latency=now - self._sent_at - connect_seconds)
        if status in RETRYABLE_STATUSES and self.replayable and self._retryable(str(status)):
            wait = self._retry(now)
            if wait is not None:
                return wait
        return Deliver(self.attempt)

    def client_gone(self, now: float) -> None:
        """The client left mid-try: not the instance's fault."""
        if self._current is not None:
            self._finish(now, ok=True, latency=now - self._sent_at)

    # ---- decisions ---------------------------------------------------------------------

    def _choose(self, now: float) -> Endpoint:
        outliers = self.state.outliers
        for back, _ in outliers.readmit(now):  # rare: a scan is fine here
            # A fresh start: the failures that got it ejected are already paid for,
            # and its penalised latency would otherwise keep it idle for a minute.
            self.balancer.forget([back])
            for e in self.candidates:
                if e.key == back and e.rtt is not None:
                    self.balancer.seed(back, e.rtt)
            self.events.append(Readmitted(back))
        live = [e for e in self.candidates if not outliers.is_ejected(now, e.key)] \
            or self.candidates
        fresh = [e for e in live if e.key not in self._tried] or live
        choice = {e.key: e for e in fresh}
        picked = self.balancer.pick(now, list(choice))
        assert picked is not None
        return choice[picked]

    def _finish(self, now: float, *, ok: bool, latency: float) -> Endpoint:
        ep = self._current
        assert ep is not None, "no try in flight"
        self._current = None
        self.balancer.finish(ep.key, now, latency, ok)
        outliers = self.state.outliers
        if outliers.record(now, ep.key, ok, total=self.total):
            self.events.append(Ejected(ep.key, outliers.ejected_until(ep.key)))
        return ep

    def _retryable(self, condition: str) -> bool:
        policy = self.state.spec.retries
        return self.attempt < policy.attempts and policy.retryable(self.method, condition)

    def _retry(self, now: float) -> Wait | None:
        """A Wait if a retry is allowed (the budget has room and the pause ends before
        the overall deadline); decided before the shell releases anything."""
        if not self.state.budget.try_retry(now):
            self.events.append(BudgetExhausted())
            return None
        pause = backoff(self.rng, self.state.spec.retries, self.attempt)
        if now + pause >= self.deadline:
            return None
        self.events.append(Retrying(self.attempt + 1))
        return Wait(now + pause)



__all__ = [
    "Answer",
    "Attempts",
    "BreakerRejected",
    "BudgetExhausted",
    "Deliver",
    "Ejected",
    "Endpoint",
    "Event",
    "Readmitted",
    "Retrying",
    "Send",
    "ServiceState",
    "Wait",
    "failure_status",
]
