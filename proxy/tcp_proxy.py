# layer: shell — upstream ports: local TCP listeners carried over the mesh (trio, sockets)
"""Upstream ports on the caller's side: one local listener per declared TCP upstream.

``--upstream db=127.0.0.1:15432`` binds that port; each connection an application makes
to it is carried to one instance of ``db``: an instance declared ``protocol=tcp`` whose
agent's inbound advertises ``tcp`` (``rumor.carries``). The instance is picked by the
service's balancer through the same attempt core as HTTP (``attempts.Attempts``), so
weights, weight-0 drain, slow start, the circuit breaker and outlier ejection apply as
they do to requests. The "latency" the balancer weighs is the time to a ready mesh
connection (connect, TLS, the inbound's answer); the "outstanding" count is the
connections open to the instance, held for as long as each is relayed. A try that gets
no connection, or an inbound that cannot serve it (not here, not tcp, its local process
unreachable), is a ``connect-failure``: retried on another instance within the
policy's attempts and back-off. An access refusal is final.

Nothing is read from the application before the mesh connection is up, so a protocol
whose server speaks first (a PostgreSQL or SMTP greeting) gets its greeting at once:
no detection, no waiting for client bytes.

The listeners are bound synchronously (``prepare``) and served afterwards
(``apply``), so a reload can refuse a port it cannot bind before it changes anything.
They accept within the outbound side's descriptor pool (two descriptors a connection:
the application's and the mesh one) and a per-client cap, as the outbound listener
does: a full pool stops accepting (connections wait in the backlog) instead of running
the process out of descriptors, where a failed accept would end the agent.
"""

from __future__ import annotations

import logging
import math
import random
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from ..gossip.accept import FdPool, ListenerLimits, accept_loop
from ..gossip.address import format_address
from ..gossip.service_spec import TCP
from ..policy.documents import CONNECT_FAILURE
from ..policy.evaluate import Evaluator
from .attempts import Answer, Attempts, Endpoint, Send, ServiceState
from .log_throttle import LogThrottle, held_note
from .mesh_view import MeshView
from .protocols import CARRIES_TCP, TCP_MAGIC
from .sockio import (
    ConnectionBroken,
    SocketIO,
    TimedOut,
    TlsFailed,
    Watchdog,
    adopt,
    open_connection,
)
from .tcp_metrics import TcpMetrics
from .tcp_preamble import Answer as TcpAnswer
from .tcp_preamble import AnswerReader, Preamble, PreambleError, Refusal
from .tcp_relay import IDLE_TIMEOUT, relay
from .tcp_spec import Upstream
from .tls import HandshakeFailed, MeshTls

log = logging.getLogger("rumor.proxy")

#: Refusals after which another instance may do better (the callee never saw a byte).
RETRYABLE = frozenset({Refusal.NOT_SERVED_HERE, Refusal.NOT_TCP, Refusal.LOCAL_UNREACHABLE})
#: Longest an endpoint list is used without a catalog change (as ``outbound.py``).
ENDPOINT_TTL = 1.0


