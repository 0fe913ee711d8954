# layer: shell — the outbound listener's HTTP/2 streams: runs the pipeline's cores, does the I/O
"""HTTP/2 from the applications (h2c with prior knowledge, as gRPC clients speak it):
each stream is a request of its own, routed, balanced and retried on its own.

One client connection carries many calls; pinning them to one instance (what a TCP
proxy does) would leave the others idle (istio/istio#7117). So every stream runs the
HTTP/1.1 pipeline's layers (``outbound.py``) with the same cores and the same cached
``Target``: **route** (the service from ``:authority``, the route policy) →
**fault** → **balance and try** (its own ``CallAttempts``) → **exchange** (a stream on a
multiplexed connection to the chosen instance's inbound listener, ``H2Upstreams``) →
**observe**. Only instances declared grpc/http2 whose agent carries h2 are candidates.

gRPC specifics (``grpc.py``): a trailers-only answer is read for its ``grpc-status``
and retried when the policy's ``grpc_on`` names it (nothing reached the client yet);
``grpc-timeout`` is the call's deadline (the smaller of it and the policy's overall
timeout for the tries), sent on reduced by the time spent; when it passes, the client
gets DEADLINE_EXCEEDED and the upstream stream is reset. The sidecar's own refusals
are gRPC answers (trailers-only, a status and ``grpc-message`` saying why, and
``x-rumor-error-code``); a non-gRPC stream gets the HTTP/1.1 JSON error bodies.

Request bodies up to ``RETRY_BUFFER`` are kept for a retry; a longer one streams once
(beside the response, so bidirectional streams work).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import trio

from ..policy.documents import NO_EDITS, HeaderEdits
from .attempts import STALE_CONNECTION, Answer, Endpoint, Send, Wait
from .errors import ERROR_CODE_HEADER, ErrorCode
from .grpc import (
    DEADLINE_EXCEEDED,
    CallAttempts,
    answer,
    format_timeout,
    is_grpc,
    parse_timeout,
    refusal_status,
    request_fields,
    status_of,
)
from .headers import (
    MESH_HEADERS,
    TargetError,
    add_hop,
    check_hops,
    continue_trace,
    cookie_value,
    end_to_end,
    forwarded_for,
    parse_target,
    trailer_fields,
)
from .identity import Identity
from .observe import Exchange, RequestEnd
from .outbound import RETRY_BUFFER, OutboundProxy, Target, mismatch
from .pool import TryFailed
from .relay import AltHandler, Reply, ResetConnection
from .route import header_view, route_request
from .sockio import SocketIO

if TYPE_CHECKING:
    from .h2_client import H2Call, H2Upstreams
    from .h2_server import H2Request

Fields = list[tuple[bytes, bytes]]


def _field(headers: Fields, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


class H2Outbound:
    """The outbound listener's ``H2Handler``: one call per stream."""

    def __init__(self, proxy: OutboundProxy, upstreams: H2Upstreams) -> None:
        self.proxy = proxy
        self.upstreams = upstreams

    async def __call__(self, req: H2Request) -> None:
        p = self.proxy
        x = Exchange("outbound", req.method, req.path, req.client, trio.current_time(),
                     source=p.identity, secured=p._secured, headers=req.headers)
        p.observer.request_started(x)
        grpc = is_grpc(req.headers)
        deadline = math.inf
        ending = Ending()
        raw = _field(req.headers, b"grpc-timeout")
        try:
            if raw is not None:
                try:
                    deadline = x.started + parse_timeout(raw)
                except ValueError as e:
                    return await _answer(req, x, p._refuse(x, 400, ErrorCode.BAD_REQUEST,
                                                           str(e)), grpc, ending)
            with trio.CancelScope(deadline=deadline) as scope:
                await self._call(req, x, grpc, deadline, ending)
            if scope.cancelled_caught:  # the call's deadline passed: the upstream is reset
                await _deadline_passed(req, x, grpc, p, ending)
        finally:
            ending.run()

    async def _call(self, req: H2Request, x: Exchange, grpc: bool, deadline: float,
                    ending: Ending) -> None:
        p = self.proxy
        # 1. route
        try:
            parsed = parse_target(req.path, req.authority or _field(req.headers, b"host"))
        except TargetError as e:
            return await _answer(req, x, p._refuse(x, 400, ErrorCode.BAD_TARGET, str(e)), grpc,
                                 ending)
        x.service = service = parsed.service
        loop = check_hops(req.headers, p.mark)
        if loop is not None:
            return await _answer(req, x, p._refuse(x, 508, ErrorCode.LOOP_DETECTED, loop),
                                 grpc, ending)
        ev, target = p.stream_target(service)
        if not target.endpoints:
            code = (ErrorCode.NO_HEALTHY_INSTANCE if p.mesh.knows(service)
                    else ErrorCode.UNKNOWN_SERVICE)
            why = (f"no healthy instance of {service}" if p.mesh.knows(service)
                   else f"unknown service {service!r}")
            return await _answer(req, x, p._refuse(x, 503, code, why), grpc, ending)
        view = header_view(req.headers, target.consulted) if target.consulted else {}
        routed = route_request(ev, service, target.needs, method=req.method,
                               target=parsed.path, view=view, rng=p.rng)
        x.route_rule = routed.rule
        # 2. fault
        if target.faults is not None:
            try:
                aborted = await p._fault(x, target, view)
            except ResetConnection:
                req.reset()
                return None
            if aborted is not None:
                return await _answer(req, x, aborted, grpc, ending)
        cands = target.candidates(routed.subset)
        if not cands:
            return await _answer(req, x, p._refuse(
                x, 503, ErrorCode.NO_INSTANCE_IN_SUBSET, f"no healthy instance of {service} "
                f"in subset {routed.subset.name}"), grpc, ending)
        cands = target.speaking(cands, "h2")
        if not cands:
            return await _answer(req, x, p._refuse(x, 505, ErrorCode.PROTOCOL_MISMATCH,
                                                   mismatch(service, target.endpoints, "h2")),
                                 grpc, ending)
        # 3. balance and try, 4. exchange
        await self._try(req, x, grpc, deadline, target, cands, parsed.path, routed.edits,
                        ending)
        return None

    async def _try(self, req: H2Request, x: Exchange, grpc: bool, deadline: float,
                   target: Target, cands: list[Endpoint], path: bytes,
                   edits: HeaderEdits, ending: Ending) -> None:
        p, service = self.proxy, target.service
        body = Body(req.end_stream)
        spec = target.state.spec
        on = spec.balancer.hash_on
        hash_key = None if on is None else (
            _field(req.headers, on.header.encode("latin-1")) if on.header is not None
            else cookie_value(req.headers, (on.cookie or "").encode("latin-1")))
        tries = cast(CallAttempts, CallAttempts.begin(
            x.started, target.state, target.state.balancer, cands, service=service,
            total=len(target.endpoints), method=req.method.decode("ascii", "replace"),
            replayable=True, rng=p.rng, hash_key=hash_key))
        tries.deadline = min(tries.deadline, deadline)
        fields = self._fields(req, x, edits)
        ending.done = RequestEnd(p.observer, x, tries, trio.current_time)
        try:
            async with trio.open_nursery() as nursery:
                if not req.end_stream:
                    nursery.start_soon(body.pump, req)
                now = trio.current_time()
                step: Send | Answer = tries.next(now)
                while True:
                    refused = step if isinstance(step, Answer) else tries.start(
                        now, new_connection=step.fresh or not self.upstreams.has_idle(
                            step.endpoint.host, step.endpoint.port))
                    if refused is not None:
                        p._decisions(x, tries)
                        reply = p._give_up(x, refused)
                        reply.on_done = None
                        ending.sent, ending.complete = await send_reply(req, x, reply,
                                                                        grpc), True
                        return
                    assert isinstance(step, Send)
                    ep = step.endpoint
                    x.tries, x.instance = step.attempt, ep.key
                    p.observer.try_started(x, ep, now)
                    hs = [*fields, (b"x-rumor-instance", ep.instance.encode())]
                    if deadline < math.inf:
                        hs.append((b"grpc-timeout", format_timeout(max(deadline - now, 1e-9))))
                    call: H2Call | None = None
                    try:
                        try:
                            with trio.move_on_at(now + step.per_try) as per_try:
                                call = await self.upstreams.open(
                                    (ep.host, ep.port), method=req.method, scheme=b"http",
                                    authority=service.encode(), path=path, headers=hs,
                                    end_stream=req.end_stream,
                                    connect_deadline=now + step.connect, service=service)
                                tries.connection_done()
                                if not req.end_stream:
                                    nursery.start_soon(body.feed, call, body.next_try())
                                status, rhs, ended = await call.response()
                            if per_try.cancelled_caught:
                                if call is not None:
                                    call.reset()
                                raise TryFailed("504", f"no response within the per-try "
                                                f"timeout {step.per_try:.3g} s")
                        except trio.Cancelled:
                            tries.client_gone(trio.current_time())
                            p.observer.try_ended(x, ep, trio.current_time(), "client-gone")
                            if call is not None:
                                call.reset()
                            raise
                        finally:
                            tries.connection_done()
                    except TryFailed as f:
                        now = trio.current_time()
                        p.observer.try_ended(x, ep, now, f.condition)
                        if f.condition == STALE_CONNECTION and body.consumed:
                            f = TryFailed("502", f"{f.detail} (the body was partly sent)")
                        if f.condition == STALE_CONNECTION:
                            step = tries.stale(now)
                            p._decisions(x, tries)
                            continue
                        tries.replayable = body.replayable
                        after = tries.failed(now, f.condition, str(f), f.bad_response)
                        p._decisions(x, tries)
                        if isinstance(after, Answer):
                            reply = p._give_up(x, after)
                            reply.on_done = None
                            ending.sent, ending.complete = await send_reply(
                                req, x, reply, grpc), True
                            return
                        await trio.sleep_until(after.until)
                        now = trio.current_time()
                        step = tries.next(now)
                        continue
                    assert call is not None
                    done = trio.current_time()
                    # The callee's sidecar refused it for the mesh-wide rate limit (a 429,
                    # or RESOURCE_EXHAUSTED on a gRPC call): delivered, never judged.
                    limited = _field(rhs, ERROR_CODE_HEADER) == ErrorCode.RATE_LIMITED.encode()
                    code = status_of(rhs) if grpc and ended else None
                    x.grpc_status = code
                    p.observer.try_ended(x, ep, done, str(status))
                    tries.replayable = body.replayable
                    if code is not None:
                        outcome = tries.grpc_answered(done, code, call.connect_seconds,
                                                      rate_limited=limited)
                    else:
                        outcome = tries.responded(done, status, call.connect_seconds,
                                                  rate_limited=limited)
                    p._decisions(x, tries)
                    if isinstance(outcome, Wait):
                        call.reset()
                        await trio.sleep_until(outcome.until)
                        now = trio.current_time()
                        step = tries.next(now)
                        continue
                    x.status, x.headers_at = status, done
                    await relay_response(req, x, call, status, rhs, ended, ending)
                    nursery.cancel_scope.cancel()  # an upload still running is moot
                    return
        finally:
            tries.end()

    def _fields(self, req: H2Request, x: Exchange, edits: HeaderEdits = NO_EDITS) -> Fields:
        """The request's fields for the callee's sidecar, as HTTP/1.1's
        ``_request_headers`` makes them (mesh headers, Via, trace, x-forwarded-for)."""
        p = self.proxy
        hs = request_fields(req.headers, drop=MESH_HEADERS | {b"grpc-timeout"})
        if edits:
            hs = edits.apply(hs)
        forwarded_for(hs, req.client.rsplit(":", 1)[0])
        trace, x.parent_span, x.span, x.sampled = continue_trace(hs, p.rng,
                                                                 p.trace_threshold)
        x.trace = trace.decode()
        add_hop(hs, p.mark)
        if p.identity:
            hs.append((b"x-rumor-source", p.identity.encode()))
        return hs


