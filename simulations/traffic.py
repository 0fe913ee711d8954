# layer: shell — measures its own wall-clock run time (time)
"""The ``traffic`` scenario: the proxy's request-path cores under open-loop load.

One caller sidecar sends a fixed-rate client population's requests to N instances of a
service, each behind its own callee sidecar, the way ``bench/proxy_pair.py`` plugs the
real pair into the shared harness (``../shared/anchors/proxy/bench.py slow-backend``).
What decides where each try goes, how long it may take, whether it is retried and
after which pause, is the real code of the proxy, driven on a virtual clock with no
sockets:

* ``proxy/attempts.py`` (``Attempts``: the tries of one request, the per-try and overall
  deadlines, retries, the breaker's pending bound, outlier ejection through
  ``ServiceState``, built from a ``ResilienceSpec``, the policy default unless told);
* ``proxy/balancers.py``: the balancer a resilience policy would choose
  (``peak_ewma``, ``least_request``, ``round_robin``, ``random``, ``hash``), made by
  ``ServiceState`` from the spec's balancer section, with the same defaults (slow start
  included); instances carry ``--weights`` (0 drains one);
* ``proxy/faults.py`` (``FaultTable``): a one-rule fault policy (``--fault-delay``,
  ``--fault-abort``) decided at the caller before balancing, as
  ``OutboundProxy._fault``: a delay holds the request (its overall timeout runs from
  its arrival at the caller), an abort answers it at once (a status, or 0 for a reset)
  and never reaches the breaker, the balancer, the ejector or the retry budget;
* ``proxy/ratelimit.py`` (``MeshRateLimit``): a mesh-wide limit (``--rate-limit``),
  each instance's callee sidecar admitting its share R·w/W as ``InboundProxy`` does; a
  refusal is a 429 that ``Attempts.responded(..., rate_limited=True)`` delivers as it
  is, unretried, judging the instance neither way.

The request path, as the shells run it: caller hop → fault → balance and try (breaker
slot, pick, deadlines) → callee hop → rate limit → instance → observe.

What is modelled rather than run (all in this module, all on the virtual clock):

* **Arrivals**: open loop, as ``loadgen.py``: uniform spacing (the harness's default)
  or Poisson, at ``rate`` per second; ``warmup`` seconds first, sent but not measured.
  Latency is taken from each request's *scheduled* time, so queueing anywhere is
  charged to it (no coordinated omission).
* **Instances**: a service time of ``backend_ms`` plus the variant's added delay
  (``delay_ms``; and ``slow_ms`` more for a ``slow_fraction`` of requests, drawn from a
  seeded stream per instance, as ``backend.py --slow-fraction/--slow-ms``); a share
  answered 503 or reset; and a concurrency limit (``conc``: that many requests served
  at once, FIFO, the rest queue). The harness backend is asyncio with timers, so its
  concurrency is unlimited (0, the default), as the proxy opens a connection per
  concurrent try.
* **Sidecars**: each (the caller, and one callee per instance, as in the real pair)
  is a single-threaded event loop, modelled as one FIFO server taking ``hop_ms`` per
  request. At low load it adds ``2 × hop_ms`` to a request (the pair's ~0.3 ms at
  c=1, bench/RESULTS.md); under load it queues. The balancer sees the callee's share,
  not the caller's, as in ``outbound.py``.
* **Connections**: per instance a pool of idle keep-alive connections; a try that finds
  none opens one (``connect_ms``, which the balancer does not count, and which the
  breaker's ``max_pending`` bounds). A reset, a timeout, or an answer that is retried
  closes the connection, as the shell does.

* **Keys** (``--hash-keys N``): each request carries one of N keys in ``HASH_HEADER``,
  drawn Zipf (key k of N with probability ∝ 1/k, exponent 1) or uniform, for ``hash``.

Every figure is a pure function of the parameters and the seed, except what sits under
``wall``. Each balancer of ``balancers`` runs on the same arrivals, the same keys, the
same fault draws and the same per-instance streams of slow and failing draws (common
random numbers), so their figures differ by the balancer alone.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from itertools import accumulate
from typing import TYPE_CHECKING, Any, cast

from ..policy.documents import (
    BalancerSpec,
    FaultAbort,
    FaultDelay,
    FaultRule,
    FaultSpec,
    HashOn,
    RateLimitSpec,
    ResilienceSpec,
)
from ..proxy.attempts import (
    Answer,
    Attempts,
    BreakerRejected,
    BudgetExhausted,
    Deliver,
    Ejected,
    Endpoint,
    Event,
    Retrying,
    Send,
    ServiceState,
)
from ..proxy.balancer import DEFAULT_DECAY
from ..proxy.balancers import LoadBalancer, make_balancer
from ..proxy.faults import FaultDecision, FaultTable
from ..proxy.ratelimit import MeshRateLimit
from .engine import gc_paused

if TYPE_CHECKING:
    from .scenarios import Params

Progress = Callable[[float, float], None]

SERVICE = "bench"
#: The caller's identity (``x-rumor-source``): what fault rules and rate limits see.
SOURCE = "loadgen"
#: The request header a ``hash`` balancer hashes (the request's key, ``--hash-keys``).
HASH_HEADER = "x-sim-key"

# ---- balancers -------------------------------------------------------------------------


def make_sim_balancer(algorithm: str, rng: random.Random,
                      decay: float = DEFAULT_DECAY) -> LoadBalancer:
    """The proxy's own balancer for ``algorithm`` (``proxy/balancers.py``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"balancer {algorithm!r} is not in the simulator; "
                         f"choose from {', '.join(ALGORITHMS)}")
    return make_balancer(BalancerSpec(algorithm), rng, decay)