class _NoConnection(Exception):
    """A try that got no relayable mesh connection; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str, refusal: Refusal | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.refusal = refusal


@dataclass(slots=True)
class _Target:
    state: ServiceState
    evaluator: Evaluator
    endpoints: list[Endpoint] = field(default_factory=list)
    mesh_version: int = -1
    refreshed: float = -math.inf


@dataclass(slots=True)
class _Listener:
    upstream: Upstream
    sock: socket.socket
    #: The accept loop's scope, once it runs; ``stopped``: removed by a reload.
    scope: trio.CancelScope | None = None
    stopped: bool = False


class TcpUpstreams:
    """The upstream ports of one agent, and the connections they carry."""

    def __init__(self, mesh: MeshView, evaluator: Callable[[], Evaluator], *,
                 identity: str | None, tls: MeshTls | None = None,
                 metrics: TcpMetrics | None = None, rng: random.Random | None = None,
                 decay: float = 10.0, idle: float = IDLE_TIMEOUT,
                 pool: FdPool | None = None, max_per_client: int = 0) -> None:
        self.mesh = mesh
        self._evaluator = evaluator
        self.identity = identity
        self.tls = tls
        self.metrics = metrics or TcpMetrics()
        self.rng = rng or random.Random()
        self.decay = decay
        self.idle = idle
        self.watchdog = Watchdog()
        self._targets: dict[str, _Target] = {}
        self._listening: dict[Upstream, _Listener] = {}
        self._nursery: trio.Nursery | None = None
        #: Shared with the outbound listener: both are this host's calls out.
        self.pool = pool or FdPool("upstream", math.inf)
        self._limits = ListenerLimits(fds_per_connection=2, max_per_client=max_per_client)
        #: Connections at once per client address, over all the upstream ports.
        self._per_client: Counter[str] = Counter()
        #: A connection that gets nowhere is counted always, logged once per interval.
        self._quiet = LogThrottle()

    # ---- the listeners ------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Serve the listeners until cancelled (a task of the agent's nursery)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.watchdog.run)
                for lst in self._listening.values():
                    self._serve(lst)
                task_status.started()
        finally:
            self._nursery = None
            for lst in self._listening.values():
                lst.sock.close()

    def prepare(self, wanted: Iterable[Upstream]) -> list[_Listener]:
        """Bind the upstreams not listening yet; raises ``OSError`` naming the one that
        failed, having bound none (the caller then changes nothing)."""
        new: list[_Listener] = []
        try:
            for up in dict.fromkeys(wanted):
                if up not in self._listening:
                    new.append(_Listener(up, _bind(up)))
        except OSError as e:
            for lst in new:
                lst.sock.close()
            raise OSError(e.errno, f"cannot bind upstream {e.filename}: "
                          f"{e.strerror or e}") from None
        return new

    def apply(self, wanted: Iterable[Upstream], bound: list[_Listener]) -> None:
        """Serve ``bound`` (from ``prepare``), stop the listeners not in ``wanted``.
        Connections already relayed through a removed port go on until they end."""
        keep = set(wanted)
        for up in [u for u in self._listening if u not in keep]:
            lst = self._listening.pop(up)
            lst.stopped = True
            if lst.scope is not None:
                lst.scope.cancel()  # its accept loop closes the socket on the way out
            else:
                lst.sock.close()
            log.info("upstream %s closed", up, extra={"event": "upstream_closed",
                                                       "upstream": str(up)})
        for lst in bound:
            self._listening[lst.upstream] = lst
            if self._nursery is not None:
                self._serve(lst)

    def ports(self) -> dict[str, int]:
        """Bound port per upstream (``SERVICE=HOST:PORT`` as declared)."""
        return {str(u): lst.sock.getsockname()[1] for u, lst in self._listening.items()}

    def _serve(self, lst: _Listener) -> None:
        assert self._nursery is not None
        up = lst.upstream
        log.info("upstream %s listening on %s", up.service, format_address((up.host,
                                                                             up.port)),
                 extra={"event": "upstream", "upstream": str(up)})

        async def serve() -> None:
            # The accept loop runs in its own scope (cancelled when the upstream goes);
            # the connections run in the manager's nursery and outlive it.
            assert self._nursery is not None
            conns = self._nursery
            if lst.stopped:
                return  # removed before its loop started (the socket is closed)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(lst.sock))

            async def carry(stream: trio.SocketStream) -> None:
                await self._carry(up.service, adopt(stream))

            with trio.CancelScope() as lst.scope:  # accept_loop closes the listener
                await accept_loop(carry, listener, conns, self.pool, self._limits,
                                  self._per_client, f"upstream {up.service}")

        self._nursery.start_soon(serve)

    # ---- one connection ------------------------------------------------------------------

    async def _carry(self, service: str, sock: socket.socket) -> None:
        client = SocketIO(sock, self.watchdog)
        m = self.metrics
        try:
            opened = await self._open(service)
            if isinstance(opened, str):
                m.connections.inc((service, opened))
                return
            mesh, early, tries, key = opened
            started = trio.current_time()
            try:
                m.connections.inc((service, "relayed"))
                done = await relay(client, mesh, idle=self.idle, to_client=early)
                m.bytes.add((service, "sent"), done.sent)
                m.bytes.add((service, "received"), done.received)
                m.duration.observe((service,), trio.current_time() - started)
            finally:
                mesh.close()
                tries.state.balancer.release(key)
                tries.end()
        finally:
            client.close()

    async def _open(self, service: str) -> tuple[SocketIO, bytes, Attempts, str] | str:
        """A ready mesh connection to an instance (with the bytes that came with the
        answer, the request's attempts and the instance key, counted open in the
        balancer) or the outcome label why none."""
        target = self._target(service)
        cands = target.endpoints
        now = trio.current_time()
        if not cands:
            if (held := self._quiet.allow(("no_instance", service), now)) is not None:
                log.info("upstream %s: no instance declared protocol=tcp behind a sidecar "
                         "that carries tcp%s", service, held_note(held),
                         extra={"event": "tcp_no_instance", "service": service})
            return "no_instance"
        tries = Attempts.begin(now, target.state, target.state.balancer, cands,
                               service=service, total=len(cands), method="CONNECT",
                               replayable=False, rng=self.rng)
        try:
            step: Send | Answer = tries.next(now)
            while True:
                refused = step if isinstance(step, Answer) else tries.start(
                    now, new_connection=True)
                if refused is not None:
                    if (held := self._quiet.allow(("gave_up", service), now)) is not None:
                        log.info("upstream %s: %s%s", service, refused.reason,
                                 held_note(held),
                                 extra={"event": "tcp_gave_up", "service": service})
                    tries.end()
                    return refused.code.value if refused.code is not None else \
                        "connect_failed"
                assert isinstance(step, Send)
                ep = step.endpoint
                try:
                    mesh, early = await self._connect(ep, service, now + step.connect)
                except _NoConnection as f:
                    now = trio.current_time()
                    self.metrics.connect_failures.inc((service, f.reason))
                    held = self._quiet.allow(("connect", ep.key, f.reason), now)
                    if held is not None:
                        log.info("upstream %s: %s/%s: %s%s", service, ep.node, ep.instance,
                                 f.detail, held_note(held),
                                 extra={"event": "tcp_connect_failed", "service": service,
                                        "instance": ep.key, "reason": f.reason})
                    if f.refusal is not None and f.refusal not in RETRYABLE:
                        tries.responded(now, 403)  # an answer, not the instance's failure
                        tries.end()
                        return f.refusal.label
                    after = tries.failed(now, CONNECT_FAILURE, f.detail)
                    if isinstance(after, Answer):
                        tries.end()
                        return "connect_failed"
                    await trio.sleep_until(after.until)
                    now = trio.current_time()
                    step = tries.next(now)
                    continue
                finally:
                    tries.connection_done()
                tries.responded(trio.current_time(), 200)
                tries.state.balancer.start(ep.key, trio.current_time())  # open connections
                return mesh, early, tries, ep.key
        except BaseException:
            tries.client_gone(trio.current_time())  # cancelled mid-try: not its fault
            tries.end()
            raise

    async def _connect(self, ep: Endpoint, service: str,
                       deadline: float) -> tuple[SocketIO, bytes]:
        """Connect to ``ep``'s inbound, send the preamble and read the answer, all by
        ``deadline``; raises ``_NoConnection``."""
        tls = self.tls
        try:
            io, der = await open_connection(ep.host, ep.port, self.watchdog, deadline,
                                            tls=tls.client if tls is not None else None)
        except TimedOut:
            raise _NoConnection("timeout", f"connect to {ep.host}:{ep.port} timed out") \
                from None
        except (ConnectionBroken, OSError) as e:
            if isinstance(e, TlsFailed) and tls is not None:
                tls.stats["handshake_failures"] += 1
            reason = "tls" if isinstance(e, TlsFailed) else "refused"
            raise _NoConnection(reason, str(e) or type(e).__name__) from None
        try:
            if tls is not None:
                try:
                    peer = tls.verify_peer(der)
                except HandshakeFailed as e:
                    raise _NoConnection("tls", f"{ep.host}:{ep.port}: {e}") from None
                if not peer.names(service):
                    who = f"node {peer.node}" if peer.node else "the upstream"
                    raise _NoConnection("wrong_identity", f"the certificate of {who} does "
                                        f"not name service {service!r}")
            io.set_deadline(deadline)
            pre = Preamble(service, ep.instance, self.identity or "")
            await io.send(TCP_MAGIC + pre.encode())
            answer, early = await _answer(io)
            if not answer.accepted:
                raise _NoConnection(answer.code.label, f"refused: {answer.phrase}",
                                    answer.code)
            io.deadline = math.inf
            return io, early
        except _NoConnection:
            io.close()
            raise
        except TimedOut:
            io.close()
            raise _NoConnection("timeout", "no answer to the preamble in time") from None
        except (ConnectionBroken, PreambleError) as e:
            io.close()
            raise _NoConnection("bad_answer", f"no answer to the preamble: {e}") from None
        except BaseException:
            io.close()
            raise

    # ---- targets ------------------------------------------------------------------------

    def _target(self, service: str) -> _Target:
        ev = self._evaluator()
        t = self._targets.get(service)
        if t is None:
            t = _Target(ServiceState(ev.resilience(service), self.rng, self.decay), ev)
            self._targets[service] = t
        elif t.evaluator is not ev:
            spec = ev.resilience(service)
            if t.state.spec != spec:
                t.state.update(spec)
            t.evaluator = ev
        now = trio.current_time()
        version = self.mesh.version
        if t.mesh_version != version or now - t.refreshed >= ENDPOINT_TTL:
            t.endpoints = [e for e in self.mesh.endpoints(service)
                           if e.protocol == TCP and CARRIES_TCP in e.carries]
            t.mesh_version, t.refreshed = version, now
            balancer = t.state.balancer
            for e in t.endpoints:
                if e.rtt is not None:
                    balancer.seed(e.key, e.rtt)
            keys = {e.key for e in t.endpoints}
            balancer.forget_except(keys)
            t.state.outliers.forget_except(keys)
        return t

    def close(self) -> None:
        for lst in self._listening.values():
            lst.sock.close()


async def _answer(io: SocketIO) -> tuple[TcpAnswer, bytes]:
    reader = AnswerReader()
    while True:
        data = await io.recv()
        if not data:
            raise ConnectionBroken("closed before answering")
        done = reader.feed(data)
        if done is not None:
            return done


def _bind(up: Upstream) -> socket.socket:
    family = socket.AF_INET6 if ":" in up.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((up.host, up.port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, e.strerror, str(up)) from None
    return sock


__all__ = ["RETRYABLE", "TcpUpstreams"]
