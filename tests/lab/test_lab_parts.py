"""The lab's pure parts: topology, rules, counters, ledger bookkeeping, comparison, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rumor.simulations.lab import compare
from rumor.simulations.lab.cli import LAB_SCENARIO_NAMES
from rumor.simulations.lab.conditions import (
    Conditions,
    Counts,
    Cut,
    fault_rules,
    faults_script,
    parse_counters,
    table_script,
)
from rumor.simulations.lab.ledger import Ledger, LedgerError
from rumor.simulations.lab.scenarios import LAB_SCENARIOS
from rumor.simulations.lab.topology import Topology, host_steps, switch_steps
from rumor.simulations.scenarios import SCENARIOS


def test_topology_names_addresses_and_order() -> None:
    t = Topology.of("rl0a1b", 3)
    assert [h.name for h in t.hosts] == ["n0", "n1", "n2"]  # the simulator's names
    assert t.namespaces == ("rl0a1b-sw", "rl0a1b-n0", "rl0a1b-n1", "rl0a1b-n2")
    h = t.hosts[2]
    assert (h.ipv4, h.ipv6) == ("10.211.0.3", "fd00:211::3")
    assert Topology.of("rl0a1b", 250).hosts[249].ipv4 == "10.211.0.250"
    steps = host_steps(t, h)
    # DAD is off before the veth exists (``default`` applies to new links) and the
    # IPv6 address is added with nodad too.
    assert "accept_dad=0" in " ".join(steps[0].argv)
    assert steps[1].argv[:6] == ("ip", "-n", "rl0a1b-n2", "link", "add", "eth0")
    v6 = next(s for s in steps if "fd00:211::3/64" in s.argv)
    assert v6.argv[-1] == "nodad"
    assert all(len(h.port) <= 15 and len(h.netns) <= 15 for h in t.hosts)
    assert "br0" in " ".join(switch_steps(t)[1].argv)
    for bad in ("rl-1", "lab", "rl0A1B", "rl0a1bc"):
        with pytest.raises(ValueError):
            Topology.of(bad, 3)
    with pytest.raises(ValueError):
        Topology.of("rl0a1b", 0)


def test_cuts_and_loss_render_as_the_bridge_rules() -> None:
    ports = ["n0", "n1", "n2", "n3"]
    sym = fault_rules(Conditions(cuts=(Cut(frozenset({"n0", "n1"})),)), ports)
    assert sym == [
        'iifname { "n0", "n1" } oifname { "n2", "n3" } meta l4proto { udp, tcp } counter drop',
        'iifname { "n2", "n3" } oifname { "n0", "n1" } meta l4proto { udp, tcp } counter drop']
    one_way = fault_rules(Conditions(cuts=(Cut(frozenset({"n1"}), frozenset({"n0"}),
                                               symmetric=False, protocols=("udp",)),)),
                          ports)
    assert one_way == ['iifname { "n1" } oifname { "n0" } meta l4proto udp counter drop']
    lossy = fault_rules(Conditions(loss=0.1), ports)
    assert lossy == ["meta l4proto { udp, tcp } numgen random mod 1000000 < 100000 counter drop"]
    assert fault_rules(Conditions(), ports) == []
    script = faults_script(Conditions(loss=0.25, loss_protocols=("tcp",)), ports)
    assert script.splitlines() == [
        "flush chain bridge rumor_lab faults",
        "add rule bridge rumor_lab faults meta l4proto tcp numgen random mod 1000000 < "
        "250000 counter drop"]
    for bad in (dict(loss=1.5), dict(loss=-0.1), dict(loss_protocols=("icmp",))):
        with pytest.raises(ValueError):
            Conditions(**bad)  # type: ignore[arg-type]
    table = table_script(ports)
    assert table.count("counter") == 4 * len(ports)
    assert "hook forward" in table and "jump faults" in table


def test_counters_are_read_back_and_turned_into_payload() -> None:
    rules = []
    for port, kind, pk, by in (("n0", "udp", 10, 1280), ("n0", "tcp", 6, 1000),
                               ("n0", "syn", 1, 60), ("n0", "synack", 0, 0),
                               ("n1", "udp", 2, 96)):
        rules.append({"rule": {"comment": f"{port} {kind}",
                               "expr": [{"match": {}}, {"counter": {"packets": pk,
                                                                    "bytes": by}}]}})
    got = parse_counters(json.dumps({"nftables": [{"metainfo": {}}, *rules]}))
    assert got["n0"] == Counts(10, 1280, 6, 1000, 1, 0)
    assert got["n0"].udp_payload(4) == 1280 - 10 * 28
    assert got["n1"].udp_payload(6) == 0
    assert got["n0"].tcp_payload(4) == 1000 - 6 * 52 - 8
    with pytest.raises(ValueError):
        parse_counters("not json")
    with pytest.raises(ValueError):
        parse_counters("{}")


def test_ledger_cleans_only_what_it_recorded(tmp_path: Path) -> None:
    led = Ledger.create(tmp_path, "rl0001", {"scenario": "x"})
    with pytest.raises(LedgerError):
        Ledger.create(tmp_path, "rl0001", {})  # one ledger per lab
    work = tmp_path / "rumor-lab-rl0001"
    work.mkdir()
    led.directory(work)
    other = tmp_path / "not-the-labs"
    other.mkdir()
    led.directory(other)  # recorded, but not named after the lab: left alone
    # A process whose pid was reused (another start time) is not killed.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        led.record({"kind": "process", "pid": sleeper.pid, "pid_start": 1, "what": "x"})
        with open(led.path, "a") as f:
            f.write('{"kind": "netns", "na')  # a lab killed while writing its last line
        again = Ledger.load(led.path)
        assert [e["kind"] for e in again.entries] == ["lab", "dir", "dir", "process"]
        assert again.owner_alive  # this process wrote it
        done = again.clean()
        assert done == [f"removed {work}"]
        assert sleeper.poll() is None
        assert other.is_dir() and not work.exists() and not led.path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    foreign = Ledger.create(tmp_path, "rl0002", {})
    foreign.record({"kind": "netns", "name": "somebody-elses"})
    with pytest.raises(LedgerError, match="not the lab's"):
        foreign.clean()
    (tmp_path / "rl0003.jsonl").write_text('{"kind": "netns", "name": "x"}\n')
    with pytest.raises(LedgerError, match="not a rumor lab ledger"):
        Ledger.load(tmp_path / "rl0003.jsonl")


def _report(trials: list[float], failed: int) -> dict[str, object]:
    return {"result": {"trials": [{"first_suspect_s": x, "first_failed_s": x + 4,
                                   "all_failed_s": x + 5} for x in trials],
                       "false_positives": {"failed_healthy": failed}}}


def test_compare_rows_hold_each_figure_to_its_bar() -> None:
    lab = _report([1.0, 2.0, 3.0], 0)
    sim = _report([1.05, 2.1, 3.2], 0)
    rows = {r["figure"]: r for r in compare.rows("detect", lab, sim)}
    assert rows["first suspicion, median"]["sim_over_lab"] == 1.05
    assert rows["first suspicion, median"]["within"]
    assert rows["false failures of healthy nodes"]["within"]
    off = {r["figure"]: r for r in compare.rows("detect", lab, _report([2.0, 3.0, 4.0], 1))}
    assert not off["first suspicion, median"]["within"]  # 1.5x
    assert not off["false failures of healthy nodes"]["within"]  # 0 vs 1: not equal
    text = compare.table("detect", list(off.values()), "header")
    assert "| first suspicion, median | 2.000 s | 3.000 s | 1.5 | ±10% | NO |" in text
    assert set(compare.FIGURES) == set(LAB_SCENARIOS)


def test_lab_scenarios_are_the_simulators() -> None:
    assert set(LAB_SCENARIO_NAMES) == set(LAB_SCENARIOS)
    assert set(LAB_SCENARIOS) <= set(SCENARIOS)


def _rumor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rumor.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_cli_says_what_is_wrong(tmp_path: Path) -> None:
    r = _rumor("lab", "compare")
    assert r.returncode == 2 and "name one scenario" in r.stderr
    r = _rumor("lab", "converge", "--host-delay", "n3")
    assert r.returncode == 2 and "expected HOST=SPEC" in r.stderr
    r = _rumor("lab", "converge", "--delay", "gauss:1")
    assert r.returncode == 2 and "bad latency" in r.stderr
    r = _rumor("lab", "bogus")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _rumor("lab", "list", env={"RUMOR_LAB_DIR": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip() == "no labs"


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the refusal without root")
def test_without_root_the_lab_says_so() -> None:
    r = _rumor("lab", "converge")
    assert r.returncode == 1 and "rumor lab needs root" in r.stderr


def test_without_root_the_lab_says_so_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from rumor.simulations.lab import kernel
    monkeypatch.setattr(kernel.os, "geteuid", lambda: 1000)
    reason = kernel.why_not_here()
    assert reason is not None and reason.startswith("rumor lab needs root")
