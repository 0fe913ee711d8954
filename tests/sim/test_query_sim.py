"""Cluster-wide queries in the simulator: the real query delegate on 500 nodes and a
virtual clock — all answer, a crashed node is missing, answers come spread out."""

from __future__ import annotations

from rumor.gossip.config import LAN
from rumor.gossip.query import Pending
from rumor.simulations.engine import Simulator
from rumor.simulations.network import LogNormal, Network
from rumor.simulations.scenarios import warm_cluster


def test_a_query_over_500_simulated_nodes() -> None:
    sim = Simulator(LAN, Network(LogNormal(0.0005, 0.3, floor=0.0001)), seed=3)
    warm_cluster(sim, 500)
    sim.run_until(sim.now + 2.0)
    sim.crash(499)
    origin = sim.nodes[0]
    qids: list[str] = []
    t0 = sim.now
    sim.drive(0, lambda core: qids.append(origin.parts.queries.start(
        sim.now, "ping", timeout=3.0)))
    q = origin.parts.queries
    spent = sim.run_while(lambda: not q.done(sim.now, qids[0]), limit=5.0, step=0.01)
    done: Pending | None = q.finish(qids[0])
    assert done is not None
    assert done.missing == [sim.nodes[499].name]
    assert len(done.answers) == 499
    arrivals = sorted(a.arrived - t0 for a in done.answers.values() if a.via != "local")
    # Spread: 2 ms per member, at most half the timeout (1 s here) plus the relay hops.
    assert 0.5 < arrivals[-1] < 1.6 and arrivals[len(arrivals) // 2] > 0.2
    assert 2.9 <= spent <= 3.1  # waited for the crashed one until the deadline