ALGORITHMS = ("peak_ewma", "least_request", "round_robin", "random", "hash")
#: What ``--balancers`` runs by default (hash needs keys: ``--hash-keys``).
DEFAULT_BALANCERS = ALGORITHMS[:4]

# ---- instances and variants ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """One instance's behaviour (milliseconds, fractions from 0 to 1)."""

    delay_ms: float = 0.0
    slow_fraction: float = 0.0
    slow_ms: float = 0.0
    #: Share of requests answered 503 / whose connection is reset (no response).
    fail_503: float = 0.0
    reset: float = 0.0
    #: Requests served at once (FIFO beyond); 0: unlimited, as the harness backend.
    concurrency: int = 0

    @property
    def degraded(self) -> bool:
        """Slower or failing: what the harness's ``share_degraded`` counts (it knows
        only delays; failures are this simulator's)."""
        return (self.delay_ms > 0 or (self.slow_fraction > 0 and self.slow_ms > 0)
                or self.fail_503 > 0 or self.reset > 0)


#: Named variants. The first three are exactly ``bench.py slow-backend``'s
#: DEFAULT_VARIANTS (same spec syntax: Di = delay_ms[:slow_fraction:slow_ms]); the rest
#: add this simulator's suffixes (``+503=F``, ``+reset=F``, ``+conc=N``).
VARIANTS = {
    "healthy": "0,0,0",
    "fixed50": "0,0,50",
    "tail10x200": "0,0,0:0.1:200",
    "failing503": "0,0,0+503=0.3",
    "failingreset": "0,0,0+reset=0.3",
    "saturated": "0,0,5+conc=1",
}


def parse_variant(text: str) -> tuple[str, tuple[InstanceSpec, ...]]:
    """A variant name of ``VARIANTS``, or ``NAME=D1,D2,...`` as the harness's
    ``--variant``, each Di ``delay_ms[:slow_fraction:slow_ms]`` optionally followed by
    ``+503=F`` (a share answered 503), ``+reset=F`` (a share reset), ``+conc=N``."""
    name, sep, spec = text.partition("=")
    if not sep:
        if text not in VARIANTS:
            raise ValueError(f"unknown variant {text!r}: one of {', '.join(VARIANTS)}, "
                             "or NAME=D1,D2,... (Di = delay_ms[:slow_fraction:slow_ms]"
                             "[+503=F][+reset=F][+conc=N])")
        name, spec = text, VARIANTS[text]
    out: list[InstanceSpec] = []
    for item in spec.split(","):
        base, *extras = item.split("+")
        f = base.split(":")
        try:
            if len(f) not in (1, 3):
                raise ValueError
            inst = InstanceSpec(float(f[0]), float(f[1]) if len(f) == 3 else 0.0,
                                float(f[2]) if len(f) == 3 else 0.0)
            for x in extras:
                k, _, v = x.partition("=")
                if k == "503":
                    inst = replace(inst, fail_503=float(v))
                elif k == "reset":
                    inst = replace(inst, reset=float(v))
                elif k == "conc":
                    inst = replace(inst, concurrency=int(v))
                else:
                    raise ValueError
        except ValueError:
            raise ValueError(f"bad instance spec {item!r} in variant {text!r}") from None
        fractions = (inst.slow_fraction, inst.fail_503, inst.reset)
        if not all(0.0 <= x <= 1.0 for x in fractions) or inst.fail_503 + inst.reset > 1:
            raise ValueError(f"fractions must be within [0, 1] in {item!r}")
        if inst.delay_ms < 0 or inst.slow_ms < 0 or inst.concurrency < 0:
            raise ValueError(f"delays and concurrency must be >= 0 in {item!r}")
        out.append(inst)
    if not name or not out:
        raise ValueError(f"bad variant {text!r}")
    return name, tuple(out)


# ---- parameters --------------------------------------------------------------------------


