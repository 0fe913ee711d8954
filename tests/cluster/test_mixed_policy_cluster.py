"""Integration: a rolling upgrade. An agent of the build before issue 28 (a git worktree
of it) beside agents of this one. Documents with a new field (``balancer``) or a new kind
(``fault``) are published: the old agent rejects them and keeps routing by what it held,
the new ones apply them, and ``rumor policy publish`` names the member that is too old."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from rumor.gossip.version import release

from ..agents import Agent, AgentCluster, previous_build, rumor, wait_for
from ..backends import Backend
from ..ports import free_port

#: main before the request pipeline and its new policy kinds and fields.
PREVIOUS_BUILD = "1dc6b83"
HOST = "127.0.0.1"

RES_V1 = '''kind = "resilience"
name = "web-res"
version = 1
service = "web"
[retries]
attempts = 2
'''
RES_V2 = '''kind = "resilience"
name = "web-res"
version = 2
service = "web"
balancer = "round_robin"
[retries]
attempts = 2
'''
FAULT = '''kind = "fault"
name = "web-fault"
version = 1
expires = {expires}
service = "web"
[[rule]]
abort = {{ status = 418, percent = 100.0 }}
'''


def _get(port: int) -> int:
    c = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        c.request("GET", "/", headers={"host": "web"})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def _held(a: Agent) -> dict[str, int]:
    try:
        return {d["name"]: d["version"] for d in a.get("/v1/policies")["documents"]}
    except OSError:
        return {}


def test_an_old_agent_keeps_routing_while_new_documents_are_published(tmp_path: Path) -> None:
    with previous_build(tmp_path, PREVIOUS_BUILD) as old_tree:
        if old_tree is None:
            pytest.skip(f"no git history with {PREVIOUS_BUILD} (the previous build) here")
        _rolling(tmp_path, old_tree)


def _rolling(tmp_path: Path, old_tree: Path) -> None:
    rumor("keygen", "--out", str(tmp_path / "ops"))
    trust = ["--trust-key", f"{tmp_path / 'ops'}.pub"]
    backends = [Backend(f"b{i}") for i in range(2)]
    cluster = AgentCluster(tmp_path)
    out_old, out_new = free_port(), free_port()
    try:
        old = Agent("old0", tmp_path, [*trust, "--outbound", f"{HOST}:{out_old}",
                                        "--inbound", f"{HOST}:{free_port()}",
                                        "--service", f"name=web,port={backends[0].port}"],
                    env={"PYTHONPATH": str(old_tree / ".typecheck")})
        new = Agent("new0", tmp_path, [*trust, "--outbound", f"{HOST}:{out_new}",
                                        "--inbound", f"{HOST}:{free_port()}",
                                        "--service", f"name=web,port={backends[1].port}"])
        old.start(None)
        cluster.agents.append(old)
        wait_for(old.members, 20, "the old agent's API")
        new.start(old)
        cluster.agents.append(new)
        wait_for(lambda: cluster.converged(2), 30, "the mixed cluster to converge")
        # The old agent is the previous build: it publishes no release tag.
        assert "rumor.release" not in new.members()["old0"]["tags"]
        assert new.members()["new0"]["tags"]["rumor.release"] == release()
        for port in (out_old, out_new):
            wait_for(lambda port=port: _get(port) == 200, 20, "both callers to route")

        doc = tmp_path / "res.toml"
        doc.write_text(RES_V1)
        rumor("policy", "publish", str(doc), "--key", f"{tmp_path / 'ops'}.key",
              "--api", new.api)
        wait_for(lambda: all(_held(a).get("web-res") == 1 for a in (old, new)), 15,
                 "v1 (no new field) on both")

        # v2 uses a field the old parser does not know: the CLI says who is too old.
        doc.write_text(RES_V2)
        out = rumor("policy", "publish", str(doc), "--key", f"{tmp_path / 'ops'}.key",
                    "--api", new.api)
        assert "accepted" in out.stdout
        assert "old0" in out.stderr and "0.2.0" in out.stderr and "new0" not in out.stderr
        wait_for(lambda: _held(new).get("web-res") == 2, 10, "v2 on the new agent")
        # A new kind, equally unknown to the old agent.
        import datetime
        expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
                   ).strftime("%Y-%m-%dT%H:%M:%SZ")
        fault = tmp_path / "fault.toml"
        fault.write_text(FAULT.format(expires=expires))
        out = rumor("policy", "publish", str(fault), "--key", f"{tmp_path / 'ops'}.key",
                    "--api", new.api)
        assert "old0" in out.stderr
        wait_for(lambda: _get(out_new) == 418, 10, "the fault on the new caller")
        # Gossip had every chance to bring both to the old agent (anti-entropy included):
        # it refuses them, keeps v1, and still routes.
        wait_for(lambda: old.get("/v1/policies")["stats"].get("rejected", {}), 15,
                 "the old agent to have refused something")
        assert _held(old).get("web-res") == 1 and "web-fault" not in _held(old)
        assert all(_get(out_old) == 200 for _ in range(20))
        # The new agent holds both; the old one's traffic reached both instances.
        assert _held(new) == {"web-res": 2, "web-fault": 1}
        assert backends[0].hits > 0 and backends[1].hits > 0
    finally:
        cluster.close()
        for b in backends:
            b.close()
