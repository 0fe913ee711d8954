"""Integration: a rolling upgrade across cluster-wide queries. An agent of the build
before them (a git worktree of it) beside two of this one, gossip encrypted: queries,
golden metrics and explain reach the new agents and report the old one missing; the
old agent's keyring command (its own channel) still reaches every agent; membership
never wavers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rumor.gossip.keyring_file import generate_key

from ..agents import Agent, AgentCluster, previous_build, rumor, wait_for

#: main before cluster-wide queries (issue 29).
PREVIOUS_BUILD = "7a4deec"


def _json(*args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(rumor(*args, "--json").stdout)
    return doc


def test_queries_in_a_mixed_cluster_report_the_old_agent_missing(tmp_path: Path) -> None:
    with previous_build(tmp_path, PREVIOUS_BUILD) as old_tree:
        if old_tree is None:
            pytest.skip(f"no git history with {PREVIOUS_BUILD} (the previous build) here")
        _mixed(tmp_path, old_tree)


def _mixed(tmp_path: Path, old_tree: Path) -> None:
    key, added = generate_key(), generate_key()
    files = {}
    for name in ("old0", "new0", "new1"):
        files[name] = tmp_path / f"{name}.keyring"
        files[name].write_text(key + "\n")
    cluster = AgentCluster(tmp_path)
    try:
        old = Agent("old0", tmp_path, ["--keyring", str(files["old0"])],
                    env={"PYTHONPATH": str(old_tree / ".typecheck")})
        old.start(None)
        cluster.agents.append(old)
        wait_for(old.members, 20, "the old agent's API")
        for name in ("new0", "new1"):
            a = Agent(name, tmp_path, ["--keyring", str(files[name])])
            a.start(old)
            cluster.agents.append(a)
        wait_for(lambda: cluster.converged(3), 30, "the mixed cluster to converge")
        new0, new1 = cluster.agents[1], cluster.agents[2]
        # The old agent really is the previous build: its API has no query route.
        res = rumor("query", "ping", "--api", old.api, check=False)
        assert res.returncode != 0 and "404" in res.stderr, res.stderr

        ping = _json("query", "ping", "--timeout", "1s", "--api", new0.api)
        assert sorted(ping["answers"]) == ["new0", "new1"] and ping["missing"] == ["old0"]
        stat = _json("stat", "--all", "--timeout", "1s", "--api", new1.api)
        assert sorted(stat["agents"]) == ["new0", "new1"] and stat["missing"] == ["old0"]
        explain = _json("explain", "new1", "--timeout", "1s", "--api", new0.api)
        assert sorted(explain["agents"]) == ["new0", "new1"] and explain["missing"] == ["old0"]

        # The old agent's own keyring command, on its own channel: every agent applies it.
        rumor("keyring", "install", added, "--api", old.api)
        wait_for(lambda: all(added in f.read_text() for f in files.values()), 15,
                 "the key the old agent installed in every keyring file")

        # Nobody was suspected along the way, and the old agent still sees everyone.
        assert cluster.converged(3)
        for a in cluster.agents:
            assert all(m["incarnation"] == 1 for m in a.members().values()), a.name
    finally:
        cluster.close()
