# layer: shell — the inbound listener: runs the pipeline's cores, does the I/O
"""The inbound listener: other sidecars' requests enter the host through here.

It serves the services this agent announces: the service is the ``Host`` the caller's
sidecar set, the instance its ``x-rumor-instance`` (any local instance of the service
when absent). Before anything is forwarded, the ``access`` policy decides whether the
caller may call it; the caller is who its sidecar says it is (``x-rumor-source``)
until mutual TLS ties that to a certificate. A refusal is a 403 with the reason in
``x-rumor-error``, counted and logged, and the body is never forwarded. Accepted
requests go to the local service over pooled connections, bodies streaming.

A request that already carries this listener's loop mark in ``Via`` (or passed
``MAX_HOPS`` sidecars) is refused with 508: the local service is, say, registered at
one of this agent's own listeners, and would send it round again.

Mesh headers are consumed here: the local service sees neither ``x-rumor-*`` headers
nor hop-by-hop ones, and gets ``x-forwarded-for`` and the trace context.

The layers, in order: **route** (the service and the local instance, loop check) →
**access** (who calls, by its certificate under mutual TLS) → **rate limit** (this
instance's share of the mesh-wide limit) → **exchange** (pooled connection to the
local process) → **observe** (the one ``Observer``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..policy.documents import RateLimitSpec
from ..policy.evaluate import Evaluator
from .errors import ErrorCode, try_failure_code
from .headers import (
    MESH_HEADERS,
    SAMPLE_ALL,
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
from .identity import Identity
from .mesh_view import MeshView
from .observe import Exchange, NullObserver, Observer, RateLimited, RequestEnd
from .pool import TryFailed, UpstreamPool
from .protocols import HTTP
from .ratelimit import MeshRateLimit, retry_after_header
from .relay import Forward, Reply, Request, request_head_start, simple_reply
from .sockio import Watchdog
from .tls import MeshTls

log = logging.getLogger("rumor.proxy")

#: How long the local service may take to produce response headers. The caller's
#: policy sets the real deadline; this only bounds a stuck local service.
LOCAL_TIMEOUT = 300.0
LOCAL_CONNECT_TIMEOUT = 2.0
#: Request bodies up to this size go to the local service in the head's write.
BUFFERED_BODY = 64 * 1024


#: Longest a rate limit's share is kept without re-reading the live instances.
RESIZE_INTERVAL = 1.0
#: The key the local instances of a service go by in their own limiter.
LOCAL_KEY = "(this agent)"


@dataclass(slots=True)
class _HeldLimit:
    spec: RateLimitSpec
    version: int
    at: float
    limit: MeshRateLimit


class InboundProxy:
    def __init__(self, mesh: MeshView, evaluator: Callable[[], Evaluator], *,
                 observer: Observer | None = None, tls: MeshTls | None = None,
                 agent: str = "", pool: UpstreamPool | None = None,
                 trace_threshold: int = SAMPLE_ALL) -> None:
        self.mesh = mesh
        self.agent = agent
        self._ids = random.Random()  # trace ids: seeded from the OS, once
        #: New traces are sampled below this (``headers.sample_threshold``).
        self.trace_threshold = trace_threshold
        #: This listener's loop mark in ``Via``.
        self.mark = hop_mark(random.Random())
        self._evaluator = evaluator
        self.observer: Observer = observer or NullObserver()
        #: With mutual TLS, identities come from certificates (ours and the caller's).
        self.tls = tls
        #: Keeps the deadlines of this listener's sockets (run by its ``serve_proxy``).
        self.watchdog = Watchdog()
        self.pool = pool or UpstreamPool(self.watchdog)
        self._denied_logged: set[tuple[str, str]] = set()
        self._limits: dict[str, _HeldLimit] = {}

    async def __call__(self, req: Request) -> Reply | Forward:
        source_raw = req.header(b"x-rumor-source")
        x = Exchange("inbound", req.method, req.target, req.client, trio.current_time(),
                     source=source_raw.decode("ascii", "replace") if source_raw else None,
                     headers=req.headers)
        self.observer.request_started(x)
        # route
        try:
            target = parse_target(req.target, req.header(b"host"))
        except TargetError as e:
            return self._refuse(x, 400, ErrorCode.BAD_TARGET, str(e))
        x.service = service = target.service
        loop = check_hops(req.headers, self.mark)
        if loop is not None:
            return self._refuse(x, 508, ErrorCode.LOOP_DETECTED, loop)
        local = self._local(service, req.header(b"x-rumor-instance"))
        if local is None:
            return self._refuse(x, 404, ErrorCode.NOT_SERVED_HERE,
                                f"{service} is not served by this agent")
        host, port, instance, declared = local
        x.instance = instance
        if declared != HTTP:  # grpc/http2 take HTTP/2 streams, tcp the mesh TCP preamble
            return self._refuse(x, 505, ErrorCode.PROTOCOL_MISMATCH,
                                f"{service} is declared {declared} on this agent: its "
                                "callers' sidecars must not send it HTTP/1.1")
        # access
        ev = self._evaluator()
        refused = self._access(req.peer, x, ev)
        if refused is not None:
            return refused
        # rate limit
        found = ev.ratelimit(service)
        if found is not None:
            limited = self._rate_limit(x, found[0], found[1])
            if limited is not None:
                return limited
        # exchange
        hs = end_to_end(req.headers, drop=MESH_HEADERS)
        forwarded_for(hs, req.client.rsplit(":", 1)[0])
        trace, x.parent_span, x.span, x.sampled = continue_trace(hs, self._ids,
                                                                 self.trace_threshold)
        x.trace = trace.decode()
        add_hop(hs, self.mark)
        body = await req.take_body(BUFFERED_BODY)
        framing = req.framing(body)
        if framing is not None:
            hs.append(framing)
        head = request_head_start(req.method, target.path, hs) + b"\r\n"
        now = trio.current_time()
        try:
            resp = await self.pool.exchange(req.method, (host, port), head, body,
                                            connect_deadline=now + LOCAL_CONNECT_TIMEOUT,
                                            deadline=now + LOCAL_TIMEOUT,
                                            informational=req.informational)
        except TryFailed as f:
            if req.failure is not None:
                raise req.failure from None
            code = try_failure_code(f.condition, inbound=True, bad_response=f.bad_response)
            return self._refuse(x, f.status, code, f"local service {instance}: {f}")
        x.status = resp.head.status
        x.headers_at = trio.current_time()
        return Forward(resp, response_headers(resp.head.headers), self.pool,
                       on_done=RequestEnd(self.observer, x, None, trio.current_time))

    def _rate_limit(self, x: Exchange, name: str, spec: RateLimitSpec) -> Reply | None:
        """This instance's share of the mesh-wide limit: None to go on, else the 429."""
        now = trio.current_time()
        limit = self._limit_of(x.service, spec, now)
        admission = limit.admit(now, x.source)
        if admission.ok:
            return None
        self.observer.decided(x, RateLimited(admission.limit))
        if admission.limit == "total":
            what, share = "the mesh-wide limit", limit.share
        else:
            source = admission.limit.removeprefix("source:")
            what, share = f"the limit for callers {source!r}", limit.source_share(source)
        out = self._refuse(x, 429, ErrorCode.RATE_LIMITED,
                           f"{what} of {x.service} is used up (this instance's share: "
                           f"{share or 0:.3g}/s)", policy=f"ratelimit/{name}")
        out.headers.append((b"retry-after", retry_after_header(admission.retry_after)))
        return out

    def _limit_of(self, service: str, spec: RateLimitSpec, now: float) -> MeshRateLimit:
        """The service's limiter, re-sized when the instances gossip knows change (the
        mesh view's version) and at least every ``RESIZE_INTERVAL``."""
        held = self._limits.get(service)
        version = self.mesh.version
        if held is not None and held.spec is spec and held.version == version \
                and now - held.at < RESIZE_INTERVAL:
            return held.limit
        own, live = self._weights(service)
        if held is None or held.spec is not spec:
            limit = MeshRateLimit(spec, instance=LOCAL_KEY, own_weight=own, live_weights=live)
            if len(self._limits) >= 4096:
                self._limits.clear()
        else:
            limit = held.limit
            limit.resize(own, live, now=now)
        self._limits[service] = _HeldLimit(spec, version, now, limit)
        return limit

    def _weights(self, service: str) -> tuple[float, dict[str, float]]:
        """(this agent's weight for ``service``: its local instances', the other live
        instances' weights by key)."""
        local = list(self.mesh.local_instances(service))
        mine = {li.key for li in local}
        own = float(sum(li.weight for li in local))
        live = {e.key: float(e.weight) for e in self.mesh.endpoints(service)
                if e.key not in mine}
        return own, live

    def _access(self, peer: Identity | None, x: Exchange, ev: Evaluator) -> Reply | None:
        """None if the caller (``peer``: its certificate under mutual TLS) may call the
        service, else the 403. (Shared with the HTTP/2 inbound, ``h2_inbound.py``.)"""
        service = x.service
        holds: frozenset[str] = frozenset()
        if self.tls is not None:
            refused, x.source = verified_source(self.tls, peer, service, x.source)
            if refused:
                return self._deny(x, refused, None)
            x.secured = True
            if peer is not None:  # a caller naming several services: judged by all
                holds = peer.services
        decision = ev.access_as(x.source, holds, service)
        if not decision.allowed:
            x.source = decision.source
            return self._deny(x, decision.reason, decision.policy)
        return None

    def _deny(self, x: Exchange, reason: str, policy: str | None) -> Reply:
        key = (x.service, x.source or "")
        if key not in self._denied_logged and len(self._denied_logged) < 4096:
            self._denied_logged.add(key)
            log.warning("denied %s -> %s: %s", x.source or "(unknown caller)", x.service,
                        reason, extra={"event": "access_denied", "service": x.service,
                                       "source": x.source})
        return self._refuse(x, 403, ErrorCode.ACCESS_DENIED, reason,
                            policy=f"access/{policy}" if policy else None)

    def _local(self, service: str, instance: bytes | None,
               ) -> tuple[str, int, str, str] | None:
        """(address, port, id, declared protocol) of the local instance to serve (the
        named one if given)."""
        wanted = instance.decode("ascii", "replace") if instance else None
        fallback = None
        for li in self.mesh.local_instances(service):
            addr = (li.host, li.port, li.id, li.protocol)
            if wanted is None or li.id == wanted:
                return addr
            fallback = fallback or addr
        return fallback  # the named instance is gone (deregistered): any of the service

    def _refuse(self, x: Exchange, status: int, code: ErrorCode, reason: str, *,
                policy: str | None = None) -> Reply:
        x.status, x.code, x.reason, x.policy = status, code, reason, policy
        out = simple_reply(status, reason, code=code, agent=self.agent, service=x.service,
                           instances=(x.instance,) if x.instance else (), policy=policy)
        out.on_done = RequestEnd(self.observer, x, None, trio.current_time)
        return out

    def close(self) -> None:
        self.pool.close()


def verified_source(tls: MeshTls, peer: Identity | None, service: str,
                    claimed: str | None) -> tuple[str, str | None]:
    """(reason to refuse or "", the caller's identity) over mutual TLS: the caller may
    call as a service its certificate names, never as another; and this host serves
    only services its own certificate names. (Shared with the mesh TCP inbound.)"""
    if not tls.identity.names(service):
        return (f"this host's certificate does not name service {service!r}", claimed)
    if peer is None:
        return ("no client certificate", claimed)
    if claimed is not None:
        if not peer.names(claimed):
            return (f"the caller's certificate (node {peer.node or '?'}) does not name "
                    f"service {claimed!r}", claimed)
        return "", claimed
    only = next(iter(peer.services)) if len(peer.services) == 1 else None
    return "", only