def parse_fault(delay: str | None, abort: str | None) -> FaultSpec | None:
    """The one-rule fault document of ``--fault-delay MS:PERCENT`` and ``--fault-abort
    STATUS:PERCENT`` (or ``reset:PERCENT``), as a ``fault`` policy for the service with
    one rule that matches every request; None when neither is given."""
    if delay is None and abort is None:
        return None
    fd = fa = None
    if delay is not None:
        ms, pct = _pair(delay, "--fault-delay", "MS:PERCENT")
        try:
            seconds = float(ms) / 1000.0
        except ValueError:
            raise ValueError(f"bad --fault-delay {delay!r}: expected MS:PERCENT") from None
        if not 0 < seconds <= 3600:
            raise ValueError(f"--fault-delay: the delay must be > 0 and at most an hour, "
                             f"got {ms} ms")
        fd = FaultDelay(seconds, pct)
    if abort is not None:
        what, pct = _pair(abort, "--fault-abort", "STATUS:PERCENT or reset:PERCENT")
        status: int | None = None
        if what != "reset":
            try:
                status = int(what)
            except ValueError:
                raise ValueError(f"bad --fault-abort {abort!r}: expected STATUS:PERCENT or "
                                 "reset:PERCENT") from None
            if not 400 <= status <= 599:  # as the policy parser
                raise ValueError(f"--fault-abort: the status must be 400-599, got {status}")
        fa = FaultAbort(status, pct)
    return FaultSpec(SERVICE, (FaultRule("sim", (), (), None, fd, fa),))


def _pair(text: str, flag: str, form: str) -> tuple[str, float]:
    what, sep, pct = text.partition(":")
    try:
        if not sep:
            raise ValueError
        percent = float(pct)
    except ValueError:
        raise ValueError(f"bad {flag} {text!r}: expected {form}") from None
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"{flag}: the percent must be 0-100, got {pct}")
    return what, percent


def parse_rate_limit(text: str | None) -> RateLimitSpec | None:
    """``--rate-limit R[:BURST_S]``: a mesh-wide ``ratelimit`` policy of R requests/s to
    the service (burst 1 s by default, as the policy's; at most 60)."""
    if text is None:
        return None
    rate_s, sep, burst_s = text.partition(":")
    try:
        rate = float(rate_s)
        burst = float(burst_s) if sep else 1.0
    except ValueError:
        raise ValueError(f"bad --rate-limit {text!r}: expected R[:BURST_S]") from None
    if not (rate > 0 and math.isfinite(rate)) or not 0 < burst <= 60:
        raise ValueError(f"--rate-limit: the rate must be > 0 and the burst within "
                         f"(0, 60] s, got {text!r}")
    return RateLimitSpec(SERVICE, rate, burst, ())


def parse_weights(text: str) -> tuple[int, ...]:
    """``--weights 1,1,3``: the instances' registered weights (0: draining)."""
    try:
        out = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"bad --weights {text!r}: expected W1,W2,... (integers)") from None
    return out


@dataclass(slots=True)
class TrafficParams:
    seed: int = 1
    rate: float = 1000.0
    #: Measured seconds (after ``warmup``).
    duration: float = 30.0
    warmup: float = 2.0
    arrivals: str = "uniform"
    variant: str = "fixed50"
    balancers: tuple[str, ...] = DEFAULT_BALANCERS
    #: One sidecar's time per request (caller and each callee), ms: ``fixed``, or
    #: ``exp``onential with that mean (a loop shared with timers, GC and a neighbour).
    hop_ms: float = 0.15
    hop_dist: str = "fixed"
    #: The backend's own time per request without any added delay, ms.
    backend_ms: float = 0.05
    #: Opening a connection to an instance's sidecar, ms.
    connect_ms: float = 0.1
    #: The gossip probe RTT to each instance's host: the balancer's seed, ms.
    rtt_ms: float = 0.2
    #: Tries per request in all (None: the resilience policy's, 3 by default).
    attempts: int | None = None
    decay: float = DEFAULT_DECAY
    resilience: ResilienceSpec | None = None
    #: ``MS:PERCENT``: hold that share of the requests at the caller (``parse_fault``).
    fault_delay: str | None = None
    #: ``STATUS:PERCENT`` or ``reset:PERCENT``: answer that share at the caller.
    fault_abort: str | None = None
    #: ``R[:BURST_S]``: a mesh-wide limit, each callee sidecar admitting R·w/W.
    rate_limit: str | None = None
    #: The instances' weights (None: all 1); 0 drains one.
    weights: tuple[int, ...] | None = None
    #: Keys the requests carry for the ``hash`` balancer (0: none), drawn ``zipf``
    #: (key k of N with probability ∝ 1/k) or ``uniform``.
    hash_keys: int = 0
    hash_dist: str = "zipf"

    def validate(self) -> None:
        if not self.rate > 0 or not self.duration > 0 or self.warmup < 0:
            raise ValueError("rate and duration must be > 0, warmup >= 0")
        if self.hop_dist not in ("fixed", "exp"):
            raise ValueError(f"hop_dist must be fixed or exp, got {self.hop_dist!r}")
        if self.arrivals not in ("uniform", "poisson"):
            raise ValueError(f"arrivals must be uniform or poisson, got {self.arrivals!r}")
        for b in self.balancers:
            if b not in ALGORITHMS:
                raise ValueError(f"unknown balancer {b!r}: one of {', '.join(ALGORITHMS)}")
        if not self.balancers:
            raise ValueError("no balancer to run")
        if min(self.hop_ms, self.backend_ms, self.connect_ms, self.rtt_ms) < 0:
            raise ValueError("times must be >= 0")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        _, instances = parse_variant(self.variant)
        parse_fault(self.fault_delay, self.fault_abort)
        parse_rate_limit(self.rate_limit)
        if self.weights is not None:
            if len(self.weights) != len(instances):
                raise ValueError(f"--weights gives {len(self.weights)} weights for "
                                 f"{len(instances)} instances")
            if min(self.weights) < 0 or max(self.weights) <= 0:
                raise ValueError("weights must be >= 0, and one of them > 0")
        if self.hash_keys < 0:
            raise ValueError("hash_keys must be >= 0")
        if self.hash_dist not in ("zipf", "uniform"):
            raise ValueError(f"hash_dist must be zipf or uniform, got {self.hash_dist!r}")
        if "hash" in self.balancers and not self.hash_keys:
            raise ValueError("the hash balancer needs keys: --hash-keys N (a request "
                             "without one is balanced as random)")

    def spec(self) -> ResilienceSpec:
        spec = self.resilience or ResilienceSpec.default(SERVICE)
        if self.attempts is not None:
            spec = replace(spec, retries=replace(spec.retries, attempts=self.attempts))
        return spec

    def spec_for(self, algorithm: str) -> ResilienceSpec:
        """``spec()`` with its balancer section set to ``algorithm`` (slow start kept;
        ``hash`` hashes ``HASH_HEADER``)."""
        spec = self.spec()
        hash_on = HashOn(header=HASH_HEADER) if algorithm == "hash" else None
        return replace(spec, balancer=replace(spec.balancer, algorithm=algorithm,
                                              hash_on=hash_on))


