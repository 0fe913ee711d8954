"""The health-check probes on a virtual clock: each check is probed at once and then
every interval, HTTP answers map to passing / warning / critical, a refused connect
or a silent server is critical within the check's timeout, and sync starts and stops
the loops."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing

from rumor.gossip.checks import CRITICAL, PASSING, WARNING, CheckSpec
from rumor.proxy.check_runner import CheckRunner

Reports = list[tuple[float, str, str, str]]


async def _http_server(nursery: trio.Nursery, statuses: list[int],
                       hang: bool = False) -> int:
    """A tiny HTTP server answering each connection with the next status."""
    listeners = await nursery.start(partial(trio.serve_tcp, _handler(statuses, hang), 0,
                                            host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def _handler(statuses: list[int], hang: bool) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        if hang:
            await trio.sleep_forever()
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        await stream.send_all(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n"
                              "connection: close\r\n\r\n".encode())
        await stream.aclose()
    return handle


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()  # nothing listens there now: connects are refused
    return port


def _run(body: Callable[[trio.Nursery, CheckRunner], Awaitable[None]]) -> Reports:
    reports: Reports = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            runner = CheckRunner(n, lambda cid, result, out: reports.append(
                (trio.current_time(), cid, result, out)))
            await body(n, runner)
            await runner.aclose()
            n.cancel_scope.cancel()
    # Real loopback I/O: jump the virtual clock only after a real pause.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))
    return reports


def test_http_answers_map_to_statuses_at_every_interval() -> None:
    async def body(n: trio.Nursery, runner: CheckRunner) -> None:
        port = await _http_server(n, [200, 429, 500, 200])
        runner.sync({"web": CheckSpec("http", f"http://127.0.0.1:{port}/health",
                                      interval=10.0, timeout=1.0)})
        await trio.sleep(35.0)
    reports = _run(body)
    assert [(round(t), r) for t, _, r, _ in reports] == [
        (0, PASSING), (10, WARNING), (20, CRITICAL), (30, PASSING)]
    assert reports[2][3].endswith(": 500")


def test_a_refused_connect_and_a_silent_server_are_critical_in_time() -> None:
    async def body(n: trio.Nursery, runner: CheckRunner) -> None:
        port = await _http_server(n, [200], hang=True)
        runner.sync({"tcp": CheckSpec("tcp", f"127.0.0.1:{_closed_port()}", interval=5.0),
                     "slow": CheckSpec("http", f"http://127.0.0.1:{port}/", interval=30.0,
                                       timeout=2.0)})
        await trio.sleep(3.0)
    reports = {cid: (t, r, out) for t, cid, r, out in _run(body)}
    assert reports["tcp"][1] == CRITICAL and "connect" in reports["tcp"][2]
    t, result, out = reports["slow"]
    assert result == CRITICAL and "timed out after 2s" in out
    assert t == pytest.approx(2.0)


def test_sync_starts_changed_checks_and_stops_removed_ones() -> None:
    async def body(n: trio.Nursery, runner: CheckRunner) -> None:
        port = await _http_server(n, [200])
        url = f"http://127.0.0.1:{port}/"
        runner.sync({"a": CheckSpec("http", url, interval=10.0),
                     "t": CheckSpec("ttl", ttl=5.0)})  # TTL checks get no probe
        await trio.sleep(1.0)
        runner.sync({"a": CheckSpec("http", url, interval=4.0)})  # changed: restarted
        await trio.sleep(5.0)
        runner.sync({})
        await trio.sleep(20.0)
    reports = _run(body)
    assert [(round(t), cid) for t, cid, _, _ in reports] == [(0, "a"), (1, "a"), (5, "a")]
