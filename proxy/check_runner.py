# layer: shell — runs health checks (trio)
"""The probing half of health checks: sockets and timers on trio.

One task per HTTP or TCP check: probe at once, then every ``interval``, each probe
bounded by ``timeout``, and hand the result to the sans-IO state machine through
``report(check_id, result, output)``. TTL checks need no task here: they are driven
by heartbeats through the API and expire in ``Catalog.tick``.

HTTP checks use httpcore (already the sidecar's client) with keep-alive disabled, so
every probe opens a fresh connection: a check must notice that the listener is gone,
not reuse a connection accepted before it went.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..gossip.checks import CRITICAL, PASSING, WARNING, CheckSpec
from ..gossip.discovery import Report

if TYPE_CHECKING:  # imported when the first check probes (~20 ms an agent with none
    import httpcore  # never pays)

log = logging.getLogger("rumor.checks")


async def probe(spec: CheckSpec, pool: httpcore.AsyncConnectionPool) -> tuple[str, str]:
    """Run one probe; returns (result, output). Never raises for a failing service."""
    try:
        with trio.fail_after(spec.timeout):
            if spec.kind == "http":
                return await _probe_http(spec, pool)
            if spec.kind == "tcp":
                return await _probe_tcp(spec)
    except trio.TooSlowError:
        return CRITICAL, f"timed out after {spec.timeout:g}s"
    raise ValueError(f"{spec.kind} checks are not probed")


async def _probe_http(spec: CheckSpec, pool: httpcore.AsyncConnectionPool) -> tuple[str, str]:
    import httpcore

    t = spec.timeout
    try:
        resp = await pool.request(
            "GET", spec.target, headers=[(b"user-agent", b"rumor-health-check")],
            extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}})
    except httpcore.TimeoutException:
        return CRITICAL, f"GET {spec.target}: timed out after {t:g}s"
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
            OSError) as e:
        return CRITICAL, f"GET {spec.target}: {type(e).__name__}: {e}"
    line = f"GET {spec.target}: {resp.status}"
    if 200 <= resp.status < 300:
        return PASSING, line
    if resp.status == 429:  # Too Many Requests: alive but shedding load
        return WARNING, line
    return CRITICAL, line


async def _probe_tcp(spec: CheckSpec) -> tuple[str, str]:
    host, _, port = spec.target.rpartition(":")
    try:
        stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
    except OSError as e:
        return CRITICAL, f"connect {spec.target}: {e.strerror or e}"
    await stream.aclose()
    return PASSING, f"connect {spec.target}: ok"


class CheckRunner:
    """Runs the probe loops of the local checks; start and stop them by check id.
    (A ``gossip.discovery.ProbeRunner``: pass the class as
    ``Discovery(..., probes=CheckRunner)``.)"""

    def __init__(self, nursery: trio.Nursery, report: Report) -> None:
        self._nursery = nursery
        self._report = report
        self._scopes: dict[str, tuple[CheckSpec, trio.CancelScope]] = {}
        self._http: httpcore.AsyncConnectionPool | None = None

    @property
    def _pool(self) -> httpcore.AsyncConnectionPool:
        """The HTTP checks' pool, made (and httpcore imported) when first used."""
        if self._http is None:
            import httpcore

            self._http = httpcore.AsyncConnectionPool(max_keepalive_connections=0)
        return self._http

    def sync(self, checks: dict[str, CheckSpec]) -> None:
        """Make the running loops match ``checks`` (id -> spec): start new ones, stop
        removed ones, restart changed ones."""
        for cid, (spec, scope) in list(self._scopes.items()):
            if checks.get(cid) != spec:
                scope.cancel()
                del self._scopes[cid]
        for cid, spec in checks.items():
            if spec.kind != "ttl" and cid not in self._scopes:
                scope = trio.CancelScope()
                self._scopes[cid] = (spec, scope)
                self._nursery.start_soon(self._loop, cid, spec, scope)

    def stop(self) -> None:
        for _, scope in self._scopes.values():
            scope.cancel()
        self._scopes.clear()

    async def aclose(self) -> None:
        self.stop()
        if self._http is not None:
            await self._http.aclose()

    async def _loop(self, cid: str, spec: CheckSpec, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                started = trio.current_time()
                result, output = await probe(spec, self._pool)
                log.debug("check %s: %s (%s)", cid, result, output)
                self._report(cid, result, output)
                await trio.sleep_until(started + spec.interval)