# ---- the request path: the only code that talks to Attempts ----------------------------


def _begin(started: float, state: ServiceState, candidates: list[Endpoint],
           rng: random.Random, hash_key: bytes | None) -> Attempts:
    """A request the caller took at ``started`` (its overall timeout runs from then, an
    injected delay included): it takes a breaker slot if one is free."""
    return Attempts.begin(started, state, state.balancer, candidates, service=SERVICE,
                          total=len(candidates), method="GET", replayable=True, rng=rng,
                          hash_key=hash_key)


def _step(tries: Attempts, now: float, outcome: tuple[str, str | int, float] | None,
          has_idle: Callable[[Endpoint], bool]) -> Send | float | Answer | Deliver:
    """Advance one request's tries. ``outcome`` is how the last try ended: None (there
    was none, or a back-off ended), ``("failed", condition, 0)``, ``("responded", status,
    connect_seconds)``, ``("limited", 429, connect_seconds)`` (the callee's sidecar
    refused it for the mesh-wide rate limit). Returns the try to make now (a ``Send``
    the core has started), the time to call again after backing off, or the request's
    end."""
    if outcome is not None:
        tries.connection_done()
        kind, what, connect_s = outcome
        after = (tries.failed(now, str(what)) if kind == "failed"
                 else tries.responded(now, int(what), connect_s,
                                      rate_limited=kind == "limited"))
        if isinstance(after, Answer | Deliver):
            tries.end()  # the response is over (bodies take no time here)
            return after
        return after.until
    step = tries.next(now)
    if isinstance(step, Answer):
        tries.end()
        return step
    refused = tries.start(now, new_connection=not has_idle(step.endpoint))
    if refused is not None:
        tries.end()
        return refused
    return step


# ---- one run -------------------------------------------------------------------------------

_BEGIN, _TRY, _DONE, _DELAYED = 1, 2, 3, 4
_NO_HEADERS: dict[str, str] = {}


def _percentile(s: list[float], q: float) -> float | None:
    """Nearest rank of a sorted list, as loadgen.py."""
    if not s:
        return None
    return s[max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))]


def _latency(vals: list[float]) -> dict[str, Any]:
    s = sorted(vals)
    out: dict[str, Any] = {"n": len(s)}
    if not s:
        return out
    for name, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9)):
        out[name] = round(cast(float, _percentile(s, q)) * 1000.0, 4)
    out["max"] = round(s[-1] * 1000.0, 4)
    out["mean"] = round(sum(s) / len(s) * 1000.0, 4)
    return out


