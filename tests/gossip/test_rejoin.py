"""The restart-memory shell on real loopback sockets and trio's MockClock: the keeper
writes the members it sees (coalesced), rejoining goes through the batches until one
answers, and ``retry_join`` keeps trying a seed that starts late, on the schedule."""

from __future__ import annotations

import json
import logging
import random
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trio.testing

from rumor.gossip.backoff import retry_schedule
from rumor.gossip.config import LOCAL
from rumor.gossip.node import Node, NodeConfig
from rumor.gossip.rejoin import SnapshotFile, SnapshotKeeper, rejoin, retry_join
from rumor.gossip.snapshot import SnapshotError

from ..ports import free_port


def _run(fn, *args):  # type: ignore[no-untyped-def]
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0.02))


def _node(name: str, port: int = 0, seed: int = 0) -> Node:
    return Node(NodeConfig(name=name, bind=("127.0.0.1", port), gossip=LOCAL,
                           profile="local", seed=seed))


async def _converged(nodes: list[Node], n: int) -> None:
    with trio.fail_after(20):
        while not all(sum(m["status"] == "alive" for m in x.members()) == n for x in nodes):
            await trio.sleep(0.05)


def test_the_keeper_writes_live_members_coalesced_and_marks_a_leave(tmp_path: Path) -> None:
    file = SnapshotFile(tmp_path)

    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            nodes = [await stack.enter_async_context(_node(f"n{i}", seed=i))
                     for i in range(5)]
            keeper = SnapshotKeeper(nodes[0], file)
            nursery.start_soon(keeper.run)
            await trio.sleep(0)
            for x in nodes[1:]:
                await x.join([nodes[0].address])
            await _converged(nodes, 5)
            await trio.sleep(1.5)  # the coalesced write is due within a second
            snap = file.load()
            assert snap is not None and not snap.left and snap.node == "n0"
            assert {m.name: m.addr for m in snap.members} == {
                x.name: x.address for x in nodes[1:]}
            # Four joins (and their updates) within a second or two: a few writes.
            assert 1 <= keeper.writes <= 3
            writes = keeper.writes
            await trio.sleep(5)
            assert keeper.writes == writes  # nothing changed: nothing written
            # A member that fails drops out of the snapshot.
            await nodes[4].__aexit__(None, None, None)
            with trio.fail_after(30):
                while len((file.load() or snap).members) != 3:
                    await trio.sleep(0.5)
            await nodes[0].leave()
            await keeper.close(left=True)
            left = file.load()
            assert left is not None and left.left and len(left.members) == 3
            nursery.cancel_scope.cancel()
    _run(main)


def test_a_failing_write_is_one_warning_and_the_keeper_runs_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = SnapshotFile(tmp_path / "no-such-dir")

    async def main() -> None:
        async with trio.open_nursery() as nursery, _node("a", seed=1) as a, \
                _node("b", seed=2) as b, _node("c", seed=3) as c:
            keeper = SnapshotKeeper(a, file)
            nursery.start_soon(keeper.run)
            await trio.sleep(0)
            await b.join([a.address])
            await trio.sleep(1.5)
            await c.join([a.address])
            await _converged([a, b, c], 3)
            await trio.sleep(3)
            assert keeper.writes == 0
            (tmp_path / "no-such-dir").mkdir()
            await c.leave()  # a change: the next write succeeds
            with trio.fail_after(10):
                while keeper.writes == 0:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    with caplog.at_level(logging.INFO, logger="rumor.gossip"):
        _run(main)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "member snapshot" in r.getMessage()]
    assert len(warnings) == 1 and "no-such-dir" in warnings[0].getMessage()
    assert any("written again" in r.getMessage() for r in caplog.records)
    assert file.load() is not None


def test_rejoin_goes_through_the_batches_until_one_answers() -> None:
    dead = [("127.0.0.1", free_port()) for _ in range(4)]

    async def main() -> None:
        async with _node("a", seed=1) as a, _node("b", seed=2) as b, _node("r", seed=3) as r:
            await b.join([a.address])
            batches = [dead[:3], [dead[3], b.address]]
            assert await rejoin(r, batches) == 1
            await _converged([a, b, r], 3)
            assert await rejoin(r, [dead]) == 0  # nobody answers: 0, no exception
    _run(main)


def test_retry_join_waits_for_a_late_seed_on_the_schedule(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery, _node("early", seed=1) as early:
            joined: list[int] = []

            async def keep_trying() -> None:
                joined.append(await retry_join(early, [f"127.0.0.1:{port}"], 8.0,
                                               random.Random(7)))
            nursery.start_soon(keep_trying)
            await trio.sleep(20)  # the seed is not there yet: rounds fail
            assert not joined
            async with _node("seed", port=port, seed=2) as seed:
                with trio.fail_after(10):
                    while not joined:
                        await trio.sleep(0.1)
                assert joined == [1]
                await _converged([early, seed], 2)
    with caplog.at_level(logging.INFO, logger="rumor.gossip"):
        _run(main)
    rounds = [r for r in caplog.records if getattr(r, "event", None) == "retry_join"]
    waits = [r.next_in_s for r in rounds]  # type: ignore[attr-defined]
    # The waits are the pure schedule's, drawn from the same generator.
    expected = retry_schedule(len(waits), 8.0, random.Random(7))
    assert waits == [round(w, 3) for w in expected]
    assert len(waits) >= 4 and max(waits) <= 8.0  # 1, 2, 4, 8, 8 ... less jitter
    assert "next try in" in rounds[0].getMessage()
    assert any(getattr(r, "event", None) == "joined" for r in caplog.records)


def test_a_missing_snapshot_is_none_and_a_corrupt_one_names_the_file(tmp_path: Path) -> None:
    file = SnapshotFile(tmp_path)
    assert file.load() is None
    file.path.write_text(json.dumps({"version": 1, "node": "a", "members": [{"name": "b"}]}))
    with pytest.raises(SnapshotError, match=r"members\.json: members\[0\]\.addr"):
        file.load()


def test_retry_join_through_many_remembered_members_tries_a_few_per_round() -> None:
    """A long list (a big cluster's snapshot) is sampled each round, never sent a
    push-pull all at once."""
    from rumor.gossip.node import JoinError
    addrs = [("127.0.0.1", 40000 + i) for i in range(30)]
    tried: list[list[tuple[str, int]]] = []

    class Node:
        async def join(self, seeds: list[tuple[str, int]], attempts: int) -> int:
            tried.append(list(seeds))
            if len(tried) < 4:
                raise JoinError("no answer")
            return 1

    async def main() -> None:
        n = await retry_join(Node(), addrs, 4.0, random.Random(1),  # type: ignore[arg-type]
                             per_round=3)
        assert n == 1
    _run(main)
    assert len(tried) == 4 and all(len(b) == 3 for b in tried)
    assert len({a for b in tried for a in b}) > 3  # drawn afresh each round
