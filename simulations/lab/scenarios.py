# layer: shell — drives real agents on the wall clock (trio, time)
"""The simulator's scenarios, run by real agents in the lab.

Same names, parameters and report keys as ``rumor sim`` (``simulations/scenarios.py``),
and the same ``Recorder`` computing the figures from the same member events, so a lab
report and a simulated one can be laid side by side key by key. What differs is only
what must: the lab always starts cold (real agents cannot be handed a converged
table), waits on the wall clock, and a fault is a signal or an nftables rule.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ..metrics import summarize
from ..scenarios import Params, detection_bound, gossip_config, report_head
from .cluster import REORDER, LabCluster, LabNode
from .conditions import PROTOCOLS, Conditions, Cut
from .kernel import DelayLine, LabError, Network
from .ledger import DEFAULT_DIR, Ledger
from .topology import Topology

#: Pause after convergence and between victims (as ``rumor sim detect``).
SETTLE = 5.0


def lab_family(p: Params) -> int:
    return int(p.extra.get("family", 4))


@contextlib.asynccontextmanager
async def open_lab(p: Params, ledger_dir: Path = DEFAULT_DIR,
                   say: Callable[[str], None] | None = None) -> AsyncIterator[LabCluster]:
    """Build the network, yield the (not yet started) cluster, tear everything down.

    The teardown runs on every way out, Ctrl-C included; if the process is killed
    instead, ``rumor lab clean`` finishes it from the ledger."""
    lab = "rl" + secrets.token_hex(2)
    topo = Topology.of(lab, p.nodes)
    ledger = Ledger.create(ledger_dir, lab, {"nodes": p.nodes,
                                             "scenario": p.extra.get("scenario")})
    try:
        workdir = Path(tempfile.gettempdir()) / f"rumor-lab-{lab}"
        ledger.directory(workdir)
        workdir.mkdir(parents=True)
        net = Network(topo, ledger)
        t0 = time.monotonic()
        net.build()
        if say:
            say(f"lab {lab}: {p.nodes} namespaces on a bridge in "
                f"{time.monotonic() - t0:.1f} s (ledger {ledger.path})")
        cluster = LabCluster(net, ledger, workdir, lab_family(p), p.profile,
                             tune=_tune(p), sidecar=bool(p.extra.get("sidecar", True)),
                             dns=bool(p.extra.get("dns", False)))
        cluster.node_args = {k: list(v) for k, v in (p.extra.get("node_args") or {}).items()}
        cluster.issue_credentials()
        delays = host_delays(p, topo)
        line = DelayLine(net, delays, p.seed) if delays else None
        cluster.delay = delays
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run)
            try:
                if line is not None:
                    await line.start()
                    if say:
                        say(f"delay line on {len(delays)} hosts")
                yield cluster
            finally:
                with trio.CancelScope(shield=True):
                    await cluster.stop_all()
                    if line is not None:
                        await line.stop()
                        cluster.delay_line_stats = line.stats
                nursery.cancel_scope.cancel()
    finally:
        done = ledger.clean()
        if say:
            say(f"lab {lab}: cleaned ({len(done)} steps)")


def host_delays(p: Params, topo: Topology) -> dict[str, str]:
    """Each host's egress delay spec: ``--host-delay`` where given, else ``--delay``."""
    per: dict[str, str] = dict(p.extra.get("host_delay") or {})
    for name in per:
        if name not in {h.name for h in topo.hosts}:
            raise LabError(f"--host-delay {name}: the lab's hosts are n0..n"
                           f"{len(topo.hosts) - 1}")
    if p.latency:
        return {h.name: per.get(h.name, p.latency) for h in topo.hosts}
    return per


def _tune(p: Params) -> list[str]:
    out = list(p.tune)
    if not p.lifeguard:
        out.append("lifeguard=false")
    return out


# ---- start and convergence ------------------------------------------------------------------


def knows_all(cluster: LabCluster) -> bool:
    """Every running agent lists every running agent (itself too) as alive."""
    up = [n for n in cluster.nodes if n.up]
    names = {n.name for n in up}
    return all(names <= cluster.alive_seen(n) for n in up)


async def wait_until(cond: Callable[[], bool], limit: float, step: float = 0.02) -> float:
    t0 = time.monotonic()
    with trio.move_on_after(limit):
        while not cond():
            await trio.sleep(step)
    return time.monotonic() - t0


