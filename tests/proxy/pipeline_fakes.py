"""Fakes for running the proxies' request pipeline in process, on virtual time.

``FakeMesh`` answers the ``MeshView`` questions from a table; ``FakePool`` plays the
upstreams: each instance has a script (status, delay, or a failed try) and the pool
answers on the trio clock (a ``MockClock`` in the tests), so retries, back-off,
breaker, ejection and faults run with no socket and no real waiting. ``FakeRequest``
has what a handler reads of a request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import trio

from rumor.policy.documents import CONNECT_FAILURE
from rumor.proxy.attempts import STALE_CONNECTION, Endpoint
from rumor.proxy.codec import ResponseHead
from rumor.proxy.inbound import InboundProxy
from rumor.proxy.mesh_view import LocalInstance
from rumor.proxy.observe import Exchange
from rumor.proxy.outbound import OutboundProxy
from rumor.proxy.pool import TryFailed, UpstreamPool, UpstreamResponse
from rumor.proxy.relay import Forward, Reply, Request


@dataclass
class Behaviour:
    """What an instance does with the next tries (the last entry repeats)."""

    status: int = 200
    delay: float = 0.001
    #: A failed try instead of a response: a retry condition, or "stale-connection".
    fail: str | None = None


@dataclass
class Upstream:
    script: list[Behaviour] = field(default_factory=lambda: [Behaviour()])
    tries: int = 0
    heads: list[bytes] = field(default_factory=list)

    def next(self) -> Behaviour:
        b = self.script[min(self.tries, len(self.script) - 1)]
        self.tries += 1
        return b


class FakeMesh:
    def __init__(self) -> None:
        self.version = 1
        self.services: dict[str, list[Endpoint]] = {}
        self.local: dict[str, list[LocalInstance]] = {}
        self.critical: set[str] = set()

    def add(self, service: str, n: int, *, version: str = "v1", weights: list[int] | None = None,
            tags: tuple[str, ...] = ()) -> list[Endpoint]:
        eps = self.services.setdefault(service, [])
        for i in range(n):
            k = len(eps)
            eps.append(Endpoint(f"node{k}/{service}-{k}", f"node{k}", f"{service}-{k}", version,
                                tags, "127.0.0.1", 20000 + k, 0.001,
                                weights[i] if weights else 1))
        self.version += 1
        return eps

    def remove(self, service: str, key: str) -> None:
        self.services[service] = [e for e in self.services[service] if e.key != key]
        self.version += 1

    def endpoints(self, service: str) -> list[Endpoint]:
        return list(self.services.get(service, []))

    def knows(self, service: str) -> bool:
        return service in self.services or service in self.critical

    def local_instances(self, service: str) -> Iterator[LocalInstance]:
        yield from self.local.get(service, [])


class _Conn:
    def close(self) -> None:
        pass


class FakePool:
    """The upstreams, by port; every try and every head sent is recorded."""

    def __init__(self) -> None:
        self.upstreams: dict[int, Upstream] = {}
        self.idle: set[int] = set()
        self.given_back = 0
        self.order: list[int] = []
        #: Behaviours of the next tries whichever instance they go to (before scripts).
        self.first: list[Behaviour] = []

    def upstream(self, port: int) -> Upstream:
        return self.upstreams.setdefault(port, Upstream())

    def has_idle(self, host: str, port: int) -> bool:
        return port in self.idle

    async def exchange(self, method: bytes, origin: tuple[str, int], head: bytes,
                       body: Any, *, connect_deadline: float, deadline: float,
                       service: str | None = None, informational: Any = None,
                       fresh: bool = False, resend_stale: bool = True) -> UpstreamResponse:
        up = self.upstream(origin[1])
        b = self.first.pop(0) if self.first else up.next()
        up.heads.append(head)
        self.order.append(origin[1])
        now = trio.current_time()
        if b.fail == STALE_CONNECTION and not fresh:
            raise TryFailed(STALE_CONNECTION, "closed before responding")
        if b.fail == CONNECT_FAILURE:
            await trio.sleep_until(min(now + b.delay, connect_deadline))
            raise TryFailed(CONNECT_FAILURE, "refused")
        if now + b.delay >= deadline:
            await trio.sleep_until(deadline)
            raise TryFailed("504", "no response before the per-try deadline")
        await trio.sleep(b.delay)
        if b.fail is not None and b.fail != STALE_CONNECTION:
            raise TryFailed(b.fail, "broken")
        hs = [(b"x-port", b"%d" % origin[1])]
        if b.status == 429:  # as the callee's sidecar refuses for its rate limit
            hs.append((b"x-rumor-error-code", b"rate_limited"))
        rh = ResponseHead(b.status, b"", b"1.1", hs, 0, False, True)
        return UpstreamResponse(cast(Any, _Conn()), rh, [], 0.0)

    def give_back(self, conn: Any) -> None:
        self.given_back += 1

    def close(self) -> None:
        pass


class FakeRequest:
    def __init__(self, target: bytes = b"/", *, host: bytes = b"web", method: bytes = b"GET",
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.method = method
        self.target = target
        self.headers = [(b"host", host), *(headers or [])]
        self.client = "127.0.0.1:5555"
        self.peer = None
        self.failure = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def take_body(self, keep: int) -> None:
        return None

    def framing(self, body: object) -> None:
        return None

    async def informational(self, head: ResponseHead) -> None:
        pass


class Recorder:
    """An observer that keeps everything it hears."""

    def __init__(self) -> None:
        self.started: list[Exchange] = []
        self.tries: list[tuple[str, str]] = []
        self.decisions: list[object] = []
        self.ended: list[tuple[Exchange, int, bool]] = []

    def request_started(self, x: Exchange) -> None:
        self.started.append(x)

    def try_started(self, x: Exchange, endpoint: Endpoint, now: float) -> None:
        pass

    def try_ended(self, x: Exchange, endpoint: Endpoint, now: float, outcome: str) -> None:
        self.tries.append((endpoint.key, outcome))

    def decided(self, x: Exchange, event: object) -> None:
        self.decisions.append(event)

    def request_ended(self, x: Exchange, now: float, sent: int, complete: bool) -> None:
        self.ended.append((x, sent, complete))


def outbound(mesh: FakeMesh, pool: FakePool, evaluator: Callable[[], Any], *,
             observer: Recorder | None = None, seed: int = 1,
             identity: str | None = "caller") -> OutboundProxy:
    import random
    return OutboundProxy(mesh, evaluator, identity=identity, observer=observer,
                         rng=random.Random(seed), agent="test-agent",
                         pool=cast(UpstreamPool, pool))


def inbound(mesh: FakeMesh, pool: FakePool, evaluator: Callable[[], Any], *,
            observer: Recorder | None = None) -> InboundProxy:
    return InboundProxy(mesh, evaluator, observer=observer, agent="test-agent",
                        pool=cast(UpstreamPool, pool))


async def call(proxy: OutboundProxy | InboundProxy, req: FakeRequest) -> tuple[int, dict[str, str],
                                                                             dict[str, Any]]:
    """Run one request and end it as the relay would: (status, headers, JSON body)."""
    out = await proxy(cast(Request, req))
    hs = {k.decode(): v.decode() for k, v in out.headers}
    if isinstance(out, Reply):
        if out.on_done is not None:
            out.on_done(len(out.body), True)
        return out.status, hs, json.loads(out.body)
    assert isinstance(out, Forward)
    if out.on_done is not None:
        out.on_done(0, True)
    hs.update({k.decode(): v.decode() for k, v in out.response.head.headers})
    return out.response.head.status, hs, {}
