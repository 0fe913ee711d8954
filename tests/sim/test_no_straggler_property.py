"""Property: under random loss up to 20% and any delivery order, every live node holds
every record: no record waits for the periodic push-pull (30 s), and 99% of cases are
done within the issue's bound.

The simulator drops datagrams (the epidemic copies, probes, acks and digests) at the
drawn rate and draws each datagram's delay from a uniform range wider than the gap
between packets, so they arrive out of order. Streams (push-pull and the digest
repair's pull) go through the simulator's TCP model: lost SYNs and segments cost
retransmission timeouts. Registrations land on random live nodes at
random moments, some while earlier ones are still spreading, after up to two nodes
crashed.

Why two bounds: a record the epidemic missed is repaired by a digest-triggered
push-pull over TCP, and a lost SYN costs that stream 1 s (then 2 s, 4 s). So a case
where the epidemic missed a node *and* the repair lost a SYN takes longer than 2 s.
Hypothesis found one (4 nodes, 2 of them crashed so that two thirds of the copies go
to the dead, 16% loss: 2.43 s, its repair stream lost 2 SYNs); in 500 such cases 4
were over 2 s, the worst 4.9 s. Every case must stay under ``STRAGGLER_S``; the 2 s
bound is a p99, checked on a fixed sample of 200 cases.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rumor.gossip.checks import PASSING, CheckSpec
from rumor.gossip.service_spec import Registration, ServiceDef
from rumor.simulations.scenarios import Params, make_sim, warm_cluster

#: The issue's bound for the slowest trial at 10% loss on 30 real agents is 2 s at p99;
#: here it is the p99 of a fixed sample, at up to twice that loss.
BOUND_S = 2.0
#: Every case: well under the 30 s push-pull period, which is all the old settings had.
STRAGGLER_S = 10.0

#: memberlist's retransmit count and the 30 s push-pull as the only repair: the
#: settings before the digest repair (tests/sim/test_catalog_scenario.py uses them too).
OLD = ("user_retransmit_mult=4", "state_repair=false", "gossip_on_news=false")


def slowest_record_s(nodes: int, loss: float, jitter_ms: int, crashed: int,
                     records: int, seed: int, tune: tuple[str, ...] = (),
                     limit: float = 60.0) -> float:
    """Seconds until the slowest of ``records`` registrations is on every live node
    (``limit`` if one never gets there)."""
    p = Params(nodes=nodes, seed=seed, loss=loss, tune=tune,
               latency=f"uniform:0.0001:{jitter_ms / 1000}")
    sim, _ = make_sim(p)
    warm_cluster(sim, nodes)
    rng = random.Random(seed)
    down = set(rng.sample(range(nodes), min(crashed, nodes - 2)))
    for i in down:
        sim.crash(i)
    sim.run_until(sim.now + rng.uniform(0.0, 3.0))
    live = [i for i in range(nodes) if i not in down]
    catalogs = [node.parts.catalog for node in sim.nodes]
    started: dict[str, float] = {}
    for r in range(records):
        name = f"svc{r}"
        reg = Registration(ServiceDef(name, name, 9000 + r),
                           (CheckSpec("ttl", ttl=3600.0, initial=PASSING),))
        owner = rng.choice(live)
        sim.drive(owner, lambda _core, c=catalogs[owner], g=reg: c.register(sim.now, g))
        started[name] = sim.now
        sim.run_until(sim.now + rng.uniform(0.0, 0.5))
    missing = {name: set(live) for name in started}
    took: dict[str, float] = {}

    def pending() -> bool:
        for name, holders in missing.items():
            for i in list(holders):
                if catalogs[i].instances(name):
                    holders.discard(i)
            if not holders and name not in took:
                took[name] = sim.now - started[name]
        return len(took) < len(started)

    sim.run_while(pending, limit, step=0.01)
    return max(took.get(name, limit) for name in started)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.integers(4, 10), loss=st.floats(0.0, 0.2), jitter_ms=st.integers(1, 30),
       crashed=st.integers(0, 2), records=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(nodes=4, loss=0.15625, jitter_ms=4, crashed=2, records=4, seed=21745)  # 2.43 s
def test_no_record_waits_for_the_periodic_push_pull(
        nodes: int, loss: float, jitter_ms: int, crashed: int, records: int,
        seed: int) -> None:
    took = slowest_record_s(nodes, loss, jitter_ms, crashed, records, seed,
                            limit=STRAGGLER_S + 1.0)
    assert took <= STRAGGLER_S


def test_99_percent_of_cases_are_done_within_the_bound() -> None:
    """200 cases drawn once (the property's ranges, a fixed seed): at most 2 over 2 s.
    At this commit: p50 0.67 s, p99 1.54 s, one case at 2.29 s."""
    rng = random.Random(20261208)
    cases = [(rng.randint(4, 10), rng.uniform(0.0, 0.2), rng.randint(1, 30),
              rng.randint(0, 2), rng.randint(1, 4), rng.randrange(2**16))
             for _ in range(200)]
    took = sorted(slowest_record_s(*c, limit=STRAGGLER_S + 1.0) for c in cases)
    assert took[-3] <= BOUND_S, took[-10:]
    assert took[-1] <= STRAGGLER_S


def test_the_property_fails_without_the_repair() -> None:
    """The property has teeth: with the old settings a registration at 19% loss on
    4 nodes, one of them down, misses a node until the next push-pull, 22.5 s (seed
    75); with the repair it is everywhere in 0.22 s."""
    assert slowest_record_s(4, 0.191, 20, 1, 1, 75, tune=OLD,
                            limit=STRAGGLER_S + 1.0) > STRAGGLER_S
    assert slowest_record_s(4, 0.191, 20, 1, 1, 75) <= BOUND_S
