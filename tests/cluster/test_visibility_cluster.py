"""Integration: the mesh seen whole from any agent, over 3 real agents and backends.

a0 calls ``web`` through its outbound listener (as ``api``); a1 and a2 serve ``web``
behind inbound listeners. ``rumor stat --all`` must be the sum of the three local views
over the same window, ``rumor edges`` must show both sides of the call, and ``rumor
tap`` must show the requests sent while it runs and stop by itself.
"""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..agents import Agent, AgentCluster, rumor, rumor_cmd, wait_for
from ..backends import Backend
from ..ports import free_port

HOST = "127.0.0.1"
BUCKET = 5.0


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.backends = [Backend("b1"), Backend("b2")]
        self.cluster = AgentCluster(tmp)
        self.out_port = free_port()
        specs = [
            ["--outbound", f"{HOST}:{self.out_port}", "--identity", "api"],
            ["--inbound", f"{HOST}:{free_port()}",
             "--service", f"name=web,id=web-1,port={self.backends[0].port}"],
            ["--inbound", f"{HOST}:{free_port()}",
             "--service", f"name=web,id=web-2,port={self.backends[1].port}"],
        ]
        for i, extra in enumerate(specs):
            a = Agent(f"a{i}", tmp, extra)
            a.start(self.cluster.agents[0] if self.cluster.agents else None)
            self.cluster.agents.append(a)
            if i == 0:
                wait_for(a.members, 20, "the seed's API")
        wait_for(lambda: self.cluster.converged(3), 30, "3 agents to converge")
        wait_for(lambda: self.send(["/warm"] * 20) == 20, 20, "web through the sidecars")

    def send(self, paths: list[str]) -> int:
        """GET each path through a0's outbound listener; how many got a 200."""
        ok = 0
        c = http.client.HTTPConnection(HOST, self.out_port, timeout=10)
        try:
            for p in paths:
                c.request("GET", p, headers={"host": "web"})
                r = c.getresponse()
                r.read()
                ok += r.status == 200
        finally:
            c.close()
        return ok

    def close(self) -> None:
        self.cluster.close()
        for b in self.backends:
            b.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("visibility"))
    try:
        yield m
    finally:
        m.close()


def _stat(agent: Agent, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(rumor("stat", *args, "--api", agent.api, "--json").stdout)
    return doc


def _counts(rows: list[dict[str, Any]], key: tuple[str, ...]) -> dict[tuple[Any, ...],
                                                                     tuple[int, int, int]]:
    out: dict[tuple[Any, ...], tuple[int, int, int]] = {}
    for r in rows:
        k = tuple(r[f] for f in key)
        old = out.get(k, (0, 0, 0))
        out[k] = (old[0] + r["requests"], old[1] + r["successes"], old[2] + r["tries"])
    return out


# alone: the mesh-wide view is what the agents answer within the query's 2 s; beside
# another worker's cluster tests it once held a1's answer alone.
@pytest.mark.alone
def test_stat_all_is_the_sum_of_the_local_views(mesh: Mesh) -> None:
    n = 150
    assert mesh.send([f"/stat/{i}" for i in range(n)]) == n
    # The window must end after the last request: wait for the next bucket boundary.
    end = (math.floor(time.time() / BUCKET) + 1) * BUCKET
    wait_for(lambda: time.time() >= end + 0.2, 10, "the bucket to close")
    window = ["--window", "60s", "--end", str(end)]
    for by, key in (("edge", ("listener", "source", "secured", "service")),
                    ("instance", ("listener", "service", "instance"))):
        local = [_stat(a, "--by", by, *window) for a in mesh.cluster.agents]
        mesh_view = _stat(mesh.cluster.agents[1], "--by", by, "--all", *window)
        assert sorted(mesh_view["agents"]) == ["a0", "a1", "a2"]
        assert mesh_view["missing"] == [] and mesh_view["errors"] == {}
        summed: dict[tuple[Any, ...], tuple[int, int, int]] = {}
        for doc in local:
            assert doc["window"] == [end - 60, end]
            for k, v in _counts(doc["rows"], key).items():
                old = summed.get(k, (0, 0, 0))
                summed[k] = (old[0] + v[0], old[1] + v[1], old[2] + v[2])
        assert _counts(mesh_view["rows"], key) == summed
    # And the counts are the requests sent (plus the warm-up), seen from both sides.
    edges = {(r["listener"], r["source"]): r
             for r in _stat(mesh.cluster.agents[0], "--by", "edge", "--all", *window)["rows"]}
    # Without TLS the callee's sidecar has only the caller's header, and "api" is no
    # service the catalog or a policy names: unknown.
    out, inb = edges[("outbound", "api")], edges[("inbound", "unknown")]
    assert out["requests"] == inb["requests"] >= n
    assert out["success"] == 1.0 and out["p99_ms"] is not None
    by_inst = _stat(mesh.cluster.agents[2], "--by", "instance", "--all", "--listener",
                    "outbound", *window)["rows"]
    assert {r["instance"] for r in by_inst} == {"a1/web-1", "a2/web-2"}
    text = rumor("edges", "--all", "--api", mesh.cluster.agents[0].api, *window).stdout
    assert "caller" in text and "callee" in text and "api" in text and "web" in text


def test_tap_shows_requests_sent_during_it_and_stops_by_itself(mesh: Mesh) -> None:
    t0 = time.monotonic()
    tap = subprocess.Popen([*rumor_cmd(), "tap", "web", "--path", "/tap/", "--duration",
                            "4s", "--max", "1000", "--json", "--api",
                            mesh.cluster.agents[2].api],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sent: list[str] = []
        i = 0
        while time.monotonic() - t0 < 3.0:
            batch = [f"/tap/{i + k}" for k in range(5)]
            mesh.send([*batch, "/not-tapped"])
            sent += batch
            i += 5
            time.sleep(0.05)
        out, err = tap.communicate(timeout=15)
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait()
    took = time.monotonic() - t0
    assert tap.returncode == 0, err
    assert took < 4.0 + 6.0  # its duration, a poll and the close: it stopped by itself
    events = [json.loads(line) for line in out.splitlines()]
    assert events, "the tap showed nothing"
    paths = {e["path"] for e in events}
    assert paths <= set(sent), paths - set(sent)
    # The caller's side, and the callee's side of every instance the caller sent tapped
    # requests to (the balancer may well send none to a2: it runs the tap, so it is the
    # slower instance while the tap is open).
    served = {e["instance"].split("/")[0] for e in events
              if e["agent"] == "a0" and e["listener"] == "outbound"}
    assert served and served <= {"a1", "a2"}, served
    sides = {(e["agent"], e["listener"]) for e in events}
    assert {("a0", "outbound")} | {(a, "inbound") for a in served} <= sides <= {
        ("a0", "outbound"), ("a1", "inbound"), ("a2", "inbound")}, sides
    assert all(e["status"] == 200 and e["latency_ms"] >= 0 for e in events)
    assert all("headers" not in e for e in events)  # none named: none shown