async def cold_start(cluster: LabCluster, p: Params, rng: random.Random) -> dict[str, Any]:
    """As ``cold_cluster`` in the simulator: node 0 alone, the seeds join it, everyone
    else joins through the seeds at a random moment of the first ``spread`` seconds.

    Every agent is started first and each is told to join (``PUT /v1/join``) on the
    simulator's schedule: an interpreter takes about a second of CPU to start, and
    twenty of them on two cores would otherwise spread the joins over ten."""
    n = p.nodes
    nodes = cluster.nodes
    seeds = nodes[:min(p.seeds, n)]
    spread = max(1.0, n / 200)
    rec = cluster.recorder
    rec.join_keep = 5
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(cluster.start, node)
    await cluster.wait_started(nodes)
    await trio.sleep(0.5)
    cluster.flush(cluster.now)
    plan = sorted((0.0 if i < len(seeds) else rng.uniform(0.5, 0.5 + spread), i)
                  for i in range(1, n))
    cluster.join_snapshot = await cluster.traffic_snapshot()
    t_start = cluster.now
    rec.track_join(0, n - 1, plot=False)
    t0 = trio.current_time()

    async def join(at: float, i: int) -> None:
        await trio.sleep_until(t0 + at)
        rec.track_join(i, n - 1, plot=i >= len(seeds))
        await cluster.join(nodes[i], [s for s in seeds if s.idx != i] or [nodes[0]])

    async with trio.open_nursery() as nursery:
        for at, i in plan:
            nursery.start_soon(join, at, i)
    limit = 120.0 + n / 10
    await wait_until(lambda: rec.joins_complete >= n and knows_all(cluster), limit)
    took = cluster.now - t_start - REORDER
    return {"start": "cold", "converged": knows_all(cluster),
            "converged_after_s": round(took, 3)}


# ---- scenarios ------------------------------------------------------------------------------


def _report(name: str, p: Params, cluster: LabCluster, result: dict[str, Any],
            wall: float) -> dict[str, Any]:
    return report_head(name, p, cluster.describe_network()) | {
        "kind": "lab", "result": result,
        "lab": {"lab": cluster.network.topology.lab, "hosts": p.nodes,
                "delay_line": cluster.delay_line_stats,
                "family": cluster.family, "member_events": cluster.events,
                "kernel": os.uname().release},
        "wall": {"seconds": round(wall, 3)},
    }


Scenario = Callable[[LabCluster, Params], Awaitable[dict[str, Any]]]


async def converge(cluster: LabCluster, p: Params) -> dict[str, Any]:
    rng = random.Random(f"scenario:{p.seed}")
    start = await cold_start(cluster, p, rng)
    before = cluster.join_snapshot
    assert before is not None
    rec = cluster.recorder
    return {"converged": start["converged"],
            "converged_after_s": start["converged_after_s"],
            "join_spread_s": max(1.0, p.nodes / 200),
            "joins_failed": cluster.joins_failed(),
            "dissemination": rec.dissemination(list(rec.joins.values())),
            "members_known_per_node": summarize(len(cluster.alive_seen(n))
                                                for n in cluster.nodes if n.up),
            "traffic": cluster.traffic_report(before, await cluster.traffic_snapshot()),
            "curves": rec.curves()}


async def _started(cluster: LabCluster, p: Params, rng: random.Random) -> dict[str, Any]:
    start = await cold_start(cluster, p, rng)
    if not start["converged"]:
        raise LabError(f"the lab's agents did not converge within the limit: "
                       f"{cluster.convergence_gaps()}")
    # As the simulator's cold start: the join storm passes before anything is measured.
    await trio.sleep(SETTLE)
    return start


async def crash(cluster: LabCluster, p: Params) -> dict[str, Any]:
    rng = random.Random(f"scenario:{p.seed}")
    start = await _started(cluster, p, rng)
    cfg = gossip_config(p)
    victims = sorted(rng.sample(range(p.seeds if p.nodes > p.seeds else 0, p.nodes),
                                min(p.crashes, p.nodes - 1)))
    await trio.sleep(rng.uniform(0.0, cfg.probe_interval))
    before = await cluster.traffic_snapshot()
    for v in victims:
        await cluster.kill(cluster.nodes[v])
    for v in victims:
        cluster.recorder.crashed(v)
    duration = p.duration if p.duration is not None else 60.0
    rec = cluster.recorder
    # The whole duration, as the simulator: the traffic figures cover the same window.
    await trio.sleep(duration)
    det = rec.detection()
    bound = detection_bound(cfg, p.nodes)
    worst = det["all_know_100pct_s"]["max"]
    return start | {
        "victims": [cluster.nodes[v].name for v in victims], "detection": det,
        "all_within_bound": det["undetected"] == 0 and worst is not None and worst <= bound,
        "false_positives": rec.false_positives(),
        "traffic": cluster.traffic_report(before, await cluster.traffic_snapshot()),
        "curves": rec.curves()}


