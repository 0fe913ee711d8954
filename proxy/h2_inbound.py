# layer: shell — the inbound listener's HTTP/2 streams: runs the pipeline's cores, does the I/O
"""HTTP/2 from other sidecars (h2c, or mutual TLS with ALPN h2): each stream is one
call to a local instance declared ``grpc`` or ``http2``.

The layers are the HTTP/1.1 inbound's (``inbound.py``), run by the same
``InboundProxy`` so that access decisions, rate-limit shares and the denial log are
one: **route** (the service from ``:authority``, the instance from
``x-rumor-instance``, the loop check) → **access** (the caller's certificate under
mutual TLS) → **rate limit** → **exchange** (a stream to the local instance over h2c,
``H2Upstreams`` without TLS; the body streams both ways, trailers relayed) →
**observe**.

A stream for a service declared ``http`` or ``tcp`` here is refused with 505
``protocol_mismatch`` (a gRPC call: UNIMPLEMENTED), as an HTTP/1.1 request for a
``grpc``/``http2`` service is (``inbound.py``): a caller's sidecar that follows the
declarations never sends either. Refusals of a gRPC call are gRPC answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .errors import ErrorCode, try_failure_code
from .grpc import is_grpc, request_fields, status_of
from .h2_outbound import Ending, relay_response, send_reply, upload
from .headers import (
    MESH_HEADERS,
    TargetError,
    add_hop,
    check_hops,
    continue_trace,
    forwarded_for,
    parse_target,
)
from .inbound import LOCAL_CONNECT_TIMEOUT, LOCAL_TIMEOUT, InboundProxy
from .mesh_view import LocalInstance
from .observe import Exchange
from .pool import TryFailed
from .protocols import H2_PROTOCOLS
from .relay import Reply

if TYPE_CHECKING:
    from .h2_client import H2Call, H2Upstreams
    from .h2_server import H2Request


def _field(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


class H2Inbound:
    """The inbound listener's ``H2Handler``: one call to a local instance per stream."""

    def __init__(self, proxy: InboundProxy, upstreams: H2Upstreams) -> None:
        self.proxy = proxy
        self.upstreams = upstreams

    async def __call__(self, req: H2Request) -> None:
        p = self.proxy
        raw_source = _field(req.headers, b"x-rumor-source")
        x = Exchange("inbound", req.method, req.path, req.client, trio.current_time(),
                     source=raw_source.decode("ascii", "replace") if raw_source else None,
                     headers=req.headers)
        p.observer.request_started(x)
        grpc = is_grpc(req.headers)
        ending = Ending()
        try:
            refused = await self._serve(req, x, grpc, ending)
            if refused is not None:
                ending.done, refused.on_done = refused.on_done, None
                ending.sent, ending.complete = await send_reply(req, x, refused, grpc), True
        finally:
            ending.run()

    async def _serve(self, req: H2Request, x: Exchange, grpc: bool,
                     ending: Ending) -> Reply | None:
        p = self.proxy
        # route
        try:
            target = parse_target(req.path, req.authority or _field(req.headers, b"host"))
        except TargetError as e:
            return p._refuse(x, 400, ErrorCode.BAD_TARGET, str(e))
        x.service = service = target.service
        loop = check_hops(req.headers, p.mark)
        if loop is not None:
            return p._refuse(x, 508, ErrorCode.LOOP_DETECTED, loop)
        local = self._local(service, _field(req.headers, b"x-rumor-instance"))
        if local is None:
            return p._refuse(x, 404, ErrorCode.NOT_SERVED_HERE,
                             f"{service} is not served by this agent")
        x.instance = local.id
        if local.protocol not in H2_PROTOCOLS:
            return p._refuse(x, 505, ErrorCode.PROTOCOL_MISMATCH,
                             f"{service} is declared {local.protocol} on this agent: its "
                             "callers' sidecars must not send it HTTP/2")
        # access
        ev = p._evaluator()
        refused = p._access(req.peer, x, ev)
        if refused is not None:
            return refused
        # rate limit
        found = ev.ratelimit(service)
        if found is not None:
            limited = p._rate_limit(x, found[0], found[1])
            if limited is not None:
                return limited
        # exchange
        hs = request_fields(req.headers, drop=MESH_HEADERS)
        forwarded_for(hs, req.client.rsplit(":", 1)[0])
        trace, x.parent_span, x.span, x.sampled = continue_trace(hs, p._ids,
                                                                 p.trace_threshold)
        x.trace = trace.decode()
        add_hop(hs, p.mark)
        now = trio.current_time()
        call: H2Call | None = None
        async with trio.open_nursery() as nursery:
            try:
                with trio.move_on_at(now + LOCAL_TIMEOUT) as timer:
                    call = await self.upstreams.open(
                        (local.host, local.port), method=req.method, scheme=b"http",
                        authority=req.authority, path=target.path, headers=hs,
                        end_stream=req.end_stream, connect_deadline=now + LOCAL_CONNECT_TIMEOUT)
                    if not req.end_stream:
                        nursery.start_soon(upload, req, call)
                    status, rhs, ended = await call.response()
                if timer.cancelled_caught:
                    if call is not None:
                        call.reset()
                    raise TryFailed("504", f"no response within {LOCAL_TIMEOUT:g} s")
            except TryFailed as f:
                nursery.cancel_scope.cancel()
                code = try_failure_code(f.condition, inbound=True,
                                        bad_response=f.bad_response)
                return p._refuse(x, f.status, code, f"local service {local.id}: {f}")
            except trio.Cancelled:
                if call is not None:
                    call.reset()
                raise
            assert call is not None
            x.status, x.headers_at = status, trio.current_time()
            if grpc and ended:
                x.grpc_status = status_of(rhs)
            ending.done = _End(p, x)
            await relay_response(req, x, call, status, rhs, ended, ending)
            nursery.cancel_scope.cancel()
        return None

    def _local(self, service: str, instance: bytes | None) -> LocalInstance | None:
        """The local instance to serve (the named one if still there, else any)."""
        wanted = instance.decode("ascii", "replace") if instance else None
        fallback = None
        for li in self.proxy.mesh.local_instances(service):
            if wanted is None or li.id == wanted:
                return li
            fallback = fallback or li
        return fallback


class _End:
    """Tells the observer of a forwarded call's end."""

    __slots__ = ("proxy", "x")

    def __init__(self, proxy: InboundProxy, x: Exchange) -> None:
        self.proxy, self.x = proxy, x

    def __call__(self, sent: int, complete: bool) -> None:
        self.proxy.observer.request_ended(self.x, trio.current_time(), sent, complete)


__all__ = ["H2Inbound"]
