"""Integration: real agents on 127.0.0.1, driven through signals, the API and the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from rumor.gossip.version import release
from rumor.gossip.wire import PROTOCOL_VERSION

from ..agents import Agent, AgentCluster, free_port, rumor_cmd, wait_for


def test_five_agents_converge_and_detect_kill9(cluster: AgentCluster) -> None:
    agents = cluster.start(5)
    victim, others = agents[3], [a for a in agents if a is not agents[3]]
    victim.signal(signal.SIGKILL)
    victim.wait_exit()
    wait_for(lambda: all(a.status_of(victim.name) == "failed" for a in others), 20,
             "every agent to list the victim failed")
    # The failure was logged as a structured event by every observer.
    for a in others:
        assert any(e["member"] == victim.name and e["status"] == "failed"
                   for e in a.events())


@pytest.mark.alone
def test_sigstop_shorter_than_suspicion_ends_in_refutation(cluster: AgentCluster) -> None:
    agents = cluster.start(5)
    victim, others = agents[2], [a for a in agents if a is not agents[2]]
    inc = others[0].members()[victim.name]["incarnation"]
    victim.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: any(a.status_of(victim.name) == "suspect" for a in others), 20,
                 "someone to suspect the stopped agent")
    finally:
        victim.signal(signal.SIGCONT)
    wait_for(lambda: all(a.members().get(victim.name, {}).get("status") == "alive"
                         and a.members()[victim.name]["incarnation"] > inc for a in others),
             10, "the refutation to spread")
    assert not [e for a in others for e in a.events()
                if e["member"] == victim.name and e["status"] == "failed"]


def test_graceful_leave_and_restart_with_same_name(cluster: AgentCluster) -> None:
    agents = cluster.start(4)
    leaver, others = agents[1], [a for a in agents if a is not agents[1]]
    leaver.signal(signal.SIGTERM)
    assert leaver.wait_exit() == 0
    wait_for(lambda: all(a.status_of(leaver.name) == "left" for a in others), 10,
             "everyone to see the leave")
    old = others[0].members()[leaver.name]["incarnation"]
    leaver.start(join=agents[0])
    wait_for(lambda: cluster.converged(4), 15, "the restarted agent to rejoin")
    assert others[0].members()[leaver.name]["incarnation"] > old


def test_cli_members_join_leave(cluster: AgentCluster, tmp_path: Path) -> None:
    agents = cluster.start(2)
    lone = Agent("lone", tmp_path)
    lone.start()
    cluster.agents.append(lone)
    wait_for(lambda: bool(lone.members()), 20, "the lone agent's API")

    out = subprocess.run([*rumor_cmd(), "members", "--api", agents[0].api, "--json"],
                         capture_output=True, text=True, timeout=30, check=True)
    listed = json.loads(out.stdout)
    assert {m["name"] for m in listed} == {"a0", "a1"}
    assert {"name", "addr", "status", "incarnation"} <= set(listed[0])

    table = subprocess.run([*rumor_cmd(), "members", "--api", agents[0].api],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    assert "a1" in table and "alive" in table

    subprocess.run([*rumor_cmd(), "join", "--api", lone.api, agents[0].addr],
                   capture_output=True, text=True, timeout=30, check=True)
    wait_for(lambda: cluster.converged(3), 15, "the lone agent to join")

    subprocess.run([*rumor_cmd(), "leave", "--api", lone.api], capture_output=True,
                   text=True, timeout=30, check=True)
    assert lone.wait_exit() == 0
    wait_for(lambda: agents[0].status_of("lone") == "left", 10, "the leave to spread")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(rumor_cmd() + list(args), capture_output=True, text=True,
                          timeout=60)


def test_unreachable_seed_gives_one_line_error_and_nonzero_exit(tmp_path: Path) -> None:
    dead = free_port()
    r = _run("agent", "--name", "x", "--bind", f"127.0.0.1:{free_port()}",
             "--api", f"127.0.0.1:{free_port()}", "--profile", "local",
             "--join", f"127.0.0.1:{dead}")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("rumor: could not join") and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["agent", "--bind", "nonsense:port"], "port must be a number"),
    (["agent", "--profile", "moon"], "invalid choice"),
    (["agent", "--tag", "novalue"], "KEY=VALUE"),
    (["members", "--api", "127.0.0.1:1"], "cannot reach"),
])
def test_bad_arguments_are_one_clear_line(args: list[str], needle: str) -> None:
    r = _run(*args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_reported(cluster: AgentCluster) -> None:
    (a,) = cluster.start(1)
    r = _run("agent", "--name", "y", "--bind", a.addr, "--api", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert "cannot bind gossip address" in r.stderr and "Traceback" not in r.stderr


def test_version() -> None:
    r = _run("--version")
    assert r.returncode == 0
    assert r.stdout == f"rumor {release()} (gossip protocol {PROTOCOL_VERSION})\n"
