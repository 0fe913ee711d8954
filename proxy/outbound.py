"""The outbound listener: an application's requests leave the host through here.

For each request: find the service it names (``Host: web``, ``web.service.rumor``, or
an absolute-form proxy request), apply the ``route`` policy (weighted subsets, header
rules), keep only instances that are visible, not critical, reachable through a
sidecar and not ejected, pick one by power of two choices over peak-EWMA latency,
and forward to that instance's *inbound* listener, declaring who is calling
(``x-rumor-source``). Failures are retried within the ``resilience`` policy: only
idempotent requests (or connect failures, which the upstream never saw), only with a
retry budget left, with jittered backoff, preferring an instance not tried yet.

Everything the proxy answers itself is fast and says why in ``x-rumor-error``: an
unknown service, no healthy instance, an open circuit breaker, a timeout. It never
hangs a client: every wait has a deadline from the policy.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from ..gossip.address import parse_address
from ..gossip.node import Node
from ..policy.documents import ALL_INSTANCES, CONNECT_FAILURE, ResilienceSpec
from ..policy.evaluate import Evaluator
from .access_log import AccessLog
from .balancer import Balancer
from .headers import (
    MESH_HEADERS,
    TargetError,
    continue_trace,
    end_to_end,
    forwarded_for,
    parse_target,
    response_headers,
)
from .metrics import ProxyMetrics
from .resilience import CircuitBreaker, OutlierDetector, RetryBudgetTracker, backoff
from .stream_server import ClientGone, Incoming, Outgoing, simple_response
from .tls import MeshTls
from .upstream import TryFailed, Upstreams

log = logging.getLogger("rumor.proxy")

#: Member tag through which an agent advertises its inbound listener.
INBOUND_TAG = "rumor.inbound"
#: Request bodies up to this size are kept so that the request can be retried.
RETRY_BUFFER = 64 * 1024
#: Longest a cached endpoint list is trusted without a catalog change.
ENDPOINT_CACHE_TTL = 1.0



@dataclass(frozen=True, slots=True)
class Endpoint:
    key: str  # node/instance id: the balancer's and the ejector's identity
    node: str
    instance: str
    version: str
    tags: tuple[str, ...]
    host: str  # the node's inbound listener
    port: int
    rtt: float | None


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
        self.upstreams = Upstreams(tls=tls)
        self._services: dict[str, ServiceState] = {}
        self._endpoints: dict[str, tuple[int, float, list[Endpoint]]] = {}

    # ---- the request path -------------------------------------------------------------------

    async def __call__(self, req: Incoming) -> Outgoing:
        started = trio.current_time()
        try:
            target = parse_target(req.target, req.header(b"host"))
        except TargetError as e:
            return self._answer(req, started, "", 400, str(e))
        service = target.service
        ev = self._evaluator()
        spec = ev.resilience(service)
        state = self._state(service, spec)
        if not state.breaker.try_acquire():
            if self.metrics:
                self.metrics.breaker_rejections.labels(self.metrics.service(service)).inc()
            return self._answer(req, started, service, 503,
                                f"circuit breaker open: {spec.circuit_breaker.max_requests} "
                                f"requests already in flight to {service}")
        handed_off = False
        try:
            out = await self._forward(req, started, target.path, service, ev, state)
            handed_off = out.release is not None
            if handed_off:
                upstream_release = out.release

                async def release() -> None:
                    state.breaker.release()
                    assert upstream_release is not None
                    await upstream_release()
                out.release = release
            return out
        finally:
            if not handed_off:
                state.breaker.release()

    async def _forward(self, req: Incoming, started: float, path: bytes, service: str,
                       ev: Evaluator, state: ServiceState) -> Outgoing:
        endpoints = self._endpoints_of(service)
        if not endpoints:
            known = bool(self.node.parts.catalog.instances(service, include_critical=True))
            return self._answer(req, started, service, 503,
                                f"no healthy instance of {service}" if known
                                else f"unknown service {service!r}")
        subset = ALL_INSTANCES
        if ev.policy_name("route", service) is not None:  # decode headers only for rules
            decision = ev.route(service, {k.decode("latin-1"): v.decode("latin-1")
                                          for k, v in req.headers})
            if decision.split:
                subset = decision.choose(self.rng.random())
        cands = [e for e in endpoints if subset.matches(e.version, e.tags)]
        if not cands:
            return self._answer(req, started, service, 503,
                                f"no healthy instance of {service} in subset {subset.name}")

        spec = state.spec
        policy = spec.retries
        state.budget.record_request(started)
        deadline = started + spec.timeouts.overall
        method = req.method.decode("ascii", "replace")
        body: bytes | AsyncIterator[bytes] | None = None
        replayable = True
        if req.has_body:
            length = req.content_length
            if length is not None and length <= RETRY_BUFFER:
                body = await req.read_all(RETRY_BUFFER)
            else:
                body = req.body()
                replayable = False  # streamed once; only an unsent body may be retried
        headers = self._request_headers(req, service, body)
        trace = _trace_of(headers)
        tried: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            now = trio.current_time()
            ep = self._choose(now, cands, tried, state)
            tried.add(ep.key)
            per_try = min(spec.timeouts.per_try, deadline - now)
            if per_try <= 0:
                return self._answer(req, started, service, 504,
                                    f"overall timeout {spec.timeouts.overall:g} s passed",
                                    attempts=attempt - 1, trace=trace)
            # A try with no idle pooled connection waits for a new one: the breaker's
            # ``max_pending`` bounds such tries (counted until the try ends; fast 503
            # beyond it).
            waits = not self.upstreams.has_idle(ep.host, ep.port)
            if waits and not state.breaker.try_enqueue():
                if self.metrics:
                    self.metrics.breaker_rejections.labels(self.metrics.service(service)).inc()
                return self._answer(req, started, service, 503,
                                    f"circuit breaker open: {spec.circuit_breaker.max_pending} "
                                    f"requests already waiting for a connection to {service}",
                                    attempts=attempt - 1, trace=trace)
            self.balancer.start(ep.key, now)
            hs = [*headers, (b"x-rumor-instance", ep.instance.encode())]
            try:
                try:
                    resp = await self.upstreams.send(
                        req.method, ep.host, ep.port, path, hs, body,
                        connect_timeout=min(spec.timeouts.connect, per_try),
                        per_try_timeout=per_try, service=service)
                finally:
                    if waits:
                        state.breaker.dequeue()
            except TryFailed as f:
                done = trio.current_time()
                self.balancer.finish(ep.key, done, done - now, False)
                self._record(state, service, ep, done, False, len(endpoints))
                if (attempt < policy.attempts and policy.retryable(method, f.condition)
                        and (replayable or f.condition == CONNECT_FAILURE)
                        and await self._may_retry(state, service, policy, attempt, deadline)):
                    continue
                return self._answer(req, started, service, f.status,
                                    f"{ep.node}/{ep.instance}: {f}", attempts=attempt,
                                    instance=ep.key, trace=trace)
            except ClientGone:
                done = trio.current_time()
                self.balancer.finish(ep.key, done, done - now, True)
                raise
            done = trio.current_time()
            status = resp.status
            ok = status < 500
            # Latency of the instance: without this try's connection setup (a new
            # connection's TCP and TLS handshakes would brand it slow for a while).
            self.balancer.finish(ep.key, done, done - now - resp.connect_seconds, ok)
            self._record(state, service, ep, done, ok, len(endpoints))
            if (status in (502, 503, 504) and attempt < policy.attempts and replayable
                    and policy.retryable(method, str(status))
                    and await self._may_retry(state, service, policy, attempt, deadline,
                                              release=resp.release)):
                continue
            return self._respond(req, started, done, service, ep, resp.status, resp.headers,
                                 resp.body(), resp.release, attempt, trace)

    # ---- helpers of the request path ---------------------------------------------------------

    def _choose(self, now: float, cands: list[Endpoint], tried: set[str],
                state: ServiceState) -> Endpoint:
        for back, _ in state.outliers.readmit(now):
            # A fresh start: the failures that got it ejected are already paid for,
            # and its penalised latency would otherwise keep it idle for a minute.
            self.balancer.forget([back])
            self._seed(e for e in cands if e.key == back)
            log.info("readmitted %s after its ejection", back,
                     extra={"event": "readmitted", "instance": back})
        live = [e for e in cands if not state.outliers.is_ejected(now, e.key)] or cands
        fresh = [e for e in live if e.key not in tried] or live
        by_key = {e.key: e for e in fresh}
        picked = self.balancer.pick(now, list(by_key))
        assert picked is not None
        return by_key[picked]

    async def _may_retry(self, state: ServiceState, service: str, policy: Any,
                         attempt: int, deadline: float, release: Any = None) -> bool:
        now = trio.current_time()
        if not state.budget.try_retry(now):
            if self.metrics:
                self.metrics.budget_exhausted.labels(self.metrics.service(service)).inc()
            return False
        if release is not None:
            await release()
        pause = backoff(self.rng, policy, attempt)
        if now + pause >= deadline:
            return False
        if self.metrics:
            self.metrics.retries.labels(self.metrics.service(service)).inc()
        await trio.sleep(pause)
        return True

    def _record(self, state: ServiceState, service: str, ep: Endpoint, now: float, ok: bool,
                total: int) -> None:
        if state.outliers.record(now, ep.key, ok, total=total):
            log.warning("ejected %s of %s for %.0f s after consecutive failures", ep.key,
                        service, state.outliers.ejected_until(ep.key) - now,
                        extra={"event": "ejected", "service": service, "instance": ep.key})
            if self.metrics:
                self.metrics.ejections.labels(self.metrics.service(service), ep.key).inc()

    def _request_headers(self, req: Incoming, service: str,
                         body: bytes | AsyncIterator[bytes] | None) -> list[tuple[bytes, bytes]]:
        hs = end_to_end(req.headers, drop=MESH_HEADERS | {b"host"})
        forwarded_for(hs, req.client.rsplit(":", 1)[0])
        continue_trace(hs, self.rng)
        hs.append((b"host", service.encode()))
        if self.identity:
            hs.append((b"x-rumor-source", self.identity.encode()))
        if isinstance(body, bytes):
            hs.append((b"content-length", str(len(body)).encode()))
        elif body is not None:
            hs.append((b"transfer-encoding", b"chunked"))
        return hs

    def _respond(self, req: Incoming, started: float, headers_at: float, service: str,
                 ep: Endpoint, status: int, upstream_headers: list[tuple[bytes, bytes]],
                 body: AsyncIterator[bytes], release: Any, attempts: int,
                 trace: str) -> Outgoing:
        hs = response_headers(upstream_headers)
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
        return Outgoing(status, hs, body, release=release, on_done=done)

    def _answer(self, req: Incoming, started: float, service: str, status: int, reason: str,
                *, attempts: int = 0, instance: str = "", trace: str = "") -> Outgoing:
        out = simple_response(status, reason)
        if self.metrics:
            self.metrics.request_done("outbound", service, instance, status)

        def done(sent: int, complete: bool) -> None:
            if self.access_log:
                self.access_log.write(self._entry(req, service, status, started, sent,
                                                  attempts, trace, instance=instance,
                                                  error=reason))
        out.on_done = done
        return out

    def _entry(self, req: Incoming, service: str, status: int, started: float, sent: int,
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

    def _seed(self, endpoints: Iterable[Endpoint]) -> None:
        for e in endpoints:
            if e.rtt is not None:
                self.balancer.seed(e.key, e.rtt)

    async def aclose(self) -> None:
        await self.upstreams.aclose()


def _trace_of(headers: list[tuple[bytes, bytes]]) -> str:
    for k, v in headers:
        if k == b"traceparent":
            return v[3:35].decode()
    return ""
