# layer: shell — the inbound side of mesh TCP: preamble, access, local connect (trio)
"""The inbound listener's mesh TCP handler (``AltProtocols.tcp``).

A caller's sidecar opens with ``TCP_MAGIC`` and a preamble (``tcp_preamble.py``) naming
the service and instance; this handler reads it within ``PREAMBLE_TIMEOUT`` seconds and
``MAX_PREAMBLE`` bytes, finds the local instance (of a service declared
``protocol=tcp``: an HTTP service's port is not opened to raw bytes), and decides access
**before** it connects to the local process, so a refused caller never reaches the
service, not even as a connection. Under mutual TLS the caller is who its certificate
names (``inbound.verified_source``, as for HTTP); without TLS the preamble's source is a
claim anyone can make: it is judged as given, and logged and counted as unverified.
Then one answer goes back (accepted, or the refusal code and a phrase) and the bytes
are relayed both ways (``tcp_relay.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..gossip.service_spec import TCP
from ..policy.evaluate import Evaluator
from .identity import Identity
from .inbound import LOCAL_CONNECT_TIMEOUT, verified_source
from .log_throttle import LogThrottle, held_note
from .mesh_view import LocalInstance, MeshView
from .protocols import TCP_MAGIC
from .sockio import ConnectionBroken, SocketIO, TimedOut, Watchdog, open_connection
from .tcp_metrics import TcpMetrics
from .tcp_preamble import MAX_PREAMBLE, Answer, Preamble, PreambleError, PreambleReader, Refusal
from .tcp_relay import IDLE_TIMEOUT, relay
from .tls import MeshTls

log = logging.getLogger("rumor.proxy")

#: Seconds a caller's sidecar has to send its whole preamble.
PREAMBLE_TIMEOUT = 5.0
#: Seconds an answer may take to leave (the caller's sidecar is waiting for it).
ANSWER_TIMEOUT = 5.0


class TcpInbound:
    def __init__(self, mesh: MeshView, evaluator: Callable[[], Evaluator], *,
                 watchdog: Watchdog, tls: MeshTls | None = None,
                 metrics: TcpMetrics | None = None, idle: float = IDLE_TIMEOUT,
                 preamble_timeout: float = PREAMBLE_TIMEOUT) -> None:
        self.mesh = mesh
        self._evaluator = evaluator
        self.watchdog = watchdog
        self.tls = tls
        self.metrics = metrics or TcpMetrics()
        self.idle = idle
        self.preamble_timeout = preamble_timeout
        self._warned: set[tuple[str, ...]] = set()
        self._quiet = LogThrottle()

    async def __call__(self, io: SocketIO, peer: Identity | None, first: bytes) -> None:
        verified = "verified" if self.tls is not None else "unverified"
        try:
            pre, early = await self._preamble(io, first)
        except PreambleError as e:
            self.metrics.inbound.inc((UNKNOWN_SERVICE, e.code.label, verified))
            # Keyed by code, not by peer: anyone can connect, from many addresses.
            held = self._quiet.allow(e.code, trio.current_time())
            if held is not None:
                log.info("mesh TCP from %s refused: %s%s", io.peer_name(), e.reason,
                         held_note(held), extra={"event": "tcp_refused",
                                                 "code": e.code.label})
            if e.code is not Refusal.PREAMBLE_TIMEOUT:
                await self._answer(io, Answer(e.code, e.reason))
            return
        except ConnectionBroken:
            return
        label = self.metrics.service(pre.service)
        local, refusal = self._route(pre)
        if refusal is None:
            refusal = self._access(pre, peer)
        if refusal is not None:
            self.metrics.inbound.inc((label, refusal.code.label, verified))
            await self._answer(io, refusal)
            return
        assert local is not None
        try:
            upstream, _ = await open_connection(local.host, local.port, self.watchdog,
                                                trio.current_time() + LOCAL_CONNECT_TIMEOUT)
        except (ConnectionBroken, TimedOut, OSError) as e:
            what = "timed out" if isinstance(e, TimedOut) else str(e) or type(e).__name__
            self.metrics.inbound.inc((label, Refusal.LOCAL_UNREACHABLE.label, verified))
            await self._answer(io, Answer(Refusal.LOCAL_UNREACHABLE,
                                          f"local service {local.id}: {what}"))
            return
        if self.tls is None:
            self._unverified(pre)
        try:
            self.metrics.inbound.inc((label, "accepted", verified))
            if await self._answer(io, Answer(Refusal.ACCEPTED)):
                await relay(io, upstream, idle=self.idle, to_server=early)
        finally:
            upstream.close()

    async def _preamble(self, io: SocketIO, first: bytes) -> tuple[Preamble, bytes]:
        """The preamble, and bytes after it; raises ``PreambleError`` (a timeout too)."""
        reader = PreambleReader()
        data = first[len(TCP_MAGIC):]
        io.set_deadline(trio.current_time() + self.preamble_timeout)
        got = 0
        try:
            while True:
                got += len(data)
                done = reader.feed(data)
                if done is not None:
                    return done
                if got > MAX_PREAMBLE:  # the reader refuses a long one by its length
                    raise PreambleError(Refusal.BAD_PREAMBLE, "preamble too long")
                data = await io.recv()
                if not data:
                    raise ConnectionBroken("closed during the preamble")
        except TimedOut:
            raise PreambleError(Refusal.PREAMBLE_TIMEOUT, f"no complete preamble within "
                                f"{self.preamble_timeout:g} s") from None
        finally:
            if not io.expired:
                io.deadline = float("inf")

    def _route(self, pre: Preamble) -> tuple[LocalInstance | None, Answer | None]:
        """The local instance to connect to (the named one, else any of the service),
        or the refusal."""
        found: LocalInstance | None = None
        other_protocol = False
        for li in self.mesh.local_instances(pre.service):
            if li.protocol != TCP:
                other_protocol = True
                continue
            if li.id == pre.instance:
                return li, None
            found = found or li
        if found is not None:
            return found, None
        if other_protocol:
            return None, Answer(Refusal.NOT_TCP, f"{pre.service} is not declared protocol=tcp "
                                "here")
        return None, Answer(Refusal.NOT_SERVED_HERE, f"{pre.service} is not served by this "
                            "agent")

    def _access(self, pre: Preamble, peer: Identity | None) -> Answer | None:
        claimed = pre.source or None
        holds: frozenset[str] = frozenset()
        source = claimed
        if self.tls is not None:
            refused, source = verified_source(self.tls, peer, pre.service, claimed)
            if refused:
                return self._deny(pre, source, refused)
            if peer is not None:
                holds = peer.services
        decision = self._evaluator().access_as(source, holds, pre.service)
        if not decision.allowed:
            return self._deny(pre, decision.source, decision.reason)
        return None

    def _unverified(self, pre: Preamble) -> None:
        """Without mutual TLS anyone can claim any source: say so, once per pair."""
        key = ("\0unverified", pre.service, pre.source)
        if key not in self._warned and len(self._warned) < 4096:
            self._warned.add(key)
            log.info("mesh TCP %s -> %s accepted on an unverified source (no mutual TLS: "
                     "the caller's sidecar says who calls)", pre.source or "(no source)",
                     pre.service, extra={"event": "tcp_unverified_source",
                                         "service": pre.service, "source": pre.source})

    def _deny(self, pre: Preamble, source: str | None, reason: str) -> Answer:
        key = (pre.service, source or "")
        if key not in self._warned and len(self._warned) < 4096:
            self._warned.add(key)
            how = "" if self.tls is not None else " (source unverified: no mutual TLS)"
            log.warning("denied mesh TCP %s -> %s%s: %s", source or "(unknown caller)",
                        pre.service, how, reason,
                        extra={"event": "access_denied", "service": pre.service,
                               "source": source, "protocol": "tcp"})
        return Answer(Refusal.ACCESS_DENIED, reason)

    async def _answer(self, io: SocketIO, answer: Answer) -> bool:
        """Send the answer; False if the caller is gone."""
        io.set_deadline(trio.current_time() + ANSWER_TIMEOUT)
        try:
            await io.send(answer.encode())
        except (ConnectionBroken, TimedOut):
            return False
        if not io.expired:
            io.deadline = float("inf")
        return True


#: The service label of a preamble that could not be read.
UNKNOWN_SERVICE = "unknown"

__all__ = ["ANSWER_TIMEOUT", "PREAMBLE_TIMEOUT", "TcpInbound"]
