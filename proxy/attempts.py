"""One request's tries as a sans-IO state machine.

The outbound listener forwards a request to one instance of a service, and that may
take several tries. This module decides everything about them: which instance each
try goes to (outlier ejection, untried instances first, then the balancer's power of
two choices), how long it may take (the per-try timeout, cut to what is left of the
overall one), whether a failed try or a 502/503/504 answer is retried (attempts left,
the retry policy's conditions and methods, a replayable body, the retry budget) and
after which pause (full-jitter back-off), and when to give up with which status.

The shell (``outbound.py``) does the I/O and reports what happened::

    a = Attempts.begin(started, state, cands, service="web", total=len(endpoints),
                       method="GET", replayable=True, rng=rng)   # takes a breaker slot
    step = a.next(now)              # Send(endpoint, per_try, connect) or Answer(status, ...)
    refused = a.start(now, new_connection=not pool.has_idle(...))  # Answer, or None: go
    ...                             # send it; then one of
    step = a.failed(now, condition)                  # Wait(until) or Answer
    step = a.stale(now)                              # Send (a new connection) or Answer
    step = a.responded(now, status, connect_seconds) # Wait(until) or Deliver
    # after a Wait, sleep until ``until`` and call ``next`` again
    a.end()                         # the response is over: the breaker slot comes back

The breaker is the request's, not a try's: ``begin`` takes a slot (a ``next`` that
finds none answers 503 ``breaker_open``) and ``end`` gives it back once the response is
over, however it ended. A pooled connection that the upstream had closed just as it was
taken (``stale``) is sent again at once on a new connection: not an attempt of the
retry policy (the instance never saw it), but a retry for the budget, so a server that
closes every idle connection cannot double the load unseen.

Time comes only from ``now`` and randomness from the injected ``random.Random``, so the
same decisions run under a virtual clock (``tests/proxy/test_attempts.py``) and could
run in the simulator. What the shell should log or count comes out as ``events``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..policy.documents import CONNECT_FAILURE, ResilienceSpec
from .balancer import DEFAULT_DECAY
from .balancers import LoadBalancer, make_balancer
from .errors import ErrorCode, try_failure_code
from .resilience import CircuitBreaker, OutlierDetector, RetryBudgetTracker, backoff

#: Answers of an instance that a retry policy may retry (as conditions "502", ...).
RETRYABLE_STATUSES = frozenset({502, 503, 504})
#: A try whose pooled connection turned out closed before any response byte.
STALE_CONNECTION = "stale-connection"



def failure_status(condition: str) -> int:
    """What the caller is answered when a try that failed with ``condition`` (a retry
    condition, documents.py) was the last: 503 if no connection was made, else the
    gateway status the condition is named after."""
    if condition == CONNECT_FAILURE:
        return 503
    return 502 if condition == STALE_CONNECTION else int(condition)


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
    #: What the instance speaks (``protocols.py``: http, http2, grpc, tcp).
    protocol: str = "http"
    #: What its agent's inbound accepts beyond HTTP/1.1 (``h2``, ``tcp``; empty for an
    #: agent older than that tag).
    carries: frozenset[str] = frozenset()


class ServiceState:
    """Per destination service: the resilience machinery built from its policy, and
    the balancer it chose."""

    def __init__(self, spec: ResilienceSpec, rng: random.Random | None = None,
                 decay: float = DEFAULT_DECAY) -> None:
        self.spec = spec
        self._rng = rng if rng is not None else random.Random(0)
        self._decay = decay
        self.breaker = CircuitBreaker(spec.circuit_breaker)
        self.budget = RetryBudgetTracker(spec.retries.budget)
        self.outliers = OutlierDetector(spec.outlier_ejection)
        self.balancer: LoadBalancer = make_balancer(spec.balancer, self._rng, decay)

    def update(self, spec: ResilienceSpec) -> None:
        """A new policy: rebuild only what changed, so in-flight counts survive (a new
        balancer starts afresh: requests in flight finish on keys it does not know,
        which it ignores)."""
        if spec.balancer != self.spec.balancer:
            self.balancer = make_balancer(spec.balancer, self._rng, self._decay)
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
    #: Open a new connection (the pooled one was stale).
    fresh: bool = False


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
    #: The reason code (``errors.py``).
    code: ErrorCode = ErrorCode.UPSTREAM_RESET
    #: The instances tried, in order (keys).
    tried: tuple[str, ...] = ()


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


@dataclass(frozen=True, slots=True)
class StaleRetry:
    """A try's pooled connection was closed by the upstream: sent again on a new one."""

    key: str


Event = Ejected | Readmitted | Retrying | BudgetExhausted | BreakerRejected | StaleRetry


