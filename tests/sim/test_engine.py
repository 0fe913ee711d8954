"""The chaos simulator: determinism, detection bounds, loss, partitions, the engine's
fault primitives and the ``rumor sim`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from rumor.gossip.config import LAN, LOCAL
from rumor.gossip.wire import Status
from rumor.simulations.engine import Simulator
from rumor.simulations.metrics import Recorder
from rumor.simulations.network import Fixed, LogNormal, Network, Partition, Uniform
from rumor.simulations.scenarios import (
    Params,
    converge,
    crash,
    detection_bound,
    loss,
    partition,
    slow,
    warm_cluster,
)


def _strip(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "wall"}


def test_same_seed_same_report_different_seed_different_report() -> None:
    p = Params(nodes=40, seed=7, loss=0.05, duration=25.0, crashes=2)
    a, b = crash(p), crash(p)
    assert json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)
    c = crash(Params(nodes=40, seed=8, loss=0.05, duration=25.0, crashes=2))
    assert _strip(a) != _strip(c)
    # Every wall-clock figure lives under "wall" and nowhere else.
    assert set(a["wall"]) >= {"seconds", "events_per_s"}


def test_cold_converge_is_deterministic_and_complete() -> None:
    p = Params(nodes=60, seed=3, loss=0.02)
    a, b = converge(p), converge(p)
    assert _strip(a) == _strip(b)
    res = a["result"]
    assert res["converged"] and res["joins_failed"] == 0
    assert res["dissemination"]["incomplete"] == 0
    assert res["members_known_per_node"]["min"] == 60


def test_100_node_crash_detected_by_every_live_node_within_the_bound() -> None:
    bound = detection_bound(LAN, 100)
    rep = crash(Params(nodes=100, seed=2, crashes=3, duration=bound + 2))
    det = rep["result"]["detection"]
    assert det["crashed"] == 3 and det["undetected"] == 0
    assert det["all_know_100pct_s"]["max"] <= bound
    assert rep["result"]["all_within_bound"]
    # The first failing probe comes within a few protocol periods (SWIM: T·e/(e−1)).
    assert det["first_suspicion_s"]["max"] < 5 * LAN.probe_interval
    assert rep["result"]["false_positives"]["failed_healthy"] == 0


def test_no_false_positives_at_5_percent_loss_with_lifeguard() -> None:
    rep = loss(Params(nodes=100, seed=4, sweep=(0.05,), duration=90.0))
    (row,) = rep["result"]["sweep"]
    assert row["loss"] == 0.05
    assert row["false_positives"]["failed_healthy"] == 0


def test_healed_partition_merges_back() -> None:
    rep = partition(Params(nodes=30, seed=5, profile="local"))
    res = rep["result"]
    assert res["cross_failed_at_heal"] == 1.0  # each side had failed the other
    assert res["merged"]
    assert res["merge_after_heal_s"] <= 4 * LOCAL.reconnect_interval + 10


def test_asymmetric_partition_merges_back_too() -> None:
    rep = partition(Params(nodes=20, seed=6, profile="local", asymmetric=True))
    assert rep["result"]["merged"]


def test_lifeguard_cuts_false_failures_of_healthy_nodes() -> None:
    rep = slow(Params(nodes=30, seed=1, profile="local", duration=30.0, mean_pause=2.0,
                      mean_run=1.0, slow_fraction=0.1))
    res = rep["result"]
    swim, lg = res["swim"]["false_positives"], res["lifeguard"]["false_positives"]
    assert swim["failed_healthy"] > 5 * max(lg["failed_healthy"], 1)


# ---- engine and network primitives ----------------------------------------------------


def _pair(config: Any = LOCAL) -> tuple[Simulator, Recorder]:
    sim = Simulator(config, Network(Fixed(0.001)), seed=1)
    rec = Recorder(sim)
    warm_cluster(sim, 3)
    return sim, rec


def test_latency_distributions_are_seeded() -> None:
    import random
    for lat in (Fixed(0.002), Uniform(0.001, 0.003), LogNormal(0.001, 0.5, floor=0.0002)):
        a = [lat.sample(random.Random(1)) for _ in range(5)]
        b = [lat.sample(random.Random(1)) for _ in range(5)]
        assert a == b and all(x > 0 for x in a)
    assert Uniform(0.001, 0.003).sample(random.Random(2)) <= 0.003


def test_partition_rules() -> None:
    sym = Partition(frozenset({1, 2}))
    assert sym.blocks(1, 3) and sym.blocks(3, 1) and not sym.blocks(1, 2)
    asym = Partition(frozenset({1}), frozenset({2}), symmetric=False)
    assert asym.blocks(1, 2) and not asym.blocks(2, 1) and not asym.blocks(1, 3)


def test_paused_node_holds_its_input_and_refutes_on_resume() -> None:
    sim, _ = _pair()
    sim.run_until(2.0)
    sim.pause(2)
    sim.run_until(3.0)
    others = [sim.nodes[0].core, sim.nodes[1].core]
    assert any(c.members["n2"].status != Status.ALIVE for c in others)
    assert sim.nodes[2].held  # pings waited in the kernel
    sim.resume(2)
    sim.run_until(4.0)
    assert all(c.members["n2"].status == Status.ALIVE for c in others)
    assert sim.nodes[2].core.incarnation > 1


def test_crash_refuses_streams_and_restart_rejoins_with_same_name() -> None:
    sim, rec = _pair()
    sim.run_until(1.0)
    sim.crash(1)
    rec.crashed(1)
    sim.run_until(8.0)
    assert sim.nodes[0].core.members["n1"].status == Status.DEAD
    sim.restart(1, [0])
    sim.run_until(12.0)
    assert sim.counters["restarts"] == 1
    assert sim.nodes[1].join_result is not None and sim.nodes[1].join_result.contacted == 1
    assert sim.nodes[0].core.members["n1"].status == Status.ALIVE
    assert sim.nodes[0].core.members["n1"].incarnation > 1
    # Failures of a node that really crashed are detections, not false positives.
    assert rec.false_positives()["failed_healthy"] == 0


def test_message_accounting() -> None:
    sim, _ = _pair()
    sim.run_until(5.0)
    for nd in sim.nodes:
        assert nd.packets_out > 0 and nd.bytes_out > nd.packets_out
        assert nd.packets_in > 0 and nd.bytes_in > 0


# ---- the command -----------------------------------------------------------------------


def _sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rumor.simulations.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_command_prints_one_json_object_and_a_summary_on_stderr(tmp_path: Any) -> None:
    r = _sim("crash", "--nodes", "20", "--seed", "3", "--duration", "20", "--json",
             "--plots", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["scenario"] == "crash" and report["params"]["nodes"] == 20
    assert "100% know failed" in r.stderr
    # Plots are drawn when matplotlib is there and cleanly skipped when it is not.
    assert report["plots"] or "plots skipped" in r.stderr


def test_command_rejects_bad_arguments_in_one_line() -> None:
    r = _sim("crash", "--loss", "2")
    assert r.returncode == 2 and "expected a number from 0 to 1" in r.stderr
    assert "Traceback" not in r.stderr
    r = _sim("crash", "--latency", "gauss:1")
    assert r.returncode == 2 and "bad latency" in r.stderr and "Traceback" not in r.stderr
