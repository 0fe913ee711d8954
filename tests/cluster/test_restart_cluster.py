"""Integration: restart memory on real agents — an agent restarted with its
``--data-dir`` and no ``--join`` rejoins through its member snapshot (after a crash;
after a graceful leave only with ``--rejoin-after-leave``), and ``--retry-join`` waits
for a seed that starts after the agent."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

from ..agents import Agent, AgentCluster, wait_for


def log_events(a: Agent, event: str) -> list[dict[str, Any]]:
    out = []
    for line in a.log.read_text().splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == event:
                out.append(ev)
    return out


def remembered(data: Path) -> set[str]:
    try:
        doc = json.loads((data / "members.json").read_text())
    except (OSError, ValueError):
        return set()
    return {m["name"] for m in doc["members"]}


def test_an_agent_restarted_without_join_rejoins_through_its_snapshot(
        cluster: AgentCluster) -> None:
    data = [cluster.workdir / f"data{i}" for i in range(3)]
    agents = cluster.start(3, lambda i: ["--data-dir", str(data[i])])
    victim, others = agents[2], agents[:2]
    wait_for(lambda: remembered(data[2]) == {"a0", "a1"}, 10, "the snapshot to list both")

    # A crash (kill -9): the next start rejoins through the snapshot by itself.
    victim.signal(signal.SIGKILL)
    victim.wait_exit()
    victim.start()  # no --join
    wait_for(lambda: cluster.converged(3), 20, "the restarted agent to rejoin")
    assert log_events(victim, "rejoining")
    assert [e for e in log_events(victim, "joined") if e.get("rejoined")]

    # A graceful leave is remembered: the next start stays alone ...
    victim.signal(signal.SIGTERM)
    assert victim.wait_exit() == 0
    doc = json.loads((data[2] / "members.json").read_text())
    assert doc["left"] is True and {m["name"] for m in doc["members"]} == {"a0", "a1"}
    wait_for(lambda: all(a.status_of(victim.name) == "left" for a in others), 10,
             "everyone to see the leave")
    victim.start()
    wait_for(lambda: log_events(victim, "rejoin_skipped"), 20, "the skipped rejoin")
    assert set(victim.members()) == {victim.name}
    victim.signal(signal.SIGKILL)
    victim.wait_exit()
    # ... unless told otherwise.
    victim.extra.append("--rejoin-after-leave")
    victim.start()
    wait_for(lambda: cluster.converged(3), 20, "the agent to rejoin after its leave")


def test_a_corrupt_snapshot_is_one_warning_and_the_agent_starts(
        cluster: AgentCluster) -> None:
    data = cluster.workdir / "data"
    data.mkdir()
    (data / "members.json").write_bytes(b'{"version": 1, "node": "a0", "members": [')
    [a] = cluster.start(1, ["--data-dir", str(data)])
    warnings = log_events(a, "snapshot_ignored")
    assert len(warnings) == 1 and "members.json" in warnings[0]["msg"]
    assert warnings[0]["level"] == "warning"


def test_retry_join_waits_for_a_seed_that_starts_later(cluster: AgentCluster) -> None:
    seed = Agent("seed", cluster.workdir)  # its port is picked; it is not started yet
    early = Agent("early", cluster.workdir,
                  ["--retry-join", seed.addr, "--retry-interval", "2"])
    cluster.agents += [early, seed]
    early.start()
    # The agent runs and serves its API while its seed is missing.
    wait_for(lambda: early.members(), 20, "the early agent's API")
    wait_for(lambda: log_events(early, "retry_join"), 20, "a failed round in the log")
    assert "next try in" in log_events(early, "retry_join")[0]["msg"]
    seed.start()
    wait_for(lambda: cluster.converged(2), 20, "the early agent to join the late seed")
    assert [e for e in log_events(early, "joined") if e.get("failures")]


def test_after_a_whole_cluster_outage_the_agents_find_each_other_again(
        cluster: AgentCluster) -> None:
    """Every agent is killed. The first one back finds nobody: it runs alone, keeps
    its remembered members (an empty view must not erase them) and keeps trying them
    in the background. The others come back knowing nothing of it (fresh data dirs,
    one joining the other), so only that retry can bring the cluster together."""
    data = [cluster.workdir / f"data{i}" for i in range(3)]
    agents = cluster.start(3, lambda i: ["--data-dir", str(data[i])])
    for i, a in enumerate(agents):
        others = {b.name for b in agents} - {a.name}
        wait_for(lambda d=data[i], o=others: remembered(d) == o, 10, "the snapshots")
    for a in agents:
        a.signal(signal.SIGKILL)
        a.wait_exit()
    a0, a1, first = agents
    first.start()
    wait_for(lambda: log_events(first, "rejoin_failed"), 20, "the failed rejoin")
    assert remembered(data[2]) == {"a0", "a1"}
    for d in data[:2]:
        shutil.rmtree(d)
    a0.start()
    a1.start(join=a0)
    wait_for(lambda: cluster.converged(3), 30, "the cluster to reassemble")
    assert log_events(first, "joined")
