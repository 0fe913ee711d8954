"""The trio runtime (``Node``) with real loopback sockets on trio's MockClock.

Virtual time makes LAN-profile timeouts (seconds of suspicion) take milliseconds of
wall time: the clock jumps whenever every task is waiting, and loopback datagrams
arrive well within the autojump threshold.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio
import trio.testing

from rumor.gossip.config import LAN
from rumor.gossip.effects import MemberEvent
from rumor.gossip.node import JoinError, Node, NodeConfig


def _run(fn, *args):  # type: ignore[no-untyped-def]
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0.02))


def test_embedded_nodes_converge_detect_failure_and_stream_events() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            nodes = [await stack.enter_async_context(
                Node(NodeConfig(name=f"n{i}", bind=("127.0.0.1", 0), gossip=LAN, seed=i,
                                tags={"zone": "z1"})))
                for i in range(3)]
            events = nodes[0].subscribe()
            seed = f"127.0.0.1:{nodes[0].address[1]}"
            for n in nodes[1:]:
                assert await n.join([seed]) == 1
            with trio.fail_after(10):
                while not all(sum(m["status"] == "alive" for m in n.members()) == 3
                              for n in nodes):
                    await trio.sleep(0.05)
            assert nodes[1].members()[0]["tags"] == {"zone": "z1"}

            # n2 stops without leaving: to the others it has crashed.
            victim = nodes.pop()
            await victim.__aexit__(None, None, None)
            t0 = trio.current_time()
            seen: list[MemberEvent] = []
            with trio.fail_after(LAN.suspicion_max(3) + 10):
                async for ev in events:
                    seen.append(ev)
                    if ev.name == "n2" and ev.kind == "failed":
                        break
            kinds = [e.kind for e in seen if e.name == "n2"]
            assert kinds[-2:] == ["suspect", "failed"]
            # 3 members: too few for confirmations, so the minimum timeout applies.
            assert trio.current_time() - t0 <= 2 * LAN.probe_interval + LAN.suspicion_min(3) + 1
            health = nodes[0].health()
            assert health["members"]["failed"] == 1
    _run(main)


def test_join_to_nobody_raises_join_error() -> None:
    async def main() -> None:
        cfg = LAN.with_overrides(join_attempts=2, join_backoff=0.5, stream_timeout=1.0)
        async with Node(NodeConfig(name="x", bind=("127.0.0.1", 0), gossip=cfg)) as n:
            with trio.fail_after(30):
                try:
                    await n.join(["127.0.0.1:1"])
                except JoinError as e:
                    assert "127.0.0.1:1" in str(e)
                else:
                    raise AssertionError("join should fail")
    _run(main)


def test_graceful_leave_is_seen_as_left() -> None:
    async def main() -> None:
        async with Node(NodeConfig(name="a", bind=("127.0.0.1", 0), seed=1)) as a:
            async with Node(NodeConfig(name="b", bind=("127.0.0.1", 0), seed=2)) as b:
                await b.join([f"127.0.0.1:{a.address[1]}"])
                with trio.fail_after(5):
                    while len(a.members()) < 2:
                        await trio.sleep(0.05)
                await b.leave()
            with trio.fail_after(5):
                while [m["status"] for m in a.members() if m["name"] == "b"] != ["left"]:
                    await trio.sleep(0.05)
    _run(main)