class _Run:
    """One balancer over the variant: an event heap on virtual time.

    A request is a list ``[scheduled, tries, (instance, slow, status), key]``: its
    scheduled send time, its ``Attempts`` (None until it begins, and for an injected
    abort), how its last try went, and the index of its hash key (-1: none)."""

    def __init__(self, tp: TrafficParams, algorithm: str,
                 instances: tuple[InstanceSpec, ...]) -> None:
        self.tp = tp
        self.instances = instances
        seed = tp.seed
        # The balancer is the state's, made from the resilience spec, as a Target's.
        self.state = ServiceState(tp.spec_for(algorithm), random.Random(f"balancer:{seed}"),
                                  tp.decay)
        self.balancer: LoadBalancer = self.state.balancer
        self.rng = random.Random(f"attempts:{seed}")
        self.backend_rng = [random.Random(f"backend:{seed}:{i}")
                            for i in range(len(instances))]
        rtt = tp.rtt_ms / 1000.0
        weights = tp.weights or (1,) * len(instances)
        self.endpoints = [Endpoint(f"b{i + 1}", f"callee{i}", f"b{i + 1}", "", (),
                                   "127.0.0.1", 0, rtt, weights[i])
                          for i in range(len(instances))]
        self.index = {e.key: i for i, e in enumerate(self.endpoints)}
        for e in self.endpoints:
            self.balancer.seed(e.key, rtt)
        n = len(instances)
        self.idle = [0] * n  # idle pooled connections per instance
        self.callee_free = [0.0] * n
        self.servers: list[list[float]] = [[0.0] * s.concurrency for s in instances]
        self.caller_free = 0.0
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.events = 0
        self.measure_from = tp.warmup
        self.measure_to = tp.warmup + tp.duration
        # The fault layer, at the caller before balancing (its own stream: the same
        # requests are hit under every balancer).
        fault_spec = parse_fault(tp.fault_delay, tp.fault_abort)
        self.faults = FaultTable(fault_spec) if fault_spec is not None else None
        self.fault_rng = random.Random(f"faults:{seed}")
        # The rate limit, at each callee sidecar: its share R·w/W of the live weights.
        self.rate_limit = parse_rate_limit(tp.rate_limit)
        self.limits: list[MeshRateLimit] | None = None
        if self.rate_limit is not None:
            live = {e.key: float(e.weight) for e in self.endpoints}
            self.limits = [MeshRateLimit(self.rate_limit, instance=e.key,
                                         own_weight=float(e.weight), live_weights=live)
                           for e in self.endpoints]
        self.admitted = [0] * n  # by the time the callee took them, in the measured window
        self.refused = [0] * n
        # Hash keys: ``b"k<i>"``; which instance each key's first tries went to (-1:
        # none measured yet, -2: more than one).
        self.key_bytes = [b"k%d" % i for i in range(tp.hash_keys)]
        self.first_to = [-1] * tp.hash_keys
        self.key_requests = [0] * tp.hash_keys
        # figures
        self.lat: list[float] = []
        self.status: dict[int, int] = {}
        self.served = [0] * n  # answers (measured) by the instance that gave them
        self.tries_to = [0] * n
        self.slowed = 0
        self.counts = {"retries": 0, "ejections": 0, "budget_exhausted": 0,
                       "breaker_rejected": 0, "fault_delayed": 0, "fault_aborted": 0,
                       "rate_limited": 0}
        self.tries = 0
        # per instance: (service s, slow fraction, slow s, reset below, 503 below)
        self.shape = [((tp.backend_ms + s.delay_ms) / 1000.0, s.slow_fraction,
                       s.slow_ms / 1000.0, s.reset, s.reset + s.fail_503) for s in instances]
        self.connect_s = tp.connect_ms / 1000.0
        self.hop_s = tp.hop_ms / 1000.0
        hop_rng = random.Random(f"sidecars:{seed}")
        self.hop: Callable[[], float] = (
            (lambda: self.hop_s) if tp.hop_dist == "fixed"
            else (lambda: hop_rng.expovariate(1.0 / self.hop_s) if self.hop_s > 0 else 0.0))
        self.has_idle = lambda ep: self.idle[self.index[ep.key]] > 0

    def push(self, t: float, kind: int, data: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, data))

    def run(self, progress: Progress | None) -> None:
        tp = self.tp
        total = round(tp.rate * (tp.warmup + tp.duration))
        interval = 1.0 / tp.rate
        arrivals = ([i * interval for i in range(total)] if tp.arrivals == "uniform"
                    else _poisson(random.Random(f"arrivals:{tp.seed}"), tp.rate, total))
        keys = (_keys(random.Random(f"keys:{tp.seed}"), tp.hash_keys, tp.hash_dist, total)
                if tp.hash_keys else None)
        heap = self.heap
        pop = heapq.heappop
        hop = self.hop
        end = self.measure_to
        # The caller sidecar takes the requests first come first served (one thread),
        # so they begin in arrival order: one pending begin at a time in the heap.
        k = 0
        if total:
            self.caller_free = arrivals[0] + hop()
            self.push(self.caller_free, _BEGIN, [arrivals[0], None, None,
                                                 keys[0] if keys else -1])
        with gc_paused():
            while heap:
                t, _, kind, data = pop(heap)
                self.events += 1
                if kind == _BEGIN:
                    k += 1
                    if k < total:
                        sched = arrivals[k]
                        ready = (sched if sched > t else t) + hop()
                        self.caller_free = ready
                        self.push(ready, _BEGIN, [sched, None, None,
                                                  keys[k] if keys else -1])
                        if progress is not None and k % 4096 == 0:
                            progress(t, end)
                    self._begin(t, data)
                elif kind == _TRY:
                    self._try(t, data, None)
                elif kind == _DONE:
                    req, outcome = data
                    self._try(t, req, outcome)
                else:
                    req, started, fault = data
                    self._delayed(t, req, started, fault)

    def _begin(self, now: float, req: list[Any]) -> None:
        """The caller sidecar has the request: fault, then balance and try."""
        faults = self.faults
        if faults is not None:
            fault = faults.decide(source=SOURCE, headers=_NO_HEADERS, route_rule=None,
                                  rng=self.fault_rng)
            if fault is not None:
                if fault.delay > 0:
                    if req[0] >= self.measure_from:
                        self.counts["fault_delayed"] += 1
                    self.push(now + fault.delay, _DELAYED, (req, now, fault))
                else:
                    self._abort(now, req, fault)
                return
        key = req[3]
        req[1] = _begin(now, self.state, self.endpoints, self.rng,
                        self.key_bytes[key] if key >= 0 else None)
        self._try(now, req, None)

    def _delayed(self, now: float, req: list[Any], started: float,
                 fault: FaultDecision) -> None:
        """An injected delay is over: abort now if the rule also drew that, else go on
        with the overall timeout running since ``started``."""
        if fault.aborts:
            self._abort(now, req, fault)
        else:
            self._start(started, now, req)

    def _abort(self, now: float, req: list[Any], fault: FaultDecision) -> None:
        """An injected abort: the request's answer (status 0: the connection reset),
        never seen by the breaker, the balancer, the ejector or the retry budget."""
        if req[0] >= self.measure_from:
            self.counts["fault_aborted"] += 1
        self._end(now, req, fault.abort_status or 0, None)

    def _start(self, started: float, now: float, req: list[Any]) -> None:
        key = req[3]
        req[1] = _begin(started, self.state, self.endpoints, self.rng,
                        self.key_bytes[key] if key >= 0 else None)
        self._try(now, req, None)

    def _try(self, now: float, req: list[Any], outcome: tuple[str, str | int, float] | None,
             ) -> None:
        tries: Attempts = req[1]
        step = _step(tries, now, outcome, self.has_idle)
        if outcome is not None and outcome[0] != "failed" and not isinstance(step, float):
            # Relayed: the connection goes back to the pool. A reset or timed-out try's
            # connection is gone, and so is a retried answer's (the shell closes it).
            self.idle[req[2][0]] += 1
        if isinstance(step, float):
            self.push(step, _TRY, req)
        elif isinstance(step, Answer):
            self._end(now, req, step.status, None)
        elif isinstance(step, Deliver):
            i, slow, status = req[2]
            self._end(now, req, status, (i, slow))
        else:
            self._send(now, req, step)

    def _send(self, now: float, req: list[Any], step: Send) -> None:
        """The try's whole course is known when it starts (FIFO servers, fixed times):
        schedule its end."""
        i = self.index[step.endpoint.key]
        service, slow_fraction, slow_s, reset, fail = self.shape[i]
        measured = req[0] >= self.measure_from
        if measured:
            self.tries += 1
            self.tries_to[i] += 1
            key = req[3]
            if key >= 0 and step.attempt == 1:
                first = self.first_to[key]
                if first == -1:
                    self.first_to[key] = i
                elif first != i:
                    self.first_to[key] = -2
        connect = 0.0
        idle = self.idle
        if idle[i] > 0:
            idle[i] -= 1
        else:
            connect = self.connect_s if self.connect_s < step.connect else step.connect
        # The callee sidecar, one thread per instance's agent.
        at = now + connect
        free = self.callee_free[i]
        at = (at if at > free else free) + self.hop()
        self.callee_free[i] = at
        outcome: tuple[str, str | int, float]
        limits = self.limits
        if limits is not None and not self._admit(limits[i], i, at):
            # Refused by this instance's share of the mesh-wide limit: a 429 from its
            # sidecar; the instance never sees the request.
            done, outcome, slow = at, ("limited", 429, connect), False
        else:
            rng = self.backend_rng[i]
            r = rng.random()
            slow = slow_fraction > 0.0 and rng.random() < slow_fraction
            if slow:
                service += slow_s
            servers = self.servers[i]
            if servers:
                start = max(at, heapq.heappop(servers))
                heapq.heappush(servers, start + service)
            else:
                start = at
            if r < reset:
                done, outcome = start, ("failed", "502", 0.0)
            else:
                done = start + service
                outcome = ("responded", 503 if r < fail else 200, connect)
        if done - now > step.per_try:
            done, outcome = now + step.per_try, ("failed", "504", 0.0)
        req[2] = (i, slow, outcome[1])
        self.seq += 1
        heapq.heappush(self.heap, (done, self.seq, _DONE, (req, outcome)))

    def _admit(self, limit: MeshRateLimit, i: int, at: float) -> bool:
        ok = limit.admit(at, SOURCE).ok
        if self.measure_from <= at < self.measure_to:
            if ok:
                self.admitted[i] += 1
            else:
                self.refused[i] += 1
        return ok

    def _end(self, now: float, req: list[Any], status: int,
             served: tuple[int, bool] | None) -> None:
        # (The breaker slot, if any, came back with ``tries.end()`` in ``_step``.)
        if req[0] < self.measure_from:
            return
        tries: Attempts | None = req[1]
        if tries is not None:
            self._count(tries.events)
        if status == 429 and served is not None:
            self.counts["rate_limited"] += 1
        key = req[3]
        if key >= 0:
            self.key_requests[key] += 1
        self.lat.append(now - req[0])
        self.status[status] = self.status.get(status, 0) + 1
        if served is not None:
            self.served[served[0]] += 1
            self.slowed += served[1]

    def _count(self, events: list[Event]) -> None:
        c = self.counts
        for ev in events:
            if isinstance(ev, Retrying):
                c["retries"] += 1
            elif isinstance(ev, Ejected):
                c["ejections"] += 1
            elif isinstance(ev, BudgetExhausted):
                c["budget_exhausted"] += 1
            elif isinstance(ev, BreakerRejected):
                c["breaker_rejected"] += 1

    def result(self) -> dict[str, Any]:
        n = max(1, len(self.lat))
        degraded = [i for i, s in enumerate(self.instances) if s.degraded]
        ok = self.status.get(200, 0)
        keys = [e.key for e in self.endpoints]
        out: dict[str, Any] = {
            "requests": len(self.lat),
            "latency_ms": _latency(self.lat),
            "success_rate": round(ok / n, 6),
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "share_degraded": round(sum(self.served[i] for i in degraded) / n, 6),
            "share_slowed": round(self.slowed / n, 6),
            "served_by": dict(zip(keys, self.served, strict=True)),
            "share_by": {k: round(v / n, 6) for k, v in zip(keys, self.served, strict=True)},
            "tries_to": dict(zip(keys, self.tries_to, strict=True)),
            "tries": self.tries,
            **self.counts,
        }
        if self.rate_limit is not None and self.limits is not None:
            rl = self.rate_limit
            assert rl.rate is not None
            admitted = sum(self.admitted)
            t = self.tp.duration
            out["rate_limit"] = {
                "rate": rl.rate, "burst_s": rl.burst,
                "share": {k: round(lim.share or 0.0, 6)
                          for k, lim in zip(keys, self.limits, strict=True)},
                "admitted": dict(zip(keys, self.admitted, strict=True)),
                "refused": dict(zip(keys, self.refused, strict=True)),
                "admitted_total": admitted,
                "admitted_per_s": round(admitted / t, 3),
                "of_rate": round(admitted / (rl.rate * t), 6),
                "bound": round(rl.rate * (t + rl.burst), 3),
            }
        if self.first_to:
            seen = [f for f in self.first_to if f != -1]
            top = max(self.key_requests)
            out["hash_keys"] = {
                "keys": len(self.first_to), "seen": len(seen),
                "on_one_instance": round(sum(f >= 0 for f in seen) / max(1, len(seen)), 6),
                "top_key_share": round(top / n, 6),
            }
        return out


