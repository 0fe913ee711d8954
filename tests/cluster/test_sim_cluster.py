"""The simulator and a real loopback cluster agree on the same small scenario.

Five members join through the first (profile ``local``), one is killed, and we compare
what every survivor believes afterwards: in the simulator the cores are driven by the
engine, in the real cluster by the trio runtime over UDP/TCP on 127.0.0.1.
"""

from __future__ import annotations

import signal
import time

import pytest

from rumor.gossip.config import LOCAL
from rumor.gossip.wire import Status
from rumor.simulations.engine import Simulator
from rumor.simulations.network import Fixed, Network
from rumor.simulations.scenarios import detection_bound

from ..agents import AgentCluster, wait_for

NAMES = [f"a{i}" for i in range(5)]
VICTIM = "a3"


def simulate() -> tuple[dict[str, dict[str, str]], float]:
    """Views of the survivors after the crash, and the time until all knew."""
    sim = Simulator(LOCAL, Network(Fixed(0.0002)), seed=11)
    for name in NAMES:
        sim.add_node(name)
    for i in range(1, len(NAMES)):
        sim.at(0.05 * i, lambda i=i: sim.join(i, [0]))

    def converged() -> bool:
        return all(nd.core.num_live() == len(NAMES)
                   and all(m.status == Status.ALIVE for m in nd.core.members.values())
                   for nd in sim.nodes)
    sim.run_while(lambda: not converged(), 10.0)
    assert converged()
    victim = sim.by_name[VICTIM]
    sim.crash(victim)
    survivors = [nd for nd in sim.nodes if nd.idx != victim]

    def known() -> bool:
        return all(nd.core.members[VICTIM].status == Status.DEAD for nd in survivors)
    took = sim.run_while(lambda: not known(), 30.0, step=0.01)
    sim.run_until(sim.now + 1.0)  # let anything that would still change, change
    views = {nd.name: {n: Status.NAMES[m.status] for n, m in nd.core.members.items()}
             for nd in survivors}
    return views, took


@pytest.mark.alone
def test_simulator_and_real_cluster_agree_on_a_crash(cluster: AgentCluster) -> None:
    sim_views, sim_took = simulate()
    bound = detection_bound(LOCAL, len(NAMES))
    assert sim_took <= bound

    agents = cluster.start(len(NAMES))
    victim = next(a for a in agents if a.name == VICTIM)
    others = [a for a in agents if a is not victim]
    t0 = time.monotonic()
    victim.signal(signal.SIGKILL)
    victim.wait_exit()
    wait_for(lambda: all(a.status_of(VICTIM) == "failed" for a in others), 20,
             "every survivor to list the victim failed")
    real_took = time.monotonic() - t0
    time.sleep(0.5)
    real_views = {a.name: {n: m["status"] for n, m in a.members().items()} for a in others}

    assert real_views == sim_views
    expected = {n: ("failed" if n == VICTIM else "alive") for n in NAMES}
    assert all(v == expected for v in sim_views.values())
    # Same protocol, same timers: both detect within the bound the config implies
    # (the real side adds process scheduling and API polling).
    assert real_took <= bound + 2.0
