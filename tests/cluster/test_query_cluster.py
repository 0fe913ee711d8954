"""Integration: cluster-wide queries across real agents on 127.0.0.1 (``rumor query``):
every agent answers, a killed one is reported missing, a filter reaches only matching
members, bad queries fail with the reason; and, between embedded nodes over real
sockets, an answer larger than a datagram is fetched by stream."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import trio

from rumor.gossip.config import LOCAL
from rumor.gossip.node import Node, NodeConfig

from ..agents import AgentCluster, rumor


def _query(api: str, *args: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(rumor("query", *args, "--api", api, "--json").stdout)
    return doc


def test_queries_over_five_real_agents(tmp_path: Path) -> None:
    cluster = AgentCluster(tmp_path)
    try:
        agents = cluster.start(5, extra=lambda i: ["--tag", f"zone={'b' if i in (1, 3) else 'a'}"])
        names = sorted(a.name for a in agents)
        doc = _query(agents[2].api, "ping")
        answers = doc["answers"]
        assert isinstance(answers, dict) and sorted(answers) == names
        assert doc["missing"] == []
        assert all(a["ok"] and a["answer"]["name"] == n for n, a in answers.items())
        stats = _query(agents[0].api, "stats", "--node", "a4")["answers"]
        assert isinstance(stats, dict) and list(stats) == ["a4"]
        assert set(stats["a4"]["answer"]["rtt_ms"]) <= set(names) - {"a4"}
        zoned = _query(agents[0].api, "ping", "--tag", "zone=b")["answers"]
        assert isinstance(zoned, dict) and sorted(zoned) == ["a1", "a3"]

        bad = rumor("query", "Ping!", "--api", agents[0].api, check=False)
        assert bad.returncode != 0 and "bad query name" in bad.stderr
        big = rumor("query", "ping", "--payload", "x" * 600, "--api", agents[0].api,
                    check=False)
        assert big.returncode != 0 and "at most 512 bytes" in big.stderr

        agents[4].signal(signal.SIGKILL)
        agents[4].wait_exit()
        doc = _query(agents[0].api, "ping", "--timeout", "1s")
        assert doc["missing"] == ["a4"]
        assert sorted(doc["answers"]) == names[:4]  # type: ignore[arg-type]
    finally:
        cluster.close()


def test_an_answer_larger_than_a_datagram_goes_by_stream_between_real_sockets() -> None:
    async def main() -> None:
        cfgs = [NodeConfig(name=f"n{i}", bind=("127.0.0.1", 0), gossip=LOCAL)
                for i in range(3)]
        async with Node(cfgs[0]) as n0, Node(cfgs[1]) as n1, Node(cfgs[2]) as n2:
            for n in (n1, n2):
                await n.join([n0.address])
            with trio.fail_after(10):
                while any(n.core.num_live() < 3 for n in (n0, n1, n2)):
                    await trio.sleep(0.02)
            for n in (n0, n1, n2):
                n.queries.register("big", lambda r, n=n: n.name.encode() * 40_000)
            done = await n0.queries.run("big", timeout=3.0)
            assert done.missing == []
            assert {m: (a.via, len(a.data)) for m, a in done.answers.items()} == {
                "n0": ("local", 80_000), "n1": ("stream", 80_000), "n2": ("stream", 80_000)}
            assert n0.parts.queries.stats["answers_fetched"] == 2
    trio.run(main)
