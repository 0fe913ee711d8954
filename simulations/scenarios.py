# layer: shell — measures its own wall-clock run time (time)
"""The chaos scenarios. Each is a function of ``Params`` returning one report dict.

Every figure in a report is a pure function of the parameters (the seed included),
except what sits under the ``wall`` key (wall-clock time, events per second).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from ..gossip.assembly import DelegateFactory
from ..gossip.config import GossipConfig, profile
from ..gossip.explain import Entry, Story, merge_timeline, story
from ..gossip.signed_state import IDENTITY_CHANNEL
from ..gossip.wire import MemberState, PushPull, Status, pack_message
from .engine import Simulator, gc_paused, node_address
from .faults import Crash, Fault, Restart, Slow, Split, install
from .metrics import Recorder, Spread, Traffic, summarize
from .network import PROFILE_LATENCY, Network, parse_latency

Progress = Callable[[float, float], None]  # (virtual now, virtual end)


@dataclass(slots=True)
class Params:
    nodes: int = 100
    seed: int = 1
    loss: float = 0.0
    #: Simulated seconds of the measured phase (None: the scenario's default).
    duration: float | None = None
    profile: str = "lan"
    lifeguard: bool = True
    #: Latency spec (``fixed:D``, ``uniform:LO:HI``, ``lognormal:MEDIAN:SIGMA``);
    #: None: the profile's default.
    latency: str | None = None
    #: Start from a converged cluster (state installed through the real push-pull merge)
    #: instead of joining everyone first; ``converge`` always starts cold.
    warm: bool = True
    #: Seeds that joiners contact (the first nodes).
    seeds: int = 3
    #: crash / churn: nodes that crash at once (crash), crashes per minute (churn).
    crashes: int = 1
    #: slow: fraction of slow nodes, their mean stall and mean run between stalls.
    slow_fraction: float = 0.02
    mean_pause: float = 8.0
    mean_run: float = 8.0
    #: loss: the loss rates swept (``--loss`` given: just that one).
    sweep: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)
    #: partition: fraction on the minority side, asymmetric or not, split length.
    split_fraction: float = 0.5
    asymmetric: bool = False
    split_for: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``NAME=VALUE`` overrides of the profile's gossip settings (``--tune``).
    tune: tuple[str, ...] = ()
    #: Signed membership: every node signs its word with a key derived from the seed
    #: (``off``, ``prefer`` or ``require``, as the agent's ``--node-identity``).
    node_identity: str = "require"
    #: Stream exchanges ignore loss (the simulator's model before TCP under loss,
    #: ``--reliable-streams``); by default they go through the TCP model.
    reliable_streams: bool = False


#: Pause after a cold start's convergence (the join storm passes) and, in detect,
#: between victims, as the shared harness's ``--settle`` default.
SETTLE = 5.0


# ---- building a cluster ---------------------------------------------------------------------


def gossip_config(p: Params) -> GossipConfig:
    return profile(p.profile).with_overrides(lifeguard=p.lifeguard).tuned(list(p.tune))


def make_sim(p: Params, loss: float | None = None,
             extras: Sequence[DelegateFactory] = ()) -> tuple[Simulator, Recorder]:
    lat = parse_latency(p.latency) if p.latency else PROFILE_LATENCY[p.profile]
    net = Network(lat, p.loss if loss is None else loss,
                  reliable_streams=p.reliable_streams)
    sim = Simulator(gossip_config(p), net, p.seed, extras=extras,
                    node_identity=p.node_identity)
    if _captured is not None:
        _captured.append(sim)
    return sim, Recorder(sim)


#: The simulators ``make_sim`` built while ``capture_sims`` is active.
_captured: list[Simulator] | None = None


@contextlib.contextmanager
def capture_sims() -> Iterator[list[Simulator]]:
    """Collect the simulators the scenarios build meanwhile (``rumor sim --explain``
    reads their nodes' histories after the run)."""
    global _captured
    was, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = was


def explain(sim: Simulator, member: str) -> tuple[Story, list[Entry]]:
    """The story of ``member`` from every simulated node's history (the current life
    of each; one clock, so every offset is 0), as ``rumor explain`` tells it."""
    timeline = merge_timeline((node.name, 0.0, node.core.history.about(member))
                              for node in sim.nodes)
    return story(timeline, member), timeline


def warm_cluster(sim: Simulator, n: int) -> None:
    """n nodes that have known each other for a while, as after a completed join.

    Each core merges the full member list through the same code as a push-pull
    exchange, so its tables, probe order and timers are the protocol's own. What the
    merge queues (an alive broadcast per member: the join storm) is discarded, and
    push-pull timers are spread over their period as in a long-running cluster."""
    for _ in range(n):
        sim.add_node()
    states = tuple(MemberState(node.name, node.addr, 1, Status.ALIVE, {})
                   for node in sim.nodes)
    # Each node's signed alive, packed once and shared by every merge (signed_state.py).
    signed = [node.core._signed_self() for node in sim.nodes]
    user = {IDENTITY_CHANNEL: msgpack.packb([pack_message(s) for s in signed if s])} \
        if any(signed) else {}
    pp = PushPull(False, sim.nodes[0].name, states, user)
    with gc_paused():
        for node in sim.nodes:
            core = node.core
            core.merge_state(sim.now, pp, quiet=True)
            core.take_effects()
            core.spread_push_pull(sim.now)
            node.timer_at = math.nan
            sim._reschedule(node)


def node_meta(p: Params, idx: int) -> dict[str, str] | None:
    """The tags node ``idx`` announces: ``extra["node_meta"]``, ``{host}`` replaced by
    its address (``rumor lab compare`` gives the simulated nodes the tags real agents
    announce: release, inbound sidecar), or none."""
    template = p.extra.get("node_meta")
    if not template:
        return None
    host = node_address(idx)[0]
    return {str(k): str(v).replace("{host}", host) for k, v in template.items()}


def cold_cluster(sim: Simulator, rec: Recorder, p: Params, spread: float,
                 rng: random.Random) -> None:
    """Node 0 starts alone, the next seeds join it, everyone else joins through the
    seeds at a random time in the first ``spread`` seconds."""
    n = p.nodes
    for i in range(n):
        sim.add_node(meta=node_meta(p, i))
    seeds = list(range(min(p.seeds, n)))
    rec.join_keep = 5
    rec.track_join(0, n - 1, plot=False)
    for i in range(1, n):
        t = 0.0 if i < len(seeds) else rng.uniform(0.5, 0.5 + spread)
        sim.at(t, _joiner(sim, rec, i, [s for s in seeds if s != i] or [0], n,
                          plot=i >= len(seeds)))


def _joiner(sim: Simulator, rec: Recorder, i: int, seeds: list[int],
            n: int, plot: bool) -> Callable[[], None]:
    # Seeds are learnt by every joiner in its join exchange, so their curves would
    # show the join schedule rather than gossip: only ordinary joiners are plotted.
    def run() -> None:
        rec.track_join(i, n - 1, plot=plot)
        sim.join(i, seeds)
    return run


def wait_converged(sim: Simulator, limit: float, progress: Progress | None = None) -> float:
    """Run until every live node knows every node as alive (or ``limit`` passes)."""
    n = len(sim.nodes)
    end = sim.now + limit

    def pending() -> bool:
        if progress is not None:
            progress(sim.now, end)
        return not all(len(node.core.members) == n and node.core.num_live() == n
                       for node in sim.nodes if node.up)
    return sim.run_while(pending, limit, step=0.25)


# ---- analytic expectations (SWIM paper, memberlist formulas) ------------------------------


def analytic(cfg: GossipConfig, n: int) -> dict[str, float]:
    """What the config implies for a crash in a cluster of ``n``."""
    t = cfg.probe_interval
    e = math.e
    # Gossip to gossip_nodes members every gossip_interval: an epidemic with fan-out
    # f reaches n members in about log(n)/log(f + 1) rounds.
    rounds = math.log(max(n, 2)) / math.log(cfg.gossip_nodes + 1)
    return {
        "probe_interval_s": t,
        "expected_first_detection_s": round(t * e / (e - 1), 4),
        "suspicion_min_s": round(cfg.suspicion_min(n), 4),
        "suspicion_max_s": round(cfg.suspicion_max(n) if cfg.lifeguard else
                                 cfg.suspicion_min(n), 4),
        "dissemination_rounds": round(rounds, 2),
        "dissemination_s": round(rounds * cfg.gossip_interval, 4),
        "detection_bound_s": round(detection_bound(cfg, n), 4),
    }


def detection_bound(cfg: GossipConfig, n: int) -> float:
    """Upper bound on crash → every live node lists the member as failed.

    Someone probes the dead member within 8 periods (a miss has probability about
    e^-8), its probe ends within one (stretched) period, the suspicion runs at most
    its maximum, and the death then spreads in a few gossip rounds (doubled, plus
    a second of slack for loss and the retransmit order)."""
    t = cfg.probe_interval
    suspicion = cfg.suspicion_max(n) if cfg.lifeguard else cfg.suspicion_min(n)
    rounds = math.log(max(n, 2)) / math.log(cfg.gossip_nodes + 1)
    return 9 * t + suspicion + 2 * rounds * cfg.gossip_interval + 1.0


# ---- scenarios ------------------------------------------------------------------------------


def report_head(name: str, p: Params, network: dict[str, object]) -> dict[str, Any]:
    """What every report starts with, the simulator's and the lab's alike."""
    cfg = gossip_config(p)  # the run's own (slow also runs the other variant)
    return {
        "scenario": name,
        "params": {k: v for k, v in asdict(p).items() if k != "extra"} | p.extra,
        "config": {"profile": p.profile, "lifeguard": cfg.lifeguard,
                   "probe_interval": cfg.probe_interval, "probe_timeout": cfg.probe_timeout,
                   "gossip_interval": cfg.gossip_interval, "gossip_nodes": cfg.gossip_nodes,
                   "suspicion_mult": cfg.suspicion_mult,
                   "retransmit_limit": cfg.retransmit_limit(p.nodes),
                   "network": network},
        "analytic": analytic(cfg, p.nodes),
    }


def _report(name: str, p: Params, sim: Simulator, result: dict[str, Any],
            wall: dict[str, float]) -> dict[str, Any]:
    events = wall.pop("events", sim.events)
    return report_head(name, p, sim.network.describe()) | {
        "result": result,
        "sim": {"events": events, "virtual_s": round(sim.now, 6),
                "counters": dict(sorted(sim.counters.items()))},
        "wall": {k: round(v, 3) for k, v in wall.items()}
        | {"events_per_s": round(events / max(wall.get("seconds", 0.0), 1e-9))},
    }


def _start(sim: Simulator, rec: Recorder, p: Params, progress: Progress | None,
           rng: random.Random) -> dict[str, Any]:
    """Warm or cold start; returns what the start-up measured."""
    if p.warm:
        warm_cluster(sim, p.nodes)
        sim.run_until(sim.now + 1.0)
        return {"start": "warm"}
    cold_cluster(sim, rec, p, spread=max(1.0, p.nodes / 200), rng=rng)
    took = wait_converged(sim, 120.0 + p.nodes / 10, progress)
    # The join storm's broadcasts (signed alives fill packets for a few seconds after
    # everyone knows everyone) are not the steady state the scenario measures; the lab
    # settles as long before it measures too.
    sim.run_until(sim.now + SETTLE)
    return {"start": "cold", "converged_after_s": round(took, 3)}


def converge(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Everyone joins through the seeds; how long until every node knows every node."""
    t0 = time.perf_counter()
    sim, rec = make_sim(p)
    rng = random.Random(f"scenario:{p.seed}")
    spread = max(1.0, p.nodes / 200)
    cold_cluster(sim, rec, p, spread, rng)
    traffic = Traffic(sim)
    limit = p.duration if p.duration is not None else 60.0 + 2 * spread
    end = sim.now + limit

    def pending() -> bool:
        if progress is not None:
            progress(sim.now, end)
        return rec.joins_complete < p.nodes
    took = sim.run_while(pending, limit, step=0.25)
    joins = [node.join_result for node in sim.nodes[1:]]
    result = {
        "converged": rec.joins_complete == p.nodes,
        "converged_after_s": round(took, 3),
        "join_spread_s": spread,
        "joins_failed": sum(1 for j in joins if j is None or j.contacted == 0),
        "dissemination": rec.dissemination(list(rec.joins.values())),
        "members_known_per_node": summarize(len(nd.core.members) for nd in sim.nodes),
        "traffic": traffic.report(),
        "curves": rec.curves(),
    }
    return _report("converge", p, sim, result, {"seconds": time.perf_counter() - t0})


def crash(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """``crashes`` nodes die at once: time to first suspicion, first failure, and until
    50/99/100% of the live nodes list each as failed."""
    t0 = time.perf_counter()
    sim, rec = make_sim(p)
    rng = random.Random(f"scenario:{p.seed}")
    start = _start(sim, rec, p, progress, rng)
    t_setup = time.perf_counter() - t0
    events0 = sim.events
    victims = tuple(sorted(rng.sample(range(p.seeds if p.nodes > p.seeds else 0, p.nodes),
                                      min(p.crashes, p.nodes - 1))))
    t_crash = sim.now + rng.uniform(0.0, sim.config.probe_interval)
    install(sim, rec, [Crash(t_crash, victims)], p.seed)
    duration = p.duration if p.duration is not None else 60.0
    end = sim.now + duration
    traffic = Traffic(sim)
    sim.run_until(end, None if progress is None else (lambda now: progress(now, end)))
    det = rec.detection()
    bound = detection_bound(sim.config, p.nodes)
    worst = det["all_know_100pct_s"]["max"]
    result = start | {
        "victims": [sim.nodes[v].name for v in victims],
        "detection": det,
        "all_within_bound": det["undetected"] == 0 and worst is not None and worst <= bound,
        "false_positives": rec.false_positives(),
        "traffic": traffic.report(),
        "curves": rec.curves(),
    }
    run = time.perf_counter() - t0 - t_setup
    return _report("crash", p, sim, result,
                   {"seconds": time.perf_counter() - t0, "setup_seconds": t_setup,
                    "run_seconds": run, "events": sim.events,
                    "run_events_per_s": (sim.events - events0) / max(run, 1e-9)})


def detect(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """As ``harness.py detect`` runs real agents: on a converged cluster, kill one node,
    time the first suspicion and until every live node lists it failed, settle, kill the
    next. ``trials`` victims (at most nodes - 2), drawn from all but the first node.
    Running the same procedure on both sides is what lets the simulator's detection
    times be held against ``harness.py detect`` on real agents."""
    t0 = time.perf_counter()
    sim, rec = make_sim(p)
    rng = random.Random(f"scenario:{p.seed}")
    start = _start(sim, rec, p, progress, rng)
    sim.run_until(sim.now + SETTLE)
    trials = max(1, min(int(p.extra.get("trials", 10)), p.nodes - 2))
    victims = rng.sample(range(1, p.nodes), trials)
    limit = p.duration if p.duration is not None else 120.0
    end_estimate = sim.now + trials * (SETTLE + 10.0)
    rows: list[dict[str, Any]] = []
    for v in victims:
        # Killed at a random moment of the probe cycle, as a kill -9 lands.
        sim.run_until(sim.now + rng.uniform(0.0, sim.config.probe_interval))
        sim.crash(v)
        rec.crashed(v)
        suspected, failed = rec.crash_suspect[v], rec.crash_failed[v]

        def pending(failed: Spread = failed) -> bool:
            if progress is not None:
                progress(sim.now, end_estimate)
            return failed.at(1.0) is None
        sim.run_while(pending, limit, step=0.01)
        rows.append({"victim": sim.nodes[v].name, "remaining": failed.need,
                     "first_suspect_s": _round(suspected.first),
                     "first_failed_s": _round(failed.first),
                     "all_failed_s": _round(failed.at(1.0))})
        sim.run_until(sim.now + SETTLE)
    result = start | {
        "trials": rows,
        "summary": {k: summarize(r[k] for r in rows if r[k] is not None)
                    for k in ("first_suspect_s", "first_failed_s", "all_failed_s")},
        "undetected": sum(1 for r in rows if r["all_failed_s"] is None),
        "false_positives": rec.false_positives(),
    }
    return _report("detect", p, sim, result, {"seconds": time.perf_counter() - t0})


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _quiet_run(p: Params, loss: float, faults: Callable[[Simulator, Recorder], list[Fault]],
               progress: Progress | None) -> tuple[Simulator, Recorder, dict[str, Any]]:
    """A warm cluster under ``loss`` and the given faults for ``duration`` seconds."""
    sim, rec = make_sim(p, loss)
    rng = random.Random(f"scenario:{p.seed}")
    start = _start(sim, rec, p, progress, rng)
    install(sim, rec, faults(sim, rec), p.seed)
    duration = p.duration if p.duration is not None else 120.0
    end = sim.now + duration
    traffic = Traffic(sim)
    sim.run_until(end, None if progress is None else (lambda now: progress(now, end)))
    fp = rec.false_positives()
    hours = duration / 3600
    healthy = p.nodes - len(rec.slow)
    fp["failed_healthy_per_node_hour"] = round(
        fp["failed_healthy"] / max(healthy, 1) / hours, 6)
    return sim, rec, start | {"loss": loss, "false_positives": fp,
                              "traffic": traffic.report(),
                              "refutations": sum(nd.core.stats["refutations"]
                                                 for nd in sim.nodes)}


def loss(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """False positives of a fault-free cluster over a sweep of datagram loss rates."""
    t0 = time.perf_counter()
    rows = []
    events = 0
    sim: Simulator | None = None
    for rate in p.sweep:
        sim, _, row = _quiet_run(p, rate, lambda s, r: [], progress)
        events += sim.events
        rows.append(row)
    assert sim is not None
    result = {"sweep": rows,
              "false_failures_total": sum(r["false_positives"]["failed_healthy"]
                                          for r in rows)}
    return _report("loss", p, sim, result,
                   {"seconds": time.perf_counter() - t0, "events": events})


def slow(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """A fraction of nodes is intermittently paused (CPU starvation); false positives
    with Lifeguard and with plain SWIM, on the same seed and fault schedule."""
    t0 = time.perf_counter()
    duration = p.duration if p.duration is not None else 120.0
    k = max(1, round(p.slow_fraction * p.nodes))

    def faults(sim: Simulator, rec: Recorder) -> list[Fault]:
        rng = random.Random(f"slow:{p.seed}")
        chosen = sorted(rng.sample(range(p.nodes), k))
        # ``sigstop`` (the lab's stop, a whole process frozen) or a stalled receive path.
        stall = not p.extra.get("sigstop", False)
        return [Slow(i, sim.now, sim.now + duration, p.mean_pause, p.mean_run, stall)
                for i in chosen]

    out: dict[str, Any] = {"slow_nodes": k}
    events = 0
    sim: Simulator | None = None
    for label, lg in (("lifeguard", True), ("swim", False)):
        q = Params(**{**asdict(p), "lifeguard": lg})
        sim, _, row = _quiet_run(q, p.loss, faults, progress)
        events += sim.events
        out[label] = row
    assert sim is not None
    on = out["lifeguard"]["false_positives"]
    off = out["swim"]["false_positives"]
    for key in ("failed_healthy", "failed_slow", "suspect_healthy"):
        out[f"reduction_{key}"] = _ratio(off[key], on[key])
    return _report("slow", p, sim, out, {"seconds": time.perf_counter() - t0,
                                         "events": events})


def _ratio(off: int, on: int) -> float | None:
    """How many times fewer with Lifeguard (None when neither had any)."""
    if off == 0 and on == 0:
        return None
    return round(off / max(on, 1), 2) if on else float(off)


def partition(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Split the cluster, let each side fail the other, heal, time the merge back."""
    t0 = time.perf_counter()
    sim, rec = make_sim(p)
    rng = random.Random(f"scenario:{p.seed}")
    start = _start(sim, rec, p, progress, rng)
    cfg = sim.config
    k = max(1, round(p.split_fraction * p.nodes))
    side_a = frozenset(sorted(rng.sample(range(p.nodes), k)))
    split_for = p.split_for if p.split_for is not None else \
        detection_bound(cfg, p.nodes) + 10.0
    t_split = sim.now + 1.0
    t_heal = t_split + split_for
    install(sim, rec, [Split(t_split, t_heal, side_a, symmetric=not p.asymmetric)], p.seed)
    sim.run_until(t_heal)
    a_sees_b_failed = _cross_failed(sim, side_a)
    limit = p.duration if p.duration is not None else 4 * cfg.reconnect_interval + 60.0
    end = sim.now + limit
    traffic = Traffic(sim)

    def pending() -> bool:
        if progress is not None:
            progress(sim.now, end)
        return not all(nd.core.num_live() == p.nodes for nd in sim.nodes)
    took = sim.run_while(pending, limit, step=0.5)
    merged = not pending()
    result = start | {
        "side_a": len(side_a), "side_b": p.nodes - len(side_a),
        "symmetric": not p.asymmetric, "split_s": round(split_for, 3),
        "cross_failed_at_heal": a_sees_b_failed,
        "merged": merged,
        "merge_after_heal_s": round(took, 3) if merged else None,
        "reconnect_interval_s": cfg.reconnect_interval,
        "traffic": traffic.report(),
    }
    return _report("partition", p, sim, result, {"seconds": time.perf_counter() - t0})


def _cross_failed(sim: Simulator, side_a: frozenset[int]) -> float:
    """Fraction of (observer, subject) pairs across the split marked failed."""
    names = {nd.name: nd.idx in side_a for nd in sim.nodes}
    pairs = failed = 0
    for nd in sim.nodes:
        mine = nd.idx in side_a
        for name, m in nd.core.members.items():
            if names.get(name, mine) != mine:
                pairs += 1
                failed += m.status == Status.DEAD
    return round(failed / pairs, 4) if pairs else 0.0


def churn(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Steady failures and restarts: ``crashes`` per minute, each crashed node coming
    back (same name, fresh state) 20 probe periods later."""
    t0 = time.perf_counter()
    sim, rec = make_sim(p)
    rng = random.Random(f"scenario:{p.seed}")
    start = _start(sim, rec, p, progress, rng)
    cfg = sim.config
    duration = p.duration if p.duration is not None else 120.0
    rate = max(p.crashes, 1) / 60.0
    down_for = 20 * cfg.probe_interval
    seeds = tuple(range(min(p.seeds, p.nodes)))
    faults: list[Fault] = []
    t = sim.now + rng.expovariate(rate)
    busy: dict[int, float] = {}
    while t < sim.now + duration:
        victim = rng.randrange(len(seeds), p.nodes) if p.nodes > len(seeds) else 0
        if busy.get(victim, -1.0) < t:
            faults.append(Crash(t, (victim,)))
            faults.append(Restart(t + down_for, (victim,), seeds))
            busy[victim] = t + down_for + 1.0
        t += rng.expovariate(rate)
    install(sim, rec, faults, p.seed)
    for f in faults:
        if isinstance(f, Restart):
            sim.at(f.at, _track(sim, rec, f.nodes[0]))
    end = sim.now + duration
    traffic = Traffic(sim)
    sim.run_until(end, None if progress is None else (lambda now: progress(now, end)))
    result = start | {
        "crashes": sum(1 for f in faults if isinstance(f, Crash)),
        "detection": rec.detection(),
        "rejoin": rec.dissemination(list(rec.joins.values())),
        "false_positives": rec.false_positives(),
        "traffic": traffic.report(),
    }
    return _report("churn", p, sim, result, {"seconds": time.perf_counter() - t0})


def _track(sim: Simulator, rec: Recorder, idx: int) -> Callable[[], None]:
    def run() -> None:
        rec.track_join(idx, sum(1 for nd in sim.nodes if nd.up) - 1, rejoin=True)
    return run


def policy(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """A signed document published at one node: time until 50/99/100% hold it (see
    ``policy_scenario.py``; imported here lazily, it builds on these helpers)."""
    from .policy_scenario import policy as run
    return run(p, progress)


def catalog(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Registrations and health flips, one after another: how long until every node
    shows each (see ``catalog_scenario.py``)."""
    from .catalog_scenario import catalog as run
    return run(p, progress)


def traffic(p: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Open-loop requests through the proxy's real request-path cores to instances of
    given behaviour, per balancer (see ``traffic.py``; no gossip runs)."""
    from .traffic import traffic as run
    return run(p, progress)


SCENARIOS: dict[str, Callable[[Params, Progress | None], dict[str, Any]]] = {
    "converge": converge, "crash": crash, "detect": detect, "loss": loss, "slow": slow,
    "partition": partition, "churn": churn, "policy": policy, "catalog": catalog,
    "traffic": traffic,
}
