"""The catalog's trio shell on a virtual clock: blocking queries and watches wake on
changes, TTL checks expire on time, heartbeats and probe reports reach the catalog."""

from __future__ import annotations

import random

import trio
import trio.testing

from rumor.gossip.assembly import NodeSpec, assemble
from rumor.gossip.checks import CRITICAL, PASSING, CheckSpec
from rumor.gossip.config import LOCAL
from rumor.gossip.discovery import Discovery, Report
from rumor.gossip.service_spec import parse_spec


def _discovery(probes: object = None) -> tuple[Discovery, list[int]]:
    parts = assemble(NodeSpec("me", ("10.0.0.1", 7946), LOCAL), 0.0, random.Random(1),
                     new_id=lambda: "id")
    wakes: list[int] = []
    return Discovery(parts.catalog, lambda: wakes.append(1), probes=probes), wakes  # type: ignore[arg-type]


def test_a_blocking_query_returns_on_a_change_or_at_its_timeout() -> None:
    async def main() -> None:
        d, wakes = _discovery()
        async with trio.open_nursery() as n:
            n.start_soon(d.run)
            index = d.index("web")
            t0 = trio.current_time()
            assert await d.wait(index, 30.0, "web") == index  # nothing changed: timeout
            assert trio.current_time() - t0 == 30.0

            async def register_later() -> None:
                await trio.sleep(2.0)
                d.register(parse_spec("name=web,port=8080"))
            n.start_soon(register_later)
            t0 = trio.current_time()
            assert await d.wait(index, 30.0, "web") > index
            assert trio.current_time() - t0 == 2.0 and wakes  # the node was woken
            assert [i.port for i in d.instances("web")] == [8080]
            n.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_watch_yields_the_state_then_each_change_and_ttl_expiry_is_timed() -> None:
    async def main() -> None:
        d, _ = _discovery()
        seen: list[tuple[float, list[str]]] = []
        async with trio.open_nursery() as n:
            n.start_soon(d.run)
            (cid,) = d.register(parse_spec("name=api,port=9000,check=ttl,ttl=10s,"
                                           "initial=passing"))

            async def watch() -> None:
                async for change in d.watch("api", include_critical=False):
                    seen.append((trio.current_time(), [i.node for i in change.instances]))
            n.start_soon(watch)
            await trio.sleep(5.0)
            d.heartbeat(cid)  # the TTL restarts: critical at 15 s, not 10 s
            await trio.sleep(20.0)
            n.cancel_scope.cancel()
        assert seen == [(0.0, ["me"]), (15.0, [])]
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


RUNNERS: list[_FakeProbes] = []


class _FakeProbes:
    """A ProbeRunner that reports what the test tells it to."""

    def __init__(self, nursery: trio.Nursery, report: Report) -> None:
        self.report = report
        self.synced: list[dict[str, CheckSpec]] = []
        self.closed = False
        RUNNERS.append(self)

    def sync(self, checks: dict[str, CheckSpec]) -> None:
        self.synced.append(dict(checks))

    async def aclose(self) -> None:
        self.closed = True


def test_probe_runners_are_kept_in_sync_and_their_reports_change_the_catalog() -> None:
    async def main() -> None:
        d, _ = _discovery(_FakeProbes)
        async with trio.open_nursery() as n:
            n.start_soon(d.run)
            await trio.testing.wait_all_tasks_blocked()
            runner = RUNNERS[-1]
            (cid,) = d.register(parse_spec("name=web,port=80,check=tcp://127.0.0.1:80"))
            assert list(runner.synced[-1]) == [cid]
            assert not d.instances("web")  # checks start critical
            runner.report(cid, PASSING, "ok")
            assert [i.status for i in d.instances("web")] == [PASSING]
            runner.report(cid, CRITICAL, "refused")
            assert d.instances("web") == []
            d.deregister("web")
            assert runner.synced[-1] == {}
            runner.report(cid, PASSING, "late")  # a probe in flight when it went: ignored
            n.cancel_scope.cancel()
        assert runner.closed
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