class Body:
    """A request body on its way to the tries: read from the client as it comes (a
    bidirectional call sends its next message only after a reply, so nothing waits
    for the whole body), fed to the current try, and kept while it is at most
    ``RETRY_BUFFER`` bytes so that a retry can send it again. Past that it is a queue
    the one try drains (the client is read only as fast as the upstream takes it), and
    the request is no longer replayable."""

    def __init__(self, ended: bool) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = ended
        self.trailers: Fields | None = None
        #: More than RETRY_BUFFER came: chunks are dropped once sent.
        self.overflow = False
        #: A try took (and dropped) chunks of an overflowed body.
        self.consumed = False
        #: The try now fed (an earlier try's feeder stops).
        self.generation = 0
        self._changed = trio.Event()

    def next_try(self) -> int:
        self.generation += 1
        self._kick()
        return self.generation

    @property
    def replayable(self) -> bool:
        return not self.overflow

    def _kick(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def pump(self, req: H2Request) -> None:
        """Read the client's body (a task beside the tries)."""
        while True:
            while self.overflow and self.chunks:  # back-pressure: the try drains first
                await self._changed.wait()
            data = await req.receive()
            if not data:
                self.trailers, self.ended = req.trailers, True
                self._kick()
                return
            self.chunks.append(data)
            self.size += len(data)
            self.overflow = self.overflow or self.size > RETRY_BUFFER
            self._kick()

    async def feed(self, call: H2Call, generation: int) -> None:
        """Send the body, from its start, to one try's stream (a task beside its
        response), then its end or trailers; stops when a later try began."""
        i = 0
        try:
            while generation == self.generation:
                while i < len(self.chunks) and generation == self.generation:
                    data = self.chunks[i]
                    if self.overflow:
                        del self.chunks[:i + 1]
                        i, self.consumed = 0, True
                        self._kick()
                    else:
                        i += 1
                    if self.ended and not self.trailers and i >= len(self.chunks):
                        await call.send(data, end_stream=True)  # one frame, one write
                        return
                    await call.send(data)
                if generation != self.generation:
                    return
                if self.ended and i >= len(self.chunks):
                    await call.end(trailer_fields(self.trailers) if self.trailers else None)
                    return
                await self._changed.wait()
        except TryFailed:
            pass  # the upstream stream ended: its response (or its failure) says the rest


async def upload(req: H2Request, call: H2Call) -> None:
    """Stream the request body (and trailers) to ``call`` once, beside its response."""
    try:
        while data := await req.receive():
            await call.send(data)
        await call.end(trailer_fields(req.trailers) if req.trailers else None)
    except TryFailed:
        pass  # the upstream stream ended: its response (or its failure) says the rest


async def relay_response(req: H2Request, x: Exchange, call: H2Call, status: int, rhs: Fields,
                 ended: bool, ending: Ending) -> None:
    """Relay the response (head, body, trailers), counting in ``ending``."""
    hs = end_to_end(rhs)
    if ended:
        await req.respond(status, hs, end_stream=True)
        ending.complete = True
        return
    await req.respond(status, hs)
    try:
        while data := await call.receive():
            await req.send(data)
            ending.sent += len(data)
    except TryFailed:
        req.reset(0x2)  # INTERNAL_ERROR: the upstream broke off mid-response
        return
    if call.trailers:
        trailers = trailer_fields(call.trailers)
        if x.grpc_status is None:
            x.grpc_status = status_of(trailers)
        await req.send_trailers(trailers)
    else:
        await req.send(b"", end_stream=True)
    ending.complete = True


async def send_reply(req: H2Request, x: Exchange, reply: Reply, grpc: bool) -> int:
    """A refusal the sidecar makes itself: a gRPC answer on a gRPC call, else the
    HTTP/1.1 JSON body. The body bytes sent."""
    if grpc:
        code = ErrorCode(x.code) if x.code else ErrorCode.INTERNAL_ERROR
        x.grpc_status = refusal_status(code, reply.status)
        x.status = 200
        await req.respond(200, answer(x.grpc_status, x.reason or "", code), end_stream=True)
        return 0
    await req.respond(reply.status, reply.headers)
    await req.send(reply.body, end_stream=True)
    return len(reply.body)


class Ending:
    """How a call ended, told to the observer once (``run``), after the last answer."""

    __slots__ = ("complete", "done", "sent")

    def __init__(self) -> None:
        self.done: Callable[[int, bool], None] | None = None
        self.sent = 0
        self.complete = False

    def run(self) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(self.sent, self.complete)


async def _answer(req: H2Request, x: Exchange, reply: Reply, grpc: bool,
                  ending: Ending) -> None:
    """Send a refusal made before any try (the observer hears of it at the end)."""
    ending.done, reply.on_done = reply.on_done, None
    ending.sent = await send_reply(req, x, reply, grpc)
    ending.complete = True


async def _deadline_passed(req: H2Request, x: Exchange, grpc: bool, p: OutboundProxy,
                           ending: Ending) -> None:
    """The call's ``grpc-timeout`` passed: DEADLINE_EXCEEDED (trailers if the response
    had begun), or a 504 on a non-gRPC stream that has no head yet."""
    why = "the call's grpc-timeout passed"
    if req.headers_sent:
        if grpc:
            await req.send_trailers([(b"grpc-status", b"%d" % DEADLINE_EXCEEDED),
                                     (b"grpc-message", why.encode())])
        else:
            req.reset()
        return
    reply = p._refuse(x, 504, ErrorCode.OVERALL_TIMEOUT, why)
    if ending.done is None:
        ending.done = reply.on_done
    reply.on_done = None
    ending.sent, ending.complete = await send_reply(req, x, reply, grpc), True
    if grpc:
        x.grpc_status = DEADLINE_EXCEEDED


def h2_listener(handler: Callable[[H2Request], Awaitable[None]]) -> AltHandler:
    """A listener's ``AltProtocols.h2``: serve the connection's streams with ``handler``
    (``h2_server.serve_h2``; the limits are ``H2Limits``')."""
    from .h2_server import serve_h2

    async def serve(io: SocketIO, peer: Identity | None, first: bytes) -> None:
        await serve_h2(io, handler, first=first, peer=peer, client=io.peer_name())
    return serve


__all__ = ["Body", "Ending", "H2Outbound", "h2_listener", "relay_response", "send_reply", "upload"]
