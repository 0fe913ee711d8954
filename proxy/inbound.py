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
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import trio

from ..gossip.node import Node
from ..policy.evaluate import Evaluator
from .access_log import AccessLog
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
from .pool import TryFailed, UpstreamPool
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


class InboundProxy:
    def __init__(self, node: Node, evaluator: Callable[[], Evaluator], *,
                 metrics: ProxyMetrics | None = None,
                 access_log: AccessLog | None = None, tls: MeshTls | None = None) -> None:
        self.node = node
        self._ids = random.Random()  # trace ids: seeded from the OS, once
        #: This listener's loop mark in ``Via``.
        self.mark = hop_mark(random.Random())
        self._evaluator = evaluator
        self.metrics = metrics
        self.access_log = access_log
        #: With mutual TLS, identities come from certificates (ours and the caller's).
        self.tls = tls
        #: Keeps the deadlines of this listener's sockets (run by its ``serve_proxy``).
        self.watchdog = Watchdog()
        self.pool = UpstreamPool(self.watchdog)
        self._denied_logged: set[tuple[str, str]] = set()

    async def __call__(self, req: Request) -> Reply | Forward:
        started = trio.current_time()
        source_raw = req.header(b"x-rumor-source")
        source = source_raw.decode("ascii", "replace") if source_raw else None
        try:
            target = parse_target(req.target, req.header(b"host"))
        except TargetError as e:
            return self._answer(req, started, "", source, 400, str(e))
        service = target.service
        loop = check_hops(req.headers, self.mark)
        if loop is not None:
            return self._answer(req, started, service, source, 508, loop)
        local = self._local(service, req.header(b"x-rumor-instance"))
        if local is None:
            return self._answer(req, started, service, source, 404,
                                f"{service} is not served by this agent")
        holds: frozenset[str] = frozenset()
        if self.tls is not None:
            refused, source = self._verified_source(req, service, source)
            if refused:
                return self._deny(req, started, service, source, refused)
            if req.peer is not None:  # a caller naming several services: judged by all
                holds = req.peer.services
        decision = self._evaluator().access_as(source, holds, service)
        if not decision.allowed:
            return self._deny(req, started, service, decision.source, decision.reason)
        host, port, instance = local
        hs = end_to_end(req.headers, drop=MESH_HEADERS)
        forwarded_for(hs, req.client.rsplit(":", 1)[0])
        trace = continue_trace(hs, self._ids).decode()
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
            return self._answer(req, started, service, source, f.status,
                                f"local service {instance}: {f}", instance=instance,
                                trace=trace)
        headers_at = trio.current_time()
        if self.metrics:
            self.metrics.observe_latency("inbound", service, headers_at - started)
        status = resp.head.status

        def done(sent: int, complete: bool) -> None:
            if self.metrics:
                self.metrics.request_done("inbound", service, instance, status)
            if self.access_log:
                self.access_log.write(self._entry(
                    req, service, source, status, started, sent, trace, instance=instance,
                    upstream_ms=round((headers_at - started) * 1000, 3),
                    error=None if complete else "response not completed"))
        return Forward(resp, response_headers(resp.head.headers), self.pool, on_done=done)

    def _verified_source(self, req: Request, service: str,
                         claimed: str | None) -> tuple[str, str | None]:
        """(reason to refuse or "", the caller's identity) over mutual TLS: the caller
        may call as a service its certificate names, never as another; and this host
        serves only services its own certificate names."""
        assert self.tls is not None
        if not self.tls.identity.names(service):
            return (f"this host's certificate does not name service {service!r}", claimed)
        peer = req.peer
        if peer is None:
            return ("no client certificate", claimed)
        if claimed is not None:
            if not peer.names(claimed):
                return (f"the caller's certificate (node {peer.node or '?'}) does not name "
                        f"service {claimed!r}", claimed)
            return "", claimed
        only = next(iter(peer.services)) if len(peer.services) == 1 else None
        return "", only

    def _deny(self, req: Request, started: float, service: str, source: str | None,
              reason: str) -> Reply:
        if self.metrics:
            self.metrics.denied.inc((self.metrics.service(service),
                                     self.metrics.caller(source)))
        key = (service, source or "")
        if key not in self._denied_logged and len(self._denied_logged) < 4096:
            self._denied_logged.add(key)
            log.warning("denied %s -> %s: %s", source or "(unknown caller)", service,
                        reason, extra={"event": "access_denied", "service": service,
                                       "source": source})
        return self._answer(req, started, service, source, 403, reason)

    def _local(self, service: str, instance: bytes | None) -> tuple[str, int, str] | None:
        """Address of the local instance to serve (the named one if given)."""
        wanted = instance.decode("ascii", "replace") if instance else None
        fallback = None
        for sid, ls in self.node.parts.catalog.local.items():
            s = ls.service
            if s.name != service:
                continue
            addr = (s.address or "127.0.0.1", s.port, sid)
            if wanted is None or sid == wanted:
                return addr
            fallback = fallback or addr
        return fallback  # the named instance is gone (deregistered): any of the service

    def _answer(self, req: Request, started: float, service: str, source: str | None,
                status: int, reason: str, *, instance: str = "",
                trace: str = "") -> Reply:
        out = simple_reply(status, reason)
        if self.metrics:
            self.metrics.request_done("inbound", service, instance, status)

        def done(sent: int, complete: bool) -> None:
            if self.access_log:
                self.access_log.write(self._entry(req, service, source, status, started, sent,
                                                  trace, instance=instance, error=reason))
        out.on_done = done
        return out

    def _entry(self, req: Request, service: str, source: str | None, status: int,
               started: float, sent: int, trace: str, **extra: Any) -> dict[str, Any]:
        return {"listener": "inbound", "method": req.method.decode("ascii", "replace"),
                "path": req.target.decode("ascii", "replace")[:512], "service": service,
                "status": status,
                "duration_ms": round((trio.current_time() - started) * 1000, 3),
                "bytes": sent, "client": req.client, "source": source, "trace_id": trace,
                **extra}

    def close(self) -> None:
        self.pool.close()
