"""The outbound listener: an application's requests leave the host through here.

For each request: find the service it names (``Host: web``, ``web.service.rumor``, or
an absolute-form proxy request), apply the ``route`` policy (weighted subsets, header
rules), keep only instances that are visible, not critical, reachable through a
sidecar and not ejected, pick one by power of two choices over peak-EWMA latency,
and forward to that instance's *inbound* listener, declaring who is calling
(``x-rumor-source``). Failures are retried within the ``resilience`` policy: only
idempotent requests (or connect failures, which the upstream never saw), only with a
retry budget left, with jittered backoff, preferring an instance not tried yet.

Every request leaving here carries this listener's mark in ``Via``; one that arrives
already carrying it has come round a loop (a service registered at this port, say) and
gets 508 at once, as does one that passed ``MAX_HOPS`` sidecars (``headers.py``).

Everything the proxy answers itself is fast and says why in ``x-rumor-error``: an
unknown service, no healthy instance, an open circuit breaker, a timeout. It never
hangs a client: every wait has a deadline from the policy.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ..gossip.address import parse_address
from ..gossip.node import Node
from ..policy.documents import ALL_INSTANCES, ResilienceSpec, Subset
from ..policy.evaluate import Evaluator
from .access_log import AccessLog
from .attempts import (
    Answer,
    Attempts,
    BreakerRejected,
    BudgetExhausted,
    Ejected,
    Endpoint,
    Readmitted,
    Retrying,
    Send,
    ServiceState,
    Wait,
)
from .balancer import Balancer
from .headers import (
    MESH_HEADERS,
    TargetError,
    add_hop,
    check_hops,
    continue_trace,
    end_to_end,
    forwarded_for,
    hop_mark,
    parse_target,
    response_headers,
)
from .metrics import ProxyMetrics
from .pool import TryFailed, UpstreamPool, UpstreamResponse
from .relay import Forward, Reply, Request, request_head_start, simple_reply
from .sockio import Watchdog
from .tls import MeshTls

log = logging.getLogger("rumor.proxy")

#: Member tag through which an agent advertises its inbound listener.
INBOUND_TAG = "rumor.inbound"
#: Request bodies up to this size are kept so that the request can be retried.
RETRY_BUFFER = 64 * 1024
#: Longest a cached endpoint list is trusted without a catalog change.
ENDPOINT_CACHE_TTL = 1.0


class OutboundProxy:
    def __init__(self, node: Node, evaluator: Callable[[], Evaluator], *,
                 identity: str | None, metrics: ProxyMetrics | None = None,
                 access_log: AccessLog | None = None, decay: float = 10.0,
                 rng: random.Random | None = None, tls: MeshTls | None = None) -> None:
        self.node = node
        self._evaluator = evaluator
        self.identity = identity
        self.metrics = metrics
        self.access_log = access_log
        self.rng = rng or random.Random()
        self.balancer = Balancer(self.rng, decay=decay)
        #: This listener's loop mark in ``Via``.
        self.mark = hop_mark(random.Random())
        #: Keeps the deadlines of this listener's sockets (run by its ``serve_proxy``).
        self.watchdog = Watchdog()
        self.pool = UpstreamPool(self.watchdog, tls=tls)
        self._services: dict[str, ServiceState] = {}
        self._endpoints: dict[str, tuple[int, float, list[Endpoint]]] = {}
        #: (service, subset name) -> (the endpoint list and subset it was built from,
        #: the subset's endpoints): rebuilt only when the catalog view or the policy
        #: (a new Evaluator, so new Subset objects) changed.
        self._subsets: dict[tuple[str, str], tuple[list[Endpoint], Subset, list[Endpoint]]] = {}

    # ---- the request path -------------------------------------------------------------------

    async def __call__(self, req: Request) -> Reply | Forward:
        started = trio.current_time()
        try:
            target = parse_target(req.target, req.header(b"host"))
        except TargetError as e:
            return self._answer(req, started, "", 400, str(e))
        service = target.service
        loop = check_hops(req.headers, self.mark)
        if loop is not None:
            return self._answer(req, started, service, 508, loop)
        ev = self._evaluator()
        spec = ev.resilience(service)
        state = self._state(service, spec)
        if not state.breaker.try_acquire():
            if self.metrics:
                self.metrics.breaker_rejections.inc((self.metrics.service(service),))
            return self._answer(req, started, service, 503,
                                f"circuit breaker open: {spec.circuit_breaker.max_requests} "
                                f"requests already in flight to {service}")
        handed_off = False
        try:
            out = await self._forward(req, started, target.path, service, ev, state)
            if isinstance(out, Forward):
                out.release = state.breaker.release  # once the response is over
                handed_off = True
            return out
        finally:
            if not handed_off:
                state.breaker.release()

    async def _forward(self, req: Request, started: float, path: bytes, service: str,
                       ev: Evaluator, state: ServiceState) -> Reply | Forward:
        endpoints = self._endpoints_of(service)
        if not endpoints:
            known = bool(self.node.parts.catalog.instances(service, include_critical=True))
            return self._answer(req, started, service, 503,
                                f"no healthy instance of {service}" if known
                                else f"unknown service {service!r}")
        subset = ALL_INSTANCES
        consulted = ev.route_headers(service)
        if consulted is not None:
            # Only the headers the route's rules look at are decoded (the first
            # spelling of a name wins, as in Evaluator.route).
            view: dict[str, str] = {}
            if consulted:
                for k, v in req.headers:
                    if k in consulted:
                        view.setdefault(k.decode("latin-1"), v.decode("latin-1"))
            decision = ev.route(service, view)
            if decision.split:
                subset = decision.choose(self.rng.random())
        cands = self._candidates(service, subset, endpoints)
        if not cands:
            return self._answer(req, started, service, 503,
                                f"no healthy instance of {service} in subset {subset.name}")

        body = await req.take_body(RETRY_BUFFER)
        headers = self._request_headers(req, service, req.framing(body))
        trace = _trace_of(headers)
        start = request_head_start(req.method, path, headers)
        tries = Attempts.begin(started, state, self.balancer, cands, service=service,
                               total=len(endpoints), method=req.method.decode("ascii", "replace"),
                               replayable=not callable(body), rng=self.rng)
        while True:
            now = trio.current_time()
            step = tries.next(now)
            refused = step if isinstance(step, Answer) else tries.start(
                now, new_connection=not self.pool.has_idle(step.endpoint.host,
                                                           step.endpoint.port))
            if refused is not None:
                self._events(tries, service)
                return self._give_up(req, started, service, refused, trace)
            assert isinstance(step, Send)
            ep = step.endpoint
            head = start + b"x-rumor-instance: " + ep.instance.encode() + b"\r\n\r\n"
            try:
                try:
                    resp = await self.pool.exchange(
                        req.method, (ep.host, ep.port), head, body,
                        connect_deadline=now + step.connect, deadline=now + step.per_try,
                        service=service, informational=req.informational)
                except trio.Cancelled:
                    # The client left (relay.py) or the agent stops: not the instance's
                    # fault, and its outstanding count must come down.
                    tries.client_gone(trio.current_time())
                    raise
                finally:
                    tries.connection_done()
            except TryFailed as f:
                if req.failure is not None:  # the client broke off its upload
                    tries.client_gone(trio.current_time())
                    raise req.failure from None
                after = tries.failed(trio.current_time(), f.condition, str(f))
                self._events(tries, service)
                if isinstance(after, Answer):
                    return self._give_up(req, started, service, after, trace)
                await trio.sleep_until(after.until)
                continue
            done = trio.current_time()
            outcome = tries.responded(done, resp.head.status, resp.connect_seconds)
            self._events(tries, service)
            if isinstance(outcome, Wait):
                resp.conn.close()  # its body is not wanted: the connection cannot be reused
                await trio.sleep_until(outcome.until)
                continue
            return self._respond(req, started, done, service, ep, resp, outcome.attempts,
                                 trace)

    def _give_up(self, req: Request, started: float, service: str, a: Answer,
                 trace: str) -> Reply:
        return self._answer(req, started, service, a.status, a.reason, attempts=a.attempts,
                            instance=a.endpoint.key if a.endpoint else "", trace=trace)

    def _events(self, tries: Attempts, service: str) -> None:
        """Log and count what the attempt core reported."""
        m = self.metrics
        label = m.service(service) if m else ""
        for e in tries.take_events():
            if isinstance(e, Ejected):
                log.warning("ejected %s of %s for %.0f s after consecutive failures", e.key,
                            service, e.until - trio.current_time(),
                            extra={"event": "ejected", "service": service, "instance": e.key})
                if m:
                    m.ejections.inc((label, e.key))
            elif isinstance(e, Readmitted):
                log.info("readmitted %s after its ejection", e.key,
                         extra={"event": "readmitted", "instance": e.key})
            elif m is None:
                continue
            elif isinstance(e, Retrying):
                m.retries.inc((label,))
            elif isinstance(e, BudgetExhausted):
                m.budget_exhausted.inc((label,))
            elif isinstance(e, BreakerRejected):
                m.breaker_rejections.inc((label,))

    # ---- helpers of the request path ---------------------------------------------------------


    def _request_headers(self, req: Request, service: str,
                         framing: tuple[bytes, bytes] | None) -> list[tuple[bytes, bytes]]:
        hs = end_to_end(req.headers, drop=MESH_HEADERS | {b"host"})
        forwarded_for(hs, req.client.rsplit(":", 1)[0])
        continue_trace(hs, self.rng)
        add_hop(hs, self.mark)
        hs.append((b"host", service.encode()))
        if self.identity:
            hs.append((b"x-rumor-source", self.identity.encode()))
        if framing is not None:
            hs.append(framing)
        return hs

    def _respond(self, req: Request, started: float, headers_at: float, service: str,
                 ep: Endpoint, resp: UpstreamResponse, attempts: int, trace: str) -> Forward:
        status = resp.head.status
        if self.metrics:
            self.metrics.observe_latency("outbound", service, headers_at - started)

        def done(sent: int, complete: bool) -> None:
            if self.metrics:
                self.metrics.request_done("outbound", service, ep.key, status)
            if self.access_log:
                self.access_log.write(self._entry(
                    req, service, status, started, sent, attempts, trace,
                    instance=ep.key, upstream_ms=round((headers_at - started) * 1000, 3),
                    error=None if complete else "response not completed"))
        return Forward(resp, response_headers(resp.head.headers), self.pool, on_done=done)

    def _answer(self, req: Request, started: float, service: str, status: int, reason: str,
                *, attempts: int = 0, instance: str = "", trace: str = "") -> Reply:
        out = simple_reply(status, reason)
        if self.metrics:
            self.metrics.request_done("outbound", service, instance, status)

        def done(sent: int, complete: bool) -> None:
            if self.access_log:
                self.access_log.write(self._entry(req, service, status, started, sent,
                                                  attempts, trace, instance=instance,
                                                  error=reason))
        out.on_done = done
        return out

    def _entry(self, req: Request, service: str, status: int, started: float, sent: int,
               attempts: int, trace: str, **extra: Any) -> dict[str, Any]:
        return {"listener": "outbound", "method": req.method.decode("ascii", "replace"),
                "path": req.target.decode("ascii", "replace")[:512], "service": service,
                "status": status,
                "duration_ms": round((trio.current_time() - started) * 1000, 3),
                "bytes": sent, "attempts": attempts, "client": req.client,
                "source": self.identity, "trace_id": trace, **extra}

    # ---- endpoints ------------------------------------------------------------------------------

    def _state(self, service: str, spec: ResilienceSpec) -> ServiceState:
        st = self._services.get(service)
        if st is None:
            st = self._services[service] = ServiceState(spec)
        elif st.spec is not spec and st.spec != spec:
            st.update(spec)
        return st

    def _endpoints_of(self, service: str) -> list[Endpoint]:
        """Instances of ``service`` that can take traffic, cached until the catalog
        changes (the request path must not rebuild the catalog view every time)."""
        index = self.node.parts.catalog.index
        now = trio.current_time()  # the one clock: a MockClock drives it in tests
        cached = self._endpoints.get(service)
        if cached is not None and cached[0] == index and now - cached[1] < ENDPOINT_CACHE_TTL:
            return cached[2]
        members = self.node.core.members
        out: list[Endpoint] = []
        for inst in self.node.parts.catalog.instances(service):
            m = members.get(inst.node)
            inbound = m.meta.get(INBOUND_TAG) if m is not None else None
            if not inbound:
                continue  # no sidecar in front of it: nothing enforces its access policy
            try:
                host, port = parse_address(inbound)
            except ValueError:
                continue
            out.append(Endpoint(f"{inst.node}/{inst.id}", inst.node, inst.id, inst.version,
                                inst.tags, host, port, inst.rtt))
        self._endpoints[service] = (index, now, out)
        # Per refresh, not per request: cold-start estimates from the gossip RTT (the
        # balancer ignores a seed once it has measured), and no state kept for
        # instances that are gone.
        self._seed(out)
        keys = {e.key for eps in self._endpoints.values() for e in eps[2]}
        self.balancer.forget_except(keys)
        for st in self._services.values():
            st.outliers.forget_except(keys)
        return out

    def _candidates(self, service: str, subset: Subset, endpoints: list[Endpoint],
                    ) -> list[Endpoint]:
        """The endpoints of ``subset``: a lookup per request, a scan per change."""
        key = (service, subset.name)
        cached = self._subsets.get(key)
        if cached is not None and cached[0] is endpoints and cached[1] is subset:
            return cached[2]
        if len(self._subsets) > 4096:
            self._subsets.clear()
        cands = [e for e in endpoints if subset.matches(e.version, e.tags)]
        self._subsets[key] = (endpoints, subset, cands)
        return cands

    def _seed(self, endpoints: Iterable[Endpoint]) -> None:
        for e in endpoints:
            if e.rtt is not None:
                self.balancer.seed(e.key, e.rtt)

    def close(self) -> None:
        self.pool.close()


def _trace_of(headers: list[tuple[bytes, bytes]]) -> str:
    for k, v in headers:
        if k == b"traceparent":
            return v[3:35].decode()
    return ""
