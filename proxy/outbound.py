# layer: shell — the outbound listener: runs the pipeline's cores, does the I/O
"""The outbound listener: an application's requests leave the host through here.

A request runs through the pipeline's layers in order (docs/architecture.md):

1. **route** — find the service it names (``Host: web``, ``web.service.rumor``, or an
   absolute-form proxy request), refuse a loop (508: this listener's mark already in
   ``Via``, or ``MAX_HOPS`` passed), and let the ``route`` policy pick the subset
   (its rules match path, method, query and headers; a weighted split draws here) and
   the header edits;
2. **fault** — the ``fault`` policy may delay the request or abort it, as a failing
   dependency would (never retried, never counted against an instance);
3. **balance and try** — the attempt core (``attempts.py``) takes a breaker slot,
   picks an instance (``balancers``), sets each try's deadline, and decides retries
   within the retry budget;
4. **exchange** — ``pool.py`` sends the try to the instance's *inbound* listener and
   returns its response head; the relay streams the rest;
5. **observe** — one ``Observer`` (metrics, access log, ...) is told of the start,
   every try and the end.

The decisions are sans-IO cores; this module only runs them in order and does the I/O.
What depends on the destination (its endpoints, subsets, resilience state, fault table)
is a ``Target``, built once per service and rebuilt only when the catalog or the
policies change, so a request costs lookups, not decisions.

Everything the proxy answers itself is fast and says why: ``x-rumor-error`` (a phrase),
``x-rumor-error-code`` (a stable code, ``errors.py``) and a short JSON body naming the
agent, the service, the tries and the policy that decided.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..policy.documents import ALL_INSTANCES, NO_EDITS, HeaderEdits, ResilienceSpec, Subset
from ..policy.evaluate import Evaluator, RouteNeeds
from .attempts import (
    STALE_CONNECTION,
    Answer,
    Attempts,
    Ejected,
    Endpoint,
    Readmitted,
    Send,
    ServiceState,
    Wait,
)
from .errors import ERROR_CODE_HEADER, ErrorCode
from .faults import FaultTable
from .headers import (
    MESH_HEADERS,
    SAMPLE_ALL,
    TargetError,
    add_hop,
    check_hops,
    continue_trace,
    cookie_value,
    end_to_end,
    forwarded_for,
    hop_mark,
    parse_target,
    response_headers,
)
from .mesh_view import INBOUND_TAG, MeshView
from .observe import Exchange, FaultInjected, NullObserver, Observer, RequestEnd
from .pool import TryFailed, UpstreamPool, UpstreamResponse
from .protocols import H2_PROTOCOLS, HTTP
from .relay import Forward, Reply, Request, ResetConnection, request_head_start, simple_reply
from .route import header_view, route_request
from .sockio import Watchdog
from .tls import MeshTls

log = logging.getLogger("rumor.proxy")

#: Request bodies up to this size are kept so that the request can be retried.
RETRY_BUFFER = 64 * 1024
#: Longest a target's endpoint list is trusted without a catalog change (a member's
#: inbound tag can change without one).
ENDPOINT_CACHE_TTL = 1.0
#: Targets kept at most: names come from requests, unknown ones are not kept.
MAX_TARGETS = 4096


@dataclass(slots=True)
class Target:
    """Everything about one destination service that does not change per request."""

    service: str
    state: ServiceState
    #: The policies it was built from (a new ``Evaluator`` rebuilds the policy parts).
    evaluator: Evaluator
    #: What the route rules read of a request (None: no route document).
    needs: RouteNeeds | None
    #: The fault policy in force ("fault/NAME", its compiled rules), if any.
    faults: tuple[str, FaultTable] | None
    #: Header names the route rules or the fault rules consult (decoded per request).
    consulted: frozenset[bytes]
    endpoints: list[Endpoint] = field(default_factory=list)
    mesh_version: int = -1
    refreshed: float = float("-inf")
    #: subset name -> (the subset, its endpoints), for the current endpoint list.
    subsets: dict[str, tuple[Subset, list[Endpoint]]] = field(default_factory=dict)
    #: (id of a candidate list, "h1" or "h2") -> (that list, those of it that take it).
    wires: dict[tuple[int, str], tuple[list[Endpoint], list[Endpoint]]] = field(
        default_factory=dict)

    def speaking(self, cands: list[Endpoint], wire: str) -> list[Endpoint]:
        """The candidates a request arriving as ``wire`` may go to: HTTP/1.1 ("h1") to
        instances declared http, HTTP/2 ("h2") to those declared grpc or http2 whose
        agent carries h2. A lookup per request, a scan per candidate list."""
        cached = self.wires.get((id(cands), wire))
        if cached is not None and cached[0] is cands:
            return cached[1]
        out = [e for e in cands if (e.protocol == HTTP if wire == "h1" else
                                    e.protocol in H2_PROTOCOLS and "h2" in e.carries)]
        if len(self.wires) >= 64:
            self.wires.clear()
        self.wires[(id(cands), wire)] = (cands, cands if len(out) == len(cands) else out)
        return self.wires[(id(cands), wire)][1]

    def candidates(self, subset: Subset) -> list[Endpoint]:
        """The endpoints of ``subset``: a lookup per request, a scan per change."""
        if subset is ALL_INSTANCES:
            return self.endpoints
        cached = self.subsets.get(subset.name)
        if cached is not None and cached[0] is subset:
            return cached[1]
        cands = [e for e in self.endpoints if subset.matches(e.version, e.tags)]
        self.subsets[subset.name] = (subset, cands)
        return cands


class OutboundProxy:
    def __init__(self, mesh: MeshView, evaluator: Callable[[], Evaluator], *,
                 identity: str | None, observer: Observer | None = None,
                 decay: float = 10.0, rng: random.Random | None = None,
                 tls: MeshTls | None = None, agent: str = "",
                 pool: UpstreamPool | None = None, trace_threshold: int = SAMPLE_ALL) -> None:
        self.mesh = mesh
        self._evaluator = evaluator
        #: New traces are sampled below this (``headers.sample_threshold``).
        self.trace_threshold = trace_threshold
        self.identity = identity
        self.agent = agent
        self.observer: Observer = observer or NullObserver()
        self.rng = rng or random.Random()
        self.decay = decay
        #: This listener's loop mark in ``Via``.
        self.mark = hop_mark(random.Random())
        #: Keeps the deadlines of this listener's sockets (run by its ``serve_proxy``).
        self.watchdog = Watchdog()
        self.pool = pool or UpstreamPool(self.watchdog, tls=tls)
        self._secured = tls is not None
        self._targets: dict[str, Target] = {}

    # ---- the pipeline -------------------------------------------------------------------

    async def __call__(self, req: Request) -> Reply | Forward:
        x = Exchange("outbound", req.method, req.target, req.client, trio.current_time(),
                     source=self.identity, secured=self._secured, headers=req.headers)
        self.observer.request_started(x)
        # 1. route
        try:
            parsed = parse_target(req.target, req.header(b"host"))
        except TargetError as e:
            return self._refuse(x, 400, ErrorCode.BAD_TARGET, str(e))
        x.service = service = parsed.service
        loop = check_hops(req.headers, self.mark)
        if loop is not None:
            return self._refuse(x, 508, ErrorCode.LOOP_DETECTED, loop)
        ev = self._evaluator()
        target = self._target(service, ev)
        if not target.endpoints:
            if self.mesh.knows(service):
                return self._refuse(x, 503, ErrorCode.NO_HEALTHY_INSTANCE,
                                    f"no healthy instance of {service}")
            return self._refuse(x, 503, ErrorCode.UNKNOWN_SERVICE, f"unknown service {service!r}")
        view = header_view(req.headers, target.consulted) if target.consulted else {}
        routed = route_request(ev, service, target.needs, method=req.method,
                               target=parsed.path, view=view, rng=self.rng)
        x.route_rule = routed.rule
        # 2. fault
        if target.faults is not None:
            aborted = await self._fault(x, target, view)
            if aborted is not None:
                return aborted
        cands = target.candidates(routed.subset)
        if not cands:
            return self._refuse(x, 503, ErrorCode.NO_INSTANCE_IN_SUBSET,
                                f"no healthy instance of {service} in subset "
                                f"{routed.subset.name}", policy=_policy(ev, "route", service))
        cands = target.speaking(cands, "h1")
        if not cands:
            return self._refuse(x, 505, ErrorCode.PROTOCOL_MISMATCH,
                                mismatch(service, target.endpoints, "h1"))
        # 3. balance and try, 4. exchange
        return await self._try(req, x, target, cands, parsed.path, routed.edits)

    async def _fault(self, x: Exchange, target: Target,
                     view: dict[str, str]) -> Reply | None:
        """An injected fault: hold the request for its delay (which counts toward the
        overall timeout: the attempt core's clock started at the request's arrival),
        then answer with the abort's status or reset the connection. An abort never
        reaches the breaker, the balancer, the ejector or the retry budget."""
        assert target.faults is not None
        policy, table = target.faults
        fault = table.decide(source=self.identity, headers=view, route_rule=x.route_rule,
                             rng=self.rng)
        if fault is None:
            return None
        x.fault = fault.rule
        if fault.delay > 0:
            x.fault_delay = fault.delay
            self.observer.decided(x, FaultInjected(fault.rule, "delay"))
            await trio.sleep(fault.delay)
        if fault.reset:
            self.observer.decided(x, FaultInjected(fault.rule, "reset"))
            x.status, x.code, x.policy = 0, ErrorCode.FAULT_RESET, policy
            x.reason = f"connection reset by fault rule {fault.rule!r} of {policy}"
            self.observer.request_ended(x, trio.current_time(), 0, False)
            raise ResetConnection
        if fault.abort_status is not None:
            self.observer.decided(x, FaultInjected(fault.rule, "abort"))
            return self._refuse(x, fault.abort_status, ErrorCode.FAULT_ABORT,
                                f"aborted by fault rule {fault.rule!r} of {policy}",
                                policy=policy)
        return None

    async def _try(self, req: Request, x: Exchange, target: Target, cands: list[Endpoint],
                   path: bytes, edits: HeaderEdits) -> Reply | Forward:
        service = target.service
        body = await req.take_body(RETRY_BUFFER)
        headers = self._request_headers(req, x, req.framing(body), edits)
        start = request_head_start(req.method, path, headers)
        tries = Attempts.begin(x.started, target.state, target.state.balancer, cands,
                               service=service, total=len(target.endpoints),
                               method=req.method.decode("ascii", "replace"),
                               replayable=not callable(body), rng=self.rng,
                               hash_key=_hash_key(req, target.state.spec))
        try:
            now = trio.current_time()
            step: Send | Answer = tries.next(now)
            while True:
                refused = step if isinstance(step, Answer) else tries.start(
                    now, new_connection=step.fresh or not self.pool.has_idle(
                        step.endpoint.host, step.endpoint.port))
                if refused is not None:
                    self._decisions(x, tries)
                    tries.end()
                    return self._give_up(x, refused)
                assert isinstance(step, Send)
                ep = step.endpoint
                x.tries, x.instance = step.attempt, ep.key
                self.observer.try_started(x, ep, now)
                head = start + b"x-rumor-instance: " + ep.instance.encode() + b"\r\n\r\n"
                try:
                    try:
                        resp = await self.pool.exchange(
                            req.method, (ep.host, ep.port), head, body,
                            connect_deadline=now + step.connect, deadline=now + step.per_try,
                            service=service, informational=req.informational,
                            fresh=step.fresh, resend_stale=False)
                    except trio.Cancelled:
                        # The client left (relay.py) or the agent stops: not the instance's
                        # fault, and its outstanding count must come down.
                        tries.client_gone(trio.current_time())
                        self.observer.try_ended(x, ep, trio.current_time(), "client-gone")
                        raise
                    finally:
                        tries.connection_done()
                except TryFailed as f:
                    now = trio.current_time()
                    if req.failure is not None:  # the client broke off its upload
                        tries.client_gone(now)
                        self.observer.try_ended(x, ep, now, "client-gone")
                        raise req.failure from None
                    self.observer.try_ended(x, ep, now, f.condition)
                    if f.condition == STALE_CONNECTION:
                        step = tries.stale(now)
                        self._decisions(x, tries)
                        continue
                    after = tries.failed(now, f.condition, str(f), f.bad_response)
                    self._decisions(x, tries)
                    if isinstance(after, Answer):
                        tries.end()
                        return self._give_up(x, after)
                    await trio.sleep_until(after.until)
                    now = trio.current_time()
                    step = tries.next(now)
                    continue
                done = trio.current_time()
                self.observer.try_ended(x, ep, done, str(resp.head.status))
                status = resp.head.status
                outcome = tries.responded(done, status, resp.connect_seconds,
                                          rate_limited=status == 429
                                          and _mesh_code(resp) == ErrorCode.RATE_LIMITED.encode())
                self._decisions(x, tries)
                if isinstance(outcome, Wait):
                    resp.conn.close()  # its body is not wanted: the connection cannot be reused
                    await trio.sleep_until(outcome.until)
                    now = trio.current_time()
                    step = tries.next(now)
                    continue
                return self._respond(x, done, resp, tries)
        except BaseException:
            tries.end()
            raise

    # ---- answers ----------------------------------------------------------------------

    def _respond(self, x: Exchange, headers_at: float, resp: UpstreamResponse,
                 tries: Attempts) -> Forward:
        x.status = resp.head.status
        x.headers_at = headers_at
        return Forward(resp, response_headers(resp.head.headers), self.pool,
                       on_done=RequestEnd(self.observer, x, tries, trio.current_time))

    def _give_up(self, x: Exchange, a: Answer) -> Reply:
        if a.endpoint is not None:
            x.instance = a.endpoint.key
        x.tries = a.attempts
        return self._refuse(x, a.status, a.code, a.reason, instances=a.tried,
                            last_failure=a.reason if a.tried else None,
                            policy=_policy(self._evaluator(), "resilience", x.service))

    def _refuse(self, x: Exchange, status: int, code: ErrorCode, reason: str, *,
                policy: str | None = None, instances: tuple[str, ...] = (),
                last_failure: str | None = None) -> Reply:
        """An answer the sidecar makes itself: the phrase, the code, and a body that
        says who decided and what was tried."""
        x.status, x.code, x.reason, x.policy = status, code, reason, policy
        out = simple_reply(status, reason, code=code, agent=self.agent, service=x.service,
                           tries=x.tries, instances=instances, last_failure=last_failure,
                           policy=policy)
        out.on_done = RequestEnd(self.observer, x, None, trio.current_time)
        return out

    def _decisions(self, x: Exchange, tries: Attempts) -> None:
        """Log what the attempt core decided, and pass it to the observer."""
        for e in tries.take_events():
            if isinstance(e, Ejected):
                log.warning("ejected %s of %s for %.0f s after consecutive failures", e.key,
                            x.service, e.until - trio.current_time(),
                            extra={"event": "ejected", "service": x.service,
                                   "instance": e.key})
            elif isinstance(e, Readmitted):
                log.info("readmitted %s after its ejection", e.key,
                         extra={"event": "readmitted", "instance": e.key})
            self.observer.decided(x, e)

    # ---- helpers ------------------------------------------------------------------------

    def _request_headers(self, req: Request, x: Exchange, framing: tuple[bytes, bytes] | None,
                         edits: HeaderEdits = NO_EDITS) -> list[tuple[bytes, bytes]]:
        service = x.service
        hs = end_to_end(req.headers, drop=MESH_HEADERS | {b"host"})
        if edits:  # the route rule's (the parser keeps them off mesh and framing headers)
            hs = edits.apply(hs)
        forwarded_for(hs, req.client.rsplit(":", 1)[0])
        trace, x.parent_span, x.span, x.sampled = continue_trace(hs, self.rng,
                                                                 self.trace_threshold)
        x.trace = trace.decode()
        add_hop(hs, self.mark)
        hs.append((b"host", service.encode()))
        if self.identity:
            hs.append((b"x-rumor-source", self.identity.encode()))
        if framing is not None:
            hs.append(framing)
        return hs

    # ---- targets ------------------------------------------------------------------------

    def _target(self, service: str, ev: Evaluator) -> Target:
        """The service's target, rebuilt where the policies or the catalog changed."""
        t = self._targets.get(service)
        if t is None:
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            t = Target(service, ServiceState(ev.resilience(service), self.rng, self.decay),
                       ev, *_policy_parts(ev, service))
            self._targets[service] = t
        elif t.evaluator is not ev:
            self._repolicy(t, ev)
        now = trio.current_time()  # the one clock: a MockClock drives it in tests
        version = self.mesh.version
        if t.mesh_version != version or now - t.refreshed >= ENDPOINT_CACHE_TTL:
            self._refresh(t, version, now)
        return t

    def _repolicy(self, t: Target, ev: Evaluator) -> None:
        spec: ResilienceSpec = ev.resilience(t.service)
        if t.state.spec is not spec and t.state.spec != spec:
            t.state.update(spec)
        t.evaluator = ev
        t.needs, t.faults, t.consulted = _policy_parts(ev, t.service)
        t.subsets.clear()  # new Subset objects

    def _refresh(self, t: Target, version: int, now: float) -> None:
        t.endpoints = self.mesh.endpoints(t.service)
        t.mesh_version, t.refreshed = version, now
        t.subsets.clear()
        # Per refresh, not per request: cold-start estimates from the gossip RTT (the
        # balancer ignores a seed once it has measured), and no state kept for
        # instances that are gone.
        balancer = t.state.balancer
        for e in t.endpoints:
            if e.rtt is not None:
                balancer.seed(e.key, e.rtt)
        if not t.endpoints and not self.mesh.knows(t.service):
            self._targets.pop(t.service, None)  # an unknown name: not kept
        keys = {e.key for e in t.endpoints}
        balancer.forget_except(keys)
        t.state.outliers.forget_except(keys)

    def stream_target(self, service: str) -> tuple[Evaluator, Target]:
        """The policies and the service's cached target, for the HTTP/2 handler
        (``h2_outbound.py``): one cache for both protocols."""
        ev = self._evaluator()
        return ev, self._target(service, ev)

    def close(self) -> None:
        self.pool.close()