async def detect(cluster: LabCluster, p: Params) -> dict[str, Any]:
    rng = random.Random(f"scenario:{p.seed}")
    start = await _started(cluster, p, rng)
    cfg = gossip_config(p)
    await trio.sleep(SETTLE)
    trials = max(1, min(int(p.extra.get("trials", 10)), p.nodes - 2))
    victims = rng.sample(range(1, p.nodes), trials)
    limit = p.duration if p.duration is not None else 120.0
    rec = cluster.recorder
    rows: list[dict[str, Any]] = []
    for v in victims:
        await trio.sleep(rng.uniform(0.0, cfg.probe_interval))
        await cluster.kill(cluster.nodes[v])
        rec.crashed(v)
        suspected, failed = rec.crash_suspect[v], rec.crash_failed[v]
        await wait_until(lambda f=failed: f.at(1.0) is not None, limit)  # type: ignore[misc]
        rows.append({"victim": cluster.nodes[v].name, "remaining": failed.need,
                     "first_suspect_s": _round(suspected.first),
                     "first_failed_s": _round(failed.first),
                     "all_failed_s": _round(failed.at(1.0))})
        await trio.sleep(SETTLE)
    return start | {
        "trials": rows,
        "summary": {k: summarize(r[k] for r in rows if r[k] is not None)
                    for k in ("first_suspect_s", "first_failed_s", "all_failed_s")},
        "undetected": sum(1 for r in rows if r["all_failed_s"] is None),
        "false_positives": rec.false_positives()}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _loss_conditions(p: Params, rate: float) -> Conditions:
    protos = tuple(p.extra.get("loss_protocols") or PROTOCOLS)
    return Conditions(loss=rate, loss_protocols=protos)


