# layer: shell — measures its own wall-clock run time (time)
"""The ``policy`` scenario: how fast a signed document reaches every node.

Each simulated node runs the real policy store and replication delegate
(``rumor.policy``) on top of the real gossip core, trusting one publisher key. A
document signed with that key is published at one node; the report gives the time
until 50/99/100% of the nodes hold it (verified and accepted, not just received),
under the run's packet loss, and how many copies each node received.

The epidemic spreads it by piggybacking (the envelope fits a datagram); whatever the
epidemic misses under loss, the next push-pull's digest exchange repairs, so the tail
is bounded by the push-pull period.
"""

from __future__ import annotations

import random
import time
from typing import Any

from ..policy.envelope import make_payload, sign
from ..policy.examples import canary_route
from ..policy.keys import SecretKey
from ..policy.replication import PolicyReplicator
from ..policy.trust import TrustSet
from .engine import CALENDAR_AT_ZERO
from .metrics import summarize
from .scenarios import Params, Progress, _report, _start, make_sim

#: Calendar time the simulation's clock 0 stands for (documents carry calendar times).
EPOCH = CALENDAR_AT_ZERO

DOCUMENT = canary_route("web", canary_weight=5, canary_version=None, canary_tags=("canary",),
                        tester_header=None).encode()


def policy(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    # A key derived from the seed: the same run signs the same bytes.
    key = SecretKey(random.Random(f"key:{p.seed}").randbytes(32))
    trust = TrustSet.of([key.public])
    # Every node trusts the key, as agents started with --trust-key do.
    sim, rec = make_sim(p, extras=[PolicyReplicator.factory(trust)])
    rng = random.Random(f"scenario:{p.seed}")
    start = _start(sim, rec, p, progress, rng)
    held_at: dict[int, float] = {}
    copies: list[int] = [0] * len(sim.nodes)
    replicators: list[PolicyReplicator] = []
    for node in sim.nodes:
        r = node.parts.extras["policy"]
        assert isinstance(r, PolicyReplicator)

        def listen(now: float, out: Any, idx: int = node.idx) -> None:
            copies[idx] += 1
            if out.accepted and idx not in held_at:
                held_at[idx] = now
        r.on_outcome(listen)
        replicators.append(r)
    origin = rng.randrange(len(sim.nodes))
    t_pub = sim.now + rng.uniform(0.0, sim.config.gossip_interval)
    data = sign(make_payload("route", "web-canary", 1, EPOCH + t_pub, None, DOCUMENT),
                [key]).encode()

    def publish() -> None:
        sim.drive(origin, lambda core: replicators[origin].publish(sim.now, data, "sim"))
    sim.at(t_pub, publish)
    t_setup = time.perf_counter() - t0
    duration = p.duration if p.duration is not None else 30.0
    end = t_pub + duration
    n = len(sim.nodes)

    def pending() -> bool:
        if progress is not None:
            progress(sim.now, end)
        return len(held_at) < n
    sim.run_while(pending, end - sim.now, step=0.05)
    times = sorted(t - t_pub for t in held_at.values())

    def reach(frac: float) -> float | None:
        k = max(1, int(-(-frac * n // 1)))  # ceil
        return round(times[k - 1], 3) if len(times) >= k else None
    rejected = sum(sum(r.store.rejections.values()) for r in replicators)
    result = start | {
        "origin": sim.nodes[origin].name,
        "document_bytes": len(data),
        "held_by": len(held_at),
        "reach_50pct_s": reach(0.5),
        "reach_99pct_s": reach(0.99),
        "reach_100pct_s": reach(1.0),
        "hold_time_s": summarize(times),
        "copies_received_per_node": summarize(copies),
        "rejected": rejected,
        "repairs_sent": sum(r.stats["repairs_sent"] for r in replicators),
        "push_pull_interval_s": sim.config.push_pull_period(n),
    }
    return _report("policy", p, sim, result, {"seconds": time.perf_counter() - t0,
                                               "setup_seconds": t_setup})