def _keys(rng: random.Random, n: int, dist: str, total: int) -> list[int]:
    """``total`` key indices of ``n``: uniform, or Zipf with exponent 1 (key k, from 0,
    with probability ∝ 1 / (k + 1))."""
    if dist == "uniform":
        return [rng.randrange(n) for _ in range(total)]
    cum = list(accumulate(1.0 / (k + 1) for k in range(n)))
    top = cum[-1]
    last = n - 1
    draw = rng.random
    return [min(bisect_right(cum, draw() * top), last) for _ in range(total)]


def _poisson(rng: random.Random, rate: float, total: int) -> list[float]:
    t = 0.0
    out = []
    for _ in range(total):
        t += rng.expovariate(rate)
        out.append(t)
    return out


# ---- the scenario ------------------------------------------------------------------------


def run_traffic(tp: TrafficParams, progress: Progress | None = None) -> dict[str, Any]:
    """Every balancer of ``tp.balancers`` over the variant; one report dict."""
    tp.validate()
    name, instances = parse_variant(tp.variant)
    t0 = time.perf_counter()
    rows: dict[str, Any] = {}
    events = 0
    simulated = 0
    virtual = 0.0
    for algorithm in tp.balancers:
        run = _Run(tp, algorithm, instances)
        run.run(progress)
        rows[algorithm] = run.result()
        events += run.events
        simulated += round(tp.rate * (tp.warmup + tp.duration))
        virtual = max(virtual, run.caller_free)
    seconds = time.perf_counter() - t0
    fault = parse_fault(tp.fault_delay, tp.fault_abort)
    limit = parse_rate_limit(tp.rate_limit)
    params = {k: v for k, v in asdict(tp).items() if k != "resilience"}
    params["balancers"] = list(tp.balancers)
    return {
        "scenario": "traffic",
        "params": params,
        "config": {"variant": name,
                   "instances": [asdict(s) | {"degraded": s.degraded} for s in instances],
                   # (each balancer's run sets the balancer section to its own)
                   "resilience": tp.spec().to_json(),
                   "weights": list(tp.weights or (1,) * len(instances)),
                   "fault": fault.to_json() if fault is not None else None,
                   "rate_limit": limit.to_json() if limit is not None else None,
                   "hash_keys": ({"keys": tp.hash_keys, "dist": tp.hash_dist, "header":
                                  HASH_HEADER} if tp.hash_keys else None)},
        "result": {"balancers": rows},
        "sim": {"events": events, "requests": simulated, "virtual_s": round(virtual, 6)},
        "wall": {"seconds": round(seconds, 3),
                 "requests_per_s": round(simulated / max(seconds, 1e-9))},
    }


