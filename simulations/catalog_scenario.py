# layer: shell — measures its own wall-clock run time (time)
"""The ``catalog`` scenario: how fast a registration and a health flip reach every node.

Trials run one after another, as ``bench/catalog_bench.py`` runs them on real agents:
a service is registered at a random node, and the time until every node shows it (or
``--duration`` passes) is measured; the next trial starts a little later. Then, one
after another, each service's TTL check is reported critical at its owner, and the time
until every node hides it is measured. The report gives the
distributions of both visibility times over all trials, the share slower than 1 s,
and, for each trial's registration, how its copies were spread (``spread.py``): the
least-served node's copies, nodes that got none and learnt it from a push-pull.
"""

from __future__ import annotations

import random
import time
from functools import partial
from typing import Any

from ..gossip.catalog import Catalog
from ..gossip.checks import CRITICAL, PASSING, CheckSpec
from ..gossip.service_spec import Registration, ServiceDef
from ..gossip.trace import GossipTrace
from .engine import Simulator
from .metrics import summarize
from .scenarios import Params, Progress, _report, _start, make_sim
from .spread import Event, copy_profile, first_sent_after, follow

#: Pause between the end of one trial and the next: the bench sleeps 0.5 s after
#: reading every agent's index (about 30 HTTP round trips).
GAP = (0.55, 0.65)


def catalog(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    sim, rec = make_sim(p)
    rng = random.Random(f"scenario:{p.seed}")
    start = _start(sim, rec, p, progress, rng)
    trials = int(p.extra.get("trials", 200))
    flips = min(trials, int(p.extra.get("flips", trials)))
    limit = p.duration if p.duration is not None else 30.0
    events: list[Event] = []
    for node in sim.nodes:
        node.core.trace = _collector(events, sim, node.name)
    catalogs: list[Catalog] = [node.parts.catalog for node in sim.nodes]
    n = len(sim.nodes)
    registered: list[float] = []
    flipped: list[float] = []
    profiles: list[dict[str, Any]] = []
    end_estimate = sim.now + trials * 2.0

    def step(until: set[int], wanted: bool, name: str, t_start: float) -> float | None:
        """Run until every node's view of ``name`` is ``wanted`` (None: timed out)."""
        def pending() -> bool:
            if progress is not None:
                progress(sim.now, end_estimate)
            for i in list(until):
                if bool(catalogs[i].instances(name)) == wanted:
                    until.discard(i)
            return bool(until)
        sim.run_while(pending, limit, step=0.01)
        return None if until else round(sim.now - t_start, 3)

    # As the bench: every registration first, one after another, then the flips.
    owners = []
    for t in range(trials):
        owner = rng.randrange(n)
        owners.append(owner)
        name = f"reg{t}"
        reg = Registration(ServiceDef(name, name, 10000 + t, tags=("bench",)),
                           (CheckSpec("ttl", ttl=3600.0, initial=PASSING),))
        sim.run_until(sim.now + rng.uniform(*GAP))
        t_reg = sim.now
        sim.drive(owner, partial(_register, catalogs[owner], sim, reg))
        took = step(set(range(n)), True, name, t_reg)
        registered.append(limit if took is None else took)
        spread = first_sent_after(follow(events), sim.nodes[owner].name, t_reg)
        if spread is not None:
            profile = copy_profile(spread, [nd.name for nd in sim.nodes])
            profile["took_s"] = registered[-1]
            profiles.append(profile)
        events.clear()
    for t in range(flips):
        name = f"reg{t}"
        sim.run_until(sim.now + rng.uniform(*GAP))
        t_flip = sim.now
        sim.drive(owners[t], partial(_fail, catalogs[owners[t]], sim, name))
        took = step(set(range(n)), False, name, t_flip)
        flipped.append(limit if took is None else took)
    slow = [pr for pr in profiles if pr["took_s"] > 1.0]
    result = start | {
        "trials": trials,
        "registration_s": _distribution(registered),
        "health_flip_s": _distribution(flipped),
        "least_served_copies": summarize([pr["min_copies"] for pr in profiles]),
        "trials_with_a_node_without_copy": sum(1 for pr in profiles
                                               if pr["nodes_without_copy"]),
        "copies_sent_per_registration": summarize([pr["copies_sent"] for pr in profiles]),
        "slow_trials": slow[:20],
        "push_pull_interval_s": sim.config.push_pull_period(n),
    }
    return _report("catalog", p, sim, result, {"seconds": time.perf_counter() - t0})


def _register(catalog: Catalog, sim: Simulator, reg: Registration, core: object) -> None:
    catalog.register(sim.now, reg)


def _fail(catalog: Catalog, sim: Simulator, check_id: str, core: object) -> None:
    catalog.heartbeat(sim.now, check_id, CRITICAL)


def _collector(events: list[Event], sim: Simulator, name: str) -> GossipTrace:
    def collect(direction: str, peer: str, digests: list[str]) -> None:
        events.append((sim.now, name, direction, peer, digests))
    return collect


def _distribution(xs: list[float]) -> dict[str, Any]:
    s = sorted(xs)
    if not s:
        return {}

    def q(f: float) -> float:
        return s[min(len(s) - 1, int(f * len(s)))]
    return {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": s[-1],
            "over_1s": sum(1 for x in s if x > 1.0), "n": len(s)}
