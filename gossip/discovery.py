# layer: shell — resolves seeds (trio)
"""The trio face of the service catalog, for programs and the API.

The sans-IO ``Catalog`` decides everything; this shell gives it a clock (TTL expiry,
tombstone collection), runs the check probes (a ``ProbeRunner``: the sidecar's is
``proxy.check_runner.CheckRunner``, since probing is HTTP), wakes the node so
catalog broadcasts go out at once, and turns catalog changes into things a trio
program can wait on: blocking queries (``wait``) and watches::

    async with Node(cfg) as node, trio.open_nursery() as nursery:
        catalog = Discovery(node.parts.catalog, node.wake, probes=CheckRunner)
        nursery.start_soon(catalog.run)
        catalog.register(parse_spec("name=web,port=8080"))
        print(catalog.instances("web"))
        async for change in catalog.watch("web"):
            print(change.index, [i.address for i in change.instances])
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .catalog import Catalog, Instance
from .checks import PASSING, CheckSpec
from .service_spec import Registration

#: ``report(check_id, result, output)``: a probe's outcome, for the sans-IO checks.
Report = Callable[[str, str, str], None]


class ProbeRunner(Protocol):
    """Runs the probes of HTTP and TCP checks (TTL checks need none)."""

    def sync(self, checks: dict[str, CheckSpec]) -> None:
        """Make the running probes match ``checks`` (id -> spec)."""

    async def aclose(self) -> None: ...


#: Builds a runner whose tasks live in the given nursery and report through ``Report``.
ProbeRunnerFactory = Callable[[trio.Nursery, Report], ProbeRunner]

#: How often old tombstones are collected when nothing else wakes the timer.
HOUSEKEEPING = 30.0


@dataclass(frozen=True, slots=True)
class CatalogChange:
    """What a watch yields: the service's instances after a change, and its index."""

    service: str
    index: int
    instances: list[Instance]


class Discovery:
    """Service registration and discovery for a running ``Node``."""

    def __init__(self, catalog: Catalog, wake: Callable[[], None],
                 probes: ProbeRunnerFactory | None = None) -> None:
        """``probes`` runs HTTP and TCP checks; without it only TTL checks change."""
        self.catalog = catalog
        self._wake = wake
        self._probes = probes
        self._changed = trio.Event()
        self._timer: trio.CancelScope | None = None
        self._runner: ProbeRunner | None = None
        catalog.on_change(self._on_change)

    # ---- queries ------------------------------------------------------------------------

    def instances(self, name: str, *, tag: str | None = None, version: str | None = None,
                  passing: bool = False, include_critical: bool = False,
                  near: bool = False) -> list[Instance]:
        """Visible instances of ``name`` (critical ones only with ``include_critical``);
        ``near`` sorts by the probe RTT this agent measured to each instance's host."""
        return self.catalog.instances(name, tag=tag, version=version, passing=passing,
                                      include_critical=include_critical, near=near)

    def services(self) -> dict[str, dict[str, Any]]:
        return self.catalog.services()

    def index(self, name: str | None = None) -> int:
        """The catalog's change index, or that of one service."""
        return self.catalog.index if name is None else self.catalog.service_index(name)

    async def wait(self, index: int, timeout: float, name: str | None = None) -> int:
        """Blocking query: return once the index (of ``name``, or of the whole catalog)
        is above ``index`` or ``timeout`` passed; returns the index then."""
        with trio.move_on_after(timeout):
            while self.index(name) <= index:
                await self._changed.wait()
        return self.index(name)

    async def watch(self, name: str, **filters: Any) -> AsyncIterator[CatalogChange]:
        """The current instances of ``name`` at once, then again after every change to
        them (filters as for ``instances``). Changes that arrive while the consumer is
        busy are coalesced: a watch always yields the latest state, never a backlog."""
        last: list[Instance] | None = None
        index = 0
        while True:
            index = await self.wait(index, math.inf, name) if last is not None \
                else self.index(name)
            current = self.instances(name, **filters)
            if current != last:
                last = current
                yield CatalogChange(name, index, current)

    # ---- local services ---------------------------------------------------------------------

    def register(self, reg: Registration) -> list[str]:
        """Add or replace a local service (and start its checks); returns check ids."""
        return self.register_many([reg])[reg.service.id]

    def register_many(self, regs: list[Registration]) -> dict[str, list[str]]:
        self.catalog.register_many(trio.current_time(), regs)
        self._after_local_change()
        return {r.service.id: list(self.catalog.local[r.service.id].checks) for r in regs}

    def check_registrations(self, regs: list[Registration],
                            removing: Iterable[str] = ()) -> None:
        """Raise ``CatalogLimitError`` if registering ``regs`` after deregistering
        ``removing`` would pass a catalog cap; changes nothing."""
        self.catalog.check_registrations(regs, removing)

    def deregister(self, service_id: str) -> bool:
        found = self.catalog.deregister(trio.current_time(), service_id)
        self._after_local_change()
        return found

    def heartbeat(self, check_id: str, status: str = PASSING, output: str = "") -> None:
        """TTL heartbeat; KeyError for an unknown check, ValueError for a non-TTL one."""
        self.catalog.heartbeat(trio.current_time(), check_id, status, output)
        self._after_local_change()

    def local_services(self) -> list[dict[str, Any]]:
        """This agent's own services with their checks' full state (output included)."""
        out = []
        for sid, ls in sorted(self.catalog.local.items()):
            s = ls.service
            out.append({"id": sid, "name": s.name, "port": s.port, "address": s.address,
                        "tags": list(s.tags), "version": s.version, "weight": s.weight,
                        "checks": [{"id": c.id, "kind": c.spec.kind, "target": c.spec.target,
                                    "status": c.status, "output": c.output,
                                    "interval_s": c.spec.interval, "ttl_s": c.spec.ttl}
                                   for c in ls.checks.values()]})
        return out

    # ---- runtime ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run check probes and the catalog's timer until cancelled (a task of the
        program's nursery)."""
        async with trio.open_nursery() as nursery:
            runner = None if self._probes is None else self._probes(nursery, self._report)
            self._runner = runner
            self._sync_checks()
            try:
                await self._timer_loop()
            finally:
                if runner is not None:
                    with trio.CancelScope(shield=True):
                        await runner.aclose()

    async def _timer_loop(self) -> None:
        while True:
            now = trio.current_time()
            deadline = min(self.catalog.next_deadline(), now + HOUSEKEEPING)
            with trio.CancelScope(deadline=deadline) as scope:
                self._timer = scope
                await trio.sleep_forever()
            self._timer = None
            self.catalog.tick(trio.current_time())
            self._wake()

    def _report(self, check_id: str, result: str, output: str) -> None:
        try:
            self.catalog.check_result(trio.current_time(), check_id, result, output)
        except KeyError:
            return  # deregistered while its probe was in flight
        self._wake()

    def _after_local_change(self) -> None:
        self._sync_checks()
        if self._timer is not None:
            self._timer.deadline = min(self._timer.deadline, self.catalog.next_deadline())
        self._wake()

    def _sync_checks(self) -> None:
        if self._runner is not None:
            self._runner.sync({st.id: st.spec for _, st in self.catalog.local_checks()})

    def _on_change(self, names: frozenset[str]) -> None:
        ev, self._changed = self._changed, trio.Event()
        ev.set()
