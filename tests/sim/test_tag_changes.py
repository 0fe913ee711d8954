"""Every agent changes its tags at once (a SIGHUP on a whole cluster): each node sees
every new tag within a second. Before tag changes were sent as often as application
news and carried in the anti-entropy digest, 13 of 100 such rounds on 30 nodes took
more than a second and the slowest 28 s (the periodic push-pull).

Signed, each alive carries a 64-byte signature: 130 bytes instead of 60, so the same
thirty changes need twice the gossip packets and the bound is 2 s (measured: 1.0-1.6 s
signed, 0.6-0.8 s unsigned over these seeds). One agent's own change is not slower."""

from __future__ import annotations

import pytest

from rumor.simulations.scenarios import Params, make_sim, warm_cluster

BOUND_S = {"off": 1.0, "require": 2.0}


def slowest_round_s(seed: int, nodes: int = 30, rounds: int = 3,
                    identity: str = "require") -> float:
    sim, _ = make_sim(Params(nodes=nodes, seed=seed, profile="lan", node_identity=identity))
    warm_cluster(sim, nodes)
    sim.run_until(sim.now + 3.0)
    worst = 0.0
    for rnd in range(1, rounds + 1):
        tags = {"round": str(rnd)}
        start = sim.now
        for i in range(nodes):
            sim.drive(i, lambda core, t=tags: core.set_meta(sim.now, t))

        def pending(t: dict[str, str] = tags) -> bool:
            return any(m.meta != t for node in sim.nodes for m in node.core.members.values())
        sim.run_while(pending, 60.0, step=0.01)
        worst = max(worst, sim.now - start)
        sim.run_until(sim.now + 1.0)
    return worst


@pytest.mark.parametrize("identity", ["off", "require"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_cluster_wide_tag_change_reaches_every_node_within_its_bound(
        seed: int, identity: str) -> None:
    assert slowest_round_s(seed, identity=identity) <= BOUND_S[identity]
