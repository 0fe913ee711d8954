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
  (``peak_ewma``, ``least_request``, ``round_robin``, ``random``), with the same
  defaults (slow start included).

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

Every figure is a pure function of the parameters and the seed, except what sits under
``wall``. Each balancer of ``balancers`` runs on the same arrivals and the same
per-instance streams of slow and failing draws (common random numbers), so their
figures differ by the balancer alone.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, cast

from ..policy.documents import BalancerSpec, ResilienceSpec
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
from .engine import gc_paused

if TYPE_CHECKING:
    from .scenarios import Params

Progress = Callable[[float, float], None]

SERVICE = "bench"

# ---- balancers -------------------------------------------------------------------------


def make_sim_balancer(algorithm: str, rng: random.Random,
                      decay: float = DEFAULT_DECAY) -> LoadBalancer:
    """The proxy's own balancer for ``algorithm`` (``proxy/balancers.py``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"balancer {algorithm!r} is not in the simulator; "
                         f"choose from {', '.join(ALGORITHMS)}")
    return make_balancer(BalancerSpec(algorithm), rng, decay)


ALGORITHMS = ("peak_ewma", "least_request", "round_robin", "random")

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


@dataclass(slots=True)
class TrafficParams:
    seed: int = 1
    rate: float = 1000.0
    #: Measured seconds (after ``warmup``).
    duration: float = 30.0
    warmup: float = 2.0
    arrivals: str = "uniform"
    variant: str = "fixed50"
    balancers: tuple[str, ...] = ALGORITHMS
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
        parse_variant(self.variant)

    def spec(self) -> ResilienceSpec:
        spec = self.resilience or ResilienceSpec.default(SERVICE)
        if self.attempts is not None:
            spec = replace(spec, retries=replace(spec.retries, attempts=self.attempts))
        return spec


# ---- the request path: the only code that talks to Attempts ----------------------------


def _begin(now: float, state: ServiceState, balancer: LoadBalancer,
           candidates: list[Endpoint], rng: random.Random) -> Attempts:
    return Attempts.begin(now, state, balancer, candidates, service=SERVICE,
                          total=len(candidates), method="GET", replayable=True, rng=rng)


def _step(tries: Attempts, now: float, outcome: tuple[str, str | int, float] | None,
          has_idle: Callable[[Endpoint], bool]) -> Send | float | Answer | Deliver:
    """Advance one request's tries. ``outcome`` is how the last try ended: None (there
    was none, or a back-off ended), ``("failed", condition, 0)``, ``("responded", status,
    connect_seconds)``. Returns the try to make now (a ``Send`` the core has started),
    the time to call again after backing off, or the request's end."""
    if outcome is not None:
        tries.connection_done()
        kind, what, connect_s = outcome
        after = (tries.failed(now, str(what)) if kind == "failed"
                 else tries.responded(now, int(what), connect_s))
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

_BEGIN, _TRY, _DONE = 1, 2, 3


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
    """One balancer over the variant: an event heap on virtual time."""

    def __init__(self, tp: TrafficParams, algorithm: str,
                 instances: tuple[InstanceSpec, ...]) -> None:
        self.tp = tp
        self.instances = instances
        seed = tp.seed
        self.balancer = make_sim_balancer(algorithm, random.Random(f"balancer:{seed}"),
                                          tp.decay)
        self.state = ServiceState(tp.spec())
        self.rng = random.Random(f"attempts:{seed}")
        self.backend_rng = [random.Random(f"backend:{seed}:{i}")
                            for i in range(len(instances))]
        rtt = tp.rtt_ms / 1000.0
        self.endpoints = [Endpoint(f"b{i + 1}", f"callee{i}", f"b{i + 1}", "", (),
                                   "127.0.0.1", 0, rtt) for i in range(len(instances))]
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
        # figures
        self.lat: list[float] = []
        self.status: dict[int, int] = {}
        self.served = [0] * n  # answers (measured) by the instance that gave them
        self.tries_to = [0] * n
        self.slowed = 0
        self.counts = {"retries": 0, "ejections": 0, "budget_exhausted": 0,
                       "breaker_rejected": 0}
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
        self.measure_from = tp.warmup
        interval = 1.0 / tp.rate
        arrivals = ([i * interval for i in range(total)] if tp.arrivals == "uniform"
                    else _poisson(random.Random(f"arrivals:{tp.seed}"), tp.rate, total))
        heap = self.heap
        pop = heapq.heappop
        hop = self.hop
        end = tp.warmup + tp.duration
        # The caller sidecar takes the requests first come first served (one thread),
        # so they begin in arrival order: one pending begin at a time in the heap.
        k = 0
        if total:
            self.caller_free = arrivals[0] + hop()
            self.push(self.caller_free, _BEGIN, [arrivals[0], None, None])
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
                        self.push(ready, _BEGIN, [sched, None, None])
                        if progress is not None and k % 4096 == 0:
                            progress(t, end)
                    self._begin(t, data)
                elif kind == _TRY:
                    self._try(t, data, None)
                else:
                    req, outcome = data
                    self._try(t, req, outcome)

    def _begin(self, now: float, req: list[Any]) -> None:
        breaker = self.state.breaker
        if not breaker.try_acquire():
            if req[0] >= self.measure_from:
                self.counts["breaker_rejected"] += 1
            self._end(now, req, 503, None)
            return
        req[1] = _begin(now, self.state, self.balancer, self.endpoints, self.rng)
        self._try(now, req, None)

    def _try(self, now: float, req: list[Any], outcome: tuple[str, str | int, float] | None,
             ) -> None:
        tries: Attempts = req[1]
        step = _step(tries, now, outcome, self.has_idle)
        if outcome is not None and outcome[0] == "responded" and not isinstance(step, float):
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
        if req[0] >= self.measure_from:
            self.tries += 1
            self.tries_to[i] += 1
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
        outcome: tuple[str, str | int, float]
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

    def _end(self, now: float, req: list[Any], status: int,
             served: tuple[int, bool] | None) -> None:
        tries: Attempts | None = req[1]
        if tries is not None:
            self.state.breaker.release()
        if req[0] < self.measure_from:
            return
        if tries is not None:
            self._count(tries.events)
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
        return {
            "requests": len(self.lat),
            "latency_ms": _latency(self.lat),
            "success_rate": round(ok / n, 6),
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "share_degraded": round(sum(self.served[i] for i in degraded) / n, 6),
            "share_slowed": round(self.slowed / n, 6),
            "served_by": {self.endpoints[i].key: v for i, v in enumerate(self.served)},
            "tries_to": {self.endpoints[i].key: v for i, v in enumerate(self.tries_to)},
            "tries": self.tries,
            **self.counts,
        }


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
    params = {k: v for k, v in asdict(tp).items() if k != "resilience"}
    params["balancers"] = list(tp.balancers)
    return {
        "scenario": "traffic",
        "params": params,
        "config": {"variant": name,
                   "instances": [asdict(s) | {"degraded": s.degraded} for s in instances],
                   "resilience": tp.spec().to_json()},
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
    w = report["wall"]
    return "\n\n".join([head, "\n".join(table),
                        f"simulator: {report['sim']['requests']} requests, "
                        f"{report['sim']['events']} events in {w['seconds']:.2f} wall s "
                        f"({w['requests_per_s']} requests/s)"])


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