def traffic_params(p: Params) -> TrafficParams:
    """The sim CLI's ``Params`` as ``TrafficParams``: ``--seed`` and ``--duration``, the
    traffic options in ``p.extra`` (``TrafficParams`` field names)."""
    fields = {k: v for k, v in p.extra.items() if k in TrafficParams.__dataclass_fields__}
    tp = TrafficParams(seed=p.seed, **fields)
    if p.duration is not None:
        tp.duration = p.duration
    return tp


def traffic(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """``rumor sim traffic``."""
    return run_traffic(traffic_params(p), progress)


def summary(report: dict[str, Any]) -> str:
    """The human table of a traffic report."""
    p = report["params"]
    cfg = report["config"]
    head = (f"rumor sim traffic: variant {cfg['variant']} "
            f"({', '.join(_describe(s) for s in cfg['instances'])}), {p['rate']:g} req/s "
            f"{p['arrivals']}, {p['duration']:g} s measured after {p['warmup']:g} s, "
            f"seed {p['seed']}, sidecar {p['hop_ms']:g} ms per hop")
    cols = ["balancer", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "success",
            "to degraded", "slowed", "retries", "ejections"]
    rows = []
    for name, r in report["result"]["balancers"].items():
        lat = r["latency_ms"]
        rows.append([name, _f(lat.get("p50")), _f(lat.get("p99")), _f(lat.get("p99_9")),
                     _f(lat.get("max")), f"{r['success_rate'] * 100:.3f}%",
                     f"{r['share_degraded'] * 100:.2f}%", f"{r['share_slowed'] * 100:.2f}%",
                     str(r["retries"]), str(r["ejections"])])
    widths = [max(len(x[i]) for x in [cols, *rows]) for i in range(len(cols))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [cols, *rows]]
    table.insert(1, "  ".join("-" * w for w in widths))
    extra = _extra_lines(report)
    w = report["wall"]
    return "\n\n".join([head, "\n".join(table), *extra,
                        f"simulator: {report['sim']['requests']} requests, "
                        f"{report['sim']['events']} events in {w['seconds']:.2f} wall s "
                        f"({w['requests_per_s']} requests/s)"])


def _extra_lines(report: dict[str, Any]) -> list[str]:
    """The fault, rate-limit and hash figures, when those layers ran."""
    cfg = report["config"]
    rows = report["result"]["balancers"]
    out: list[str] = []
    if cfg["fault"] is not None:
        rule = cfg["fault"]["rules"][0]
        what = []
        if rule["delay"]:
            what.append(f"delay {rule['delay']['duration']} to {rule['delay']['percent']:g}%")
        if rule["abort"]:
            a = rule["abort"]
            what.append(f"abort {'reset' if a.get('reset') else a['status']} to "
                        f"{a['percent']:g}%")
        out.append(f"fault ({', '.join(what)}), per balancer: " + "; ".join(
            f"{b} {r['fault_delayed']} delayed, {r['fault_aborted']} aborted"
            for b, r in rows.items()))
    if cfg["rate_limit"] is not None:
        lines = []
        for b, r in rows.items():
            rl = r["rate_limit"]
            per = ", ".join(f"{k} {v}/{rl['refused'][k]}" for k, v in rl["admitted"].items())
            lines.append(f"  {b}: {rl['admitted_per_s']:g}/s = {rl['of_rate'] * 100:.1f}% "
                         f"of R (at most {rl['bound']:g} in all); admitted/refused {per}")
        rl0 = next(iter(rows.values()))["rate_limit"]
        shares = ", ".join(f"{k} {v:g}/s" for k, v in rl0["share"].items())
        out.append(f"rate limit {rl0['rate']:g}/s, burst {rl0['burst_s']:g} s (shares "
                   f"{shares}), admitted in the measured window:\n" + "\n".join(lines))
    if cfg["hash_keys"] is not None:
        hk = cfg["hash_keys"]
        lines = [f"  {b}: " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in r["share_by"].items())
                 + f"; keys whose first tries all went to one instance "
                 f"{r['hash_keys']['on_one_instance'] * 100:.1f}%"
                 for b, r in rows.items()]
        out.append(f"{hk['keys']} {hk['dist']} keys, share of answers per instance:\n"
                   + "\n".join(lines))
    return out


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _describe(s: dict[str, Any]) -> str:
    out = f"{s['delay_ms']:g}"
    if s["slow_fraction"]:
        out += f":{s['slow_fraction']:g}:{s['slow_ms']:g}"
    for k, label in (("fail_503", "503"), ("reset", "reset"), ("concurrency", "conc")):
        if s[k]:
            out += f"+{label}={s[k]:g}"
    return out