def _policy_parts(ev: Evaluator, service: str,
                  ) -> tuple[RouteNeeds | None, tuple[str, FaultTable] | None, frozenset[bytes]]:
    """What a target keeps of the policies: route needs, compiled faults, and the
    header names either consults."""
    needs = ev.route_needs(service)
    found = ev.fault(service)
    faults = (f"fault/{found[0]}", FaultTable(found[1])) if found is not None else None
    consulted = (needs.headers if needs is not None else frozenset()) | (
        faults[1].header_names if faults is not None else frozenset())
    return needs, faults, consulted


def mismatch(service: str, endpoints: list[Endpoint], wire: str) -> str:
    """Why no instance of ``service`` takes a request arriving as ``wire``."""
    declared = sorted({e.protocol for e in endpoints})
    if "tcp" in declared:
        return (f"service {service} is declared tcp: connect through an upstream port "
                f"(--upstream {service}=HOST:PORT)")
    if wire == "h1":
        return (f"service {service} is declared {'/'.join(declared)}: call it over HTTP/2 "
                "(h2c with prior knowledge, as gRPC clients do)")
    if any(e.protocol in H2_PROTOCOLS for e in endpoints):
        return (f"no instance of {service} is behind an agent that carries HTTP/2 (their "
                "agents are older than this release): upgrade them")
    return (f"service {service} is declared {'/'.join(declared)}: call it over HTTP/1.1, "
            "or register it with protocol=grpc or http2")


def _hash_key(req: Request, spec: ResilienceSpec) -> bytes | None:
    """What a ``hash`` balancer hashes: the configured header or cookie (None: absent,
    and for every other balancer)."""
    on = spec.balancer.hash_on
    if on is None:
        return None
    if on.header is not None:
        return req.header(on.header.encode("latin-1"))
    assert on.cookie is not None
    return cookie_value(req.headers, on.cookie.encode("latin-1"))


def _mesh_code(resp: UpstreamResponse) -> bytes | None:
    """The reason code of an answer the callee's sidecar made itself."""
    for k, v in resp.head.headers:
        if k == ERROR_CODE_HEADER:
            return v
    return None


def _policy(ev: Evaluator, kind: str, service: str) -> str | None:
    name = ev.policy_name(kind, service)
    return f"{kind}/{name}" if name is not None else None


__all__ = ["INBOUND_TAG", "OutboundProxy", "RequestEnd", "Target"]