async def _quiet(cluster: LabCluster, p: Params, rate: float, duration: float,
                 faults: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
    """``duration`` seconds under ``rate`` loss (and ``faults``): false positives."""
    rec = cluster.recorder
    fp0 = rec.false_positives()
    refute0 = cluster.refutations
    await cluster.network.apply(_loss_conditions(p, rate))
    before = await cluster.traffic_snapshot()
    async with trio.open_nursery() as nursery:
        if faults is not None:
            nursery.start_soon(faults)
        await trio.sleep(duration)
        nursery.cancel_scope.cancel()
    for n in cluster.nodes:
        cluster.resume(n)
    after = await cluster.traffic_snapshot()
    await cluster.network.apply(Conditions())
    fp1 = rec.false_positives()
    fp = {k: fp1[k] - fp0[k] for k in ("failed_healthy", "failed_slow", "suspect_healthy",
                                       "suspect_slow")}
    fp["examples"] = fp1["examples"][len(fp0["examples"]):]
    healthy = p.nodes - len(rec.slow)
    fp["failed_healthy_per_node_hour"] = round(
        fp["failed_healthy"] / max(healthy, 1) / (duration / 3600), 6)
    return {"loss": rate, "false_positives": fp,
            "traffic": cluster.traffic_report(before, after),
            "refutations": cluster.refutations - refute0}


async def loss(cluster: LabCluster, p: Params) -> dict[str, Any]:
    rng = random.Random(f"scenario:{p.seed}")
    start = await _started(cluster, p, rng)
    duration = p.duration if p.duration is not None else 120.0
    rows = []
    for rate in p.sweep:
        rows.append(await _quiet(cluster, p, rate, duration))
        await trio.sleep(SETTLE)
    return start | {"sweep": rows,
                    "loss_protocols": list(p.extra.get("loss_protocols") or PROTOCOLS),
                    "false_failures_total": sum(r["false_positives"]["failed_healthy"]
                                                for r in rows)}


async def slow(cluster: LabCluster, p: Params) -> dict[str, Any]:
    """SIGSTOP spells (exponential, mean ``mean_pause``) between exponential runs (mean
    ``mean_run``) on ``slow_fraction`` of the agents: a whole process stops, as the
    simulator's ``Slow(stall=False)``."""
    rng = random.Random(f"scenario:{p.seed}")
    start = await _started(cluster, p, rng)
    duration = p.duration if p.duration is not None else 120.0
    k = max(1, round(p.slow_fraction * p.nodes))
    chosen = sorted(random.Random(f"slow:{p.seed}").sample(range(p.nodes), k))
    cluster.recorder.slow.update(chosen)
    frng = random.Random(f"faults:{p.seed}")
    pauses: list[float] = []

    async def stall(node: LabNode) -> None:
        while True:
            await trio.sleep(frng.expovariate(1 / p.mean_run))
            d = frng.expovariate(1 / p.mean_pause)
            cluster.pause(node)
            pauses.append(d)
            try:
                await trio.sleep(d)
            finally:
                cluster.resume(node)

    async def faults() -> None:
        async with trio.open_nursery() as n:
            for i in chosen:
                n.start_soon(stall, cluster.nodes[i])

    row = await _quiet(cluster, p, p.loss, duration, faults)
    label = "lifeguard" if p.lifeguard else "swim"
    return start | {"slow_nodes": k, "stop": "SIGSTOP", label: row,
                    "pauses": summarize(pauses)}


async def partition(cluster: LabCluster, p: Params) -> dict[str, Any]:
    rng = random.Random(f"scenario:{p.seed}")
    start = await _started(cluster, p, rng)
    cfg = gossip_config(p)
    k = max(1, round(p.split_fraction * p.nodes))
    side_a = frozenset(sorted(rng.sample(range(p.nodes), k)))
    split_for = p.split_for if p.split_for is not None else \
        detection_bound(cfg, p.nodes) + 10.0
    ports = frozenset(cluster.nodes[i].host.port for i in side_a)
    await trio.sleep(1.0)
    await cluster.network.apply(Conditions(cuts=(Cut(ports, symmetric=not p.asymmetric),)))
    await trio.sleep(split_for)
    cross = cluster.cross_failed(side_a)
    await cluster.network.apply(Conditions())
    before = await cluster.traffic_snapshot()
    limit = p.duration if p.duration is not None else 4 * cfg.reconnect_interval + 60.0
    took = await wait_until(lambda: knows_all(cluster), limit, step=0.05)
    merged = knows_all(cluster)
    return start | {
        "side_a": len(side_a), "side_b": p.nodes - len(side_a),
        "symmetric": not p.asymmetric, "split_s": round(split_for, 3),
        "cross_failed_at_heal": cross, "merged": merged,
        "merge_after_heal_s": round(took, 3) if merged else None,
        "reconnect_interval_s": cfg.reconnect_interval,
        "traffic": cluster.traffic_report(before, await cluster.traffic_snapshot())}


async def churn(cluster: LabCluster, p: Params) -> dict[str, Any]:
    rng = random.Random(f"scenario:{p.seed}")
    start = await _started(cluster, p, rng)
    cfg = gossip_config(p)
    duration = p.duration if p.duration is not None else 120.0
    rate = max(p.crashes, 1) / 60.0
    down_for = 20 * cfg.probe_interval
    seeds = list(range(min(p.seeds, p.nodes)))
    plan: list[tuple[float, int]] = []
    t = rng.expovariate(rate)
    busy: dict[int, float] = {}
    while t < duration:
        victim = rng.randrange(len(seeds), p.nodes) if p.nodes > len(seeds) else 0
        if busy.get(victim, -1.0) < t:
            plan.append((t, victim))
            busy[victim] = t + down_for + 1.0
        t += rng.expovariate(rate)
    rec = cluster.recorder
    before = await cluster.traffic_snapshot()
    t0 = trio.current_time()

    async def one(at: float, v: int) -> None:
        await trio.sleep_until(t0 + at)
        node = cluster.nodes[v]
        await cluster.kill(node)
        rec.crashed(v)
        await trio.sleep(down_for)
        cluster.forget_members(node)
        up = sum(1 for nd in cluster.nodes if nd.up)
        rec.track_join(v, up, rejoin=True)
        await cluster.start(node, [cluster.nodes[s] for s in seeds if cluster.nodes[s].up])

    async with trio.open_nursery() as nursery:
        for at, v in plan:
            nursery.start_soon(one, at, v)
        await trio.sleep(duration)
    return start | {
        "crashes": len(plan), "detection": rec.detection(),
        "rejoin": rec.dissemination(list(rec.joins.values())),
        "false_positives": rec.false_positives(),
        "traffic": cluster.traffic_report(before, await cluster.traffic_snapshot())}


LAB_SCENARIOS: dict[str, Scenario] = {
    "converge": converge, "crash": crash, "detect": detect, "loss": loss, "slow": slow,
    "partition": partition, "churn": churn,
}


async def run_scenario(name: str, p: Params, ledger_dir: Path = DEFAULT_DIR,
                       say: Callable[[str], None] | None = None) -> dict[str, Any]:
    if name not in LAB_SCENARIOS:
        raise LabError(f"the lab has no {name!r} scenario (it runs "
                       f"{', '.join(sorted(LAB_SCENARIOS))})")
    t0 = time.monotonic()
    p.extra["scenario"] = name
    async with open_lab(p, ledger_dir, say) as cluster:
        result = await LAB_SCENARIOS[name](cluster, p)
    # After the teardown: the delay line's own figures are in by then.
    return _report(name, p, cluster, result, time.monotonic() - t0)