@dataclass(slots=True)
class Attempts:
    """The tries of one request to one service's candidate instances."""

    state: ServiceState
    balancer: LoadBalancer
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
    #: What ``balancer = "hash"`` hashes (the header or cookie value); None: absent.
    hash_key: bytes | None = None
    attempt: int = 0
    events: list[Event] = field(default_factory=list)
    _tried: set[str] = field(default_factory=set)
    _order: list[str] = field(default_factory=list)
    _next: Endpoint | None = None
    _current: Endpoint | None = None
    _sent_at: float = 0.0
    _pending: bool = False
    #: Whether this request holds a breaker slot (``end`` gives it back).
    _slot: bool = False

    @classmethod
    def begin(cls, started: float, state: ServiceState, balancer: LoadBalancer,
              candidates: list[Endpoint], *, service: str, total: int, method: str,
              replayable: bool, rng: random.Random,
              hash_key: bytes | None = None) -> Attempts:
        """A new request that arrived at ``started`` (its overall timeout runs from
        then, an injected delay included): counted by the retry budget, and holding a
        breaker slot if one is free."""
        state.budget.record_request(started)
        a = cls(state, balancer, candidates, service, total, method, replayable, rng,
                started, started + state.spec.timeouts.overall, hash_key)
        a._slot = state.breaker.try_acquire()
        return a

    def end(self) -> None:
        """The response is over (however it ended): give the breaker slot back. Safe to
        call more than once."""
        if self._slot:
            self._slot = False
            self.state.breaker.release()
        self.connection_done()

    def take_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    # ---- inputs ------------------------------------------------------------------------

    def next(self, now: float) -> Send | Answer:
        """The next try (after ``begin`` or a ``Wait``): where, and for how long."""
        spec = self.state.spec
        if self.attempt == 0 and not self._slot:
            self.events.append(BreakerRejected(pending=False))
            cb = spec.circuit_breaker
            return Answer(503, f"circuit breaker open: {cb.max_requests} requests already "
                          f"in flight to {self.service}", 0, code=ErrorCode.BREAKER_OPEN)
        self.attempt += 1
        per_try = min(spec.timeouts.per_try, self.deadline - now)
        if per_try <= 0:
            return Answer(504, f"overall timeout {spec.timeouts.overall:g} s passed",
                          self.attempt - 1,
                          code=ErrorCode.OVERALL_TIMEOUT, tried=tuple(self._order))
        ep = self._choose(now)
        if ep is None:
            return Answer(503, f"every instance of {self.service} that the request may go "
                          "to is draining (weight 0)", self.attempt - 1,
                          code=ErrorCode.INSTANCES_DRAINING, tried=tuple(self._order))
        if ep.key not in self._tried:
            self._tried.add(ep.key)
            self._order.append(ep.key)
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
                              self.attempt - 1, code=ErrorCode.PENDING_LIMIT,
                              tried=tuple(self._order))
            self._pending = True
        self._current, self._sent_at = ep, now
        self.balancer.start(ep.key, now)
        return None

    def connection_done(self) -> None:
        if self._pending:
            self._pending = False
            self.state.breaker.dequeue()

    def failed(self, now: float, condition: str, detail: str = "",
               bad_response: bool = False) -> Wait | Answer:
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
                      f"{detail or condition}", self.attempt, ep,
                      code=try_failure_code(condition, inbound=False, bad_response=bad_response),
                      tried=tuple(self._order))

    def stale(self, now: float) -> Send | Answer:
        """The try's pooled connection had been closed by the upstream before any
        response byte: the instance never saw the request. Send it again at once, on a
        new connection, to the same instance, if the retry budget allows (a stale
        connection is not the instance's failure, so nothing is recorded against it)."""
        ep = self._current
        assert ep is not None, "no try in flight"
        self._current = None
        self.balancer.finish(ep.key, now, now - self._sent_at, True)
        if not self.state.budget.try_retry(now):
            self.events.append(BudgetExhausted())
            return Answer(502, f"{ep.node}/{ep.instance}: the upstream closed the pooled "
                          "connection before responding (no retry budget left to resend)",
                          self.attempt, ep, code=ErrorCode.UPSTREAM_RESET,
                          tried=tuple(self._order))
        self.events.append(StaleRetry(ep.key))
        spec = self.state.spec
        per_try = min(spec.timeouts.per_try, self.deadline - now)
        if per_try <= 0:
            return Answer(504, f"overall timeout {spec.timeouts.overall:g} s passed",
                          self.attempt, ep,
                          code=ErrorCode.OVERALL_TIMEOUT, tried=tuple(self._order))
        self._next = ep
        return Send(ep, per_try, min(spec.timeouts.connect, per_try), self.attempt,
                    fresh=True)

    def responded(self, now: float, status: int, connect_seconds: float = 0.0, *,
                  rate_limited: bool = False) -> Wait | Deliver:
        """The instance answered with ``status``. ``connect_seconds`` of the try went
        to opening its connection: the balancer measures the instance, not the
        handshake (which would brand a new connection's instance slow).
        ``rate_limited``: the instance's sidecar refused it for the mesh-wide rate
        limit (429 ``rate_limited``): delivered as it is, never retried, and it judges
        the instance neither way (a fast refusal must not make it look fast)."""
        if rate_limited:
            ep = self._current
            assert ep is not None, "no try in flight"
            self._current = None
            self.balancer.release(ep.key)
            return Deliver(self.attempt)
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

    def _choose(self, now: float) -> Endpoint | None:
        """The instance of the next try (None: every candidate is draining)."""
        outliers = self.state.outliers
        for back, _ in outliers.readmit(now):  # rare: a scan is fine here
            # A fresh start: the failures that got it ejected are already paid for,
            # and its penalised latency would otherwise keep it idle for a minute.
            self.balancer.readmitted(back, now)
            for e in self.candidates:
                if e.key == back and e.rtt is not None:
                    self.balancer.seed(back, e.rtt)
            self.events.append(Readmitted(back))
        live = self.candidates
        if outliers.any_ejected(now):
            live = [e for e in live if not outliers.is_ejected(now, e.key)] or live
        return self.balancer.pick(now, live, self.hash_key, exclude=self._tried)

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
    "STALE_CONNECTION",
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
    "StaleRetry",
    "Wait",
    "failure_status",
]
