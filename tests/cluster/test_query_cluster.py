"""Integration: cluster-wide queries across real agents on 127.0.0.1 (``rumor query``):
every agent answers, a killed one is reported missing, a filter reaches only matching
members, bad queries fail with the reason; and, between embedded nodes over real
sockets, an answer larger than a datagram is fetched by stream."""

from __future__ import annotations

import json
import signal
from datetime import datetime
from pathlib import Path

import pytest
import trio

from rumor.gossip.config import LOCAL
from rumor.gossip.node import Node, NodeConfig

from ..agents import AgentCluster, rumor, wait_for


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


# alone: which survivor suspected first is read from wall clocks that explain aligns by
# round-trip offset estimates, ms apart; another worker's load skews them (seen once).
@pytest.mark.alone
def test_explain_after_kill_names_the_suspecter_and_confirmers_the_logs_show(
        tmp_path: Path) -> None:
    cluster = AgentCluster(tmp_path)
    try:
        agents = cluster.start(5)
        victim = agents[4]
        victim.signal(signal.SIGKILL)
        victim.wait_exit()
        wait_for(lambda: all(a.status_of("a4") == "failed" for a in agents[:4]), 30,
                 "a4 failed everywhere")
        # What each survivor logged: its own suspicion (raised after its probes failed,
        # or confirmed independently), at its wall-clock time (ms; "at" is each agent's
        # own monotonic clock, not comparable across agents).
        own: dict[str, datetime] = {}
        for a in agents[:4]:
            for line in a.log.read_text().splitlines():
                e = json.loads(line) if line.startswith("{") else {}
                if (e.get("member") == "a4" and e.get("by") == a.name
                        and e.get("kind") in ("suspect_raised", "suspect_confirmed")):
                    own.setdefault(a.name, datetime.fromisoformat(e["ts"]))
        assert own, "no agent logged a suspicion of a4"
        earliest = min(own.values())
        logged_first = {n for n, t in own.items() if t == earliest}

        out = rumor("explain", "a4", "--api", agents[1].api, "--json").stdout
        doc = json.loads(out)
        assert sorted(doc["agents"]) == ["a0", "a1", "a2", "a3"]
        assert doc["missing"] == [] and doc["errors"] == {}  # a failed member is not asked
        story = doc["story"]
        assert story["first_suspecter"] in logged_first
        assert set(story["confirmers"]) == set(own) - {story["first_suspecter"]}
        assert story["declared_by"], "nobody declared a4 failed"
        first = story["episodes"][0]
        assert first["missed_probes"], "the first suspicion came without failed probes"
        assert first["refuted_at"] is None

        text = rumor("explain", "a4", "--api", agents[0].api).stdout
        assert f"first suspected by {story['first_suspecter']}" in text
        assert "declared failed by" in text and "4 agent(s) answered of 4 asked" in text
    finally:
        cluster.close()
