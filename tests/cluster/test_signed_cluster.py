"""Integration: signed membership across real agents on 127.0.0.1 (issue 27).

The two-step climb that left a victim failed on every peer, the hijack of its address
and ``rumor.inbound`` tag, a forged leave and a lasting accusation, replayed with raw
datagrams against agents in ``require`` mode: keyed (the attacker holds the gossip key
and seals its datagrams with it, credentials from the mesh CA) and plaintext with trust
on first use. Then a mixed cluster of the previous build and this one in ``prefer``
mode converges, keeps its catalog and detects a kill.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rumor.gossip.fields import MAX_INCARNATION_JUMP
from rumor.gossip.keyring import KeyringSeal
from rumor.gossip.keyring_file import generate_key, load_keyring
from rumor.gossip.wire import Alive, Dead, Message, encode_packet

from ..agents import HOST, Agent, AgentCluster, previous_build, rumor, wait_for

#: The last commit before signed membership: the build a cluster upgrades from.
PREVIOUS_BUILD = "01d84fe"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[AgentCluster]:
    c = AgentCluster(tmp_path)
    yield c
    c.close()


def _ca_credentials(tmp_path: Path, names: list[str]) -> Path:
    ca = tmp_path / "ca"
    rumor("ca", "init", "--dir", str(ca), "--cluster", "test")
    for n in names:
        rumor("ca", "credential", "--dir", str(ca), "--node", n,
              "--data-dir", str(tmp_path / f"data-{n}"))
    return ca


class Attacker:
    """Raw datagrams to an agent's gossip port, sealed with the cluster key if any."""

    def __init__(self, keyring: Path | None) -> None:
        self.seal = None if keyring is None else KeyringSeal(
            load_keyring(keyring), wall_offset=0.0, random_bytes=os.urandom)

    def send(self, target: Agent, *messages: Message) -> None:
        import socket
        data = encode_packet(list(messages))
        if self.seal is not None:
            data = self.seal.seal(time.time(), data, target.name)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(data, (HOST, target.port))


def _start_signed(cluster: AgentCluster, tmp_path: Path, keyed: bool) -> tuple[
        list[Agent], Attacker]:
    names = [f"a{i}" for i in range(3)]
    extra: dict[str, list[str]] = {}
    keyring = None
    if keyed:
        ca = _ca_credentials(tmp_path, names)
        keyring = tmp_path / "keyring"
        keyring.write_text(generate_key() + "\n")
        keyring.chmod(0o600)
        for n in names:
            extra[n] = ["--node-ca", str(ca / "ca.crt"), "--keyring", str(keyring)]
    else:
        for n in names:
            extra[n] = ["--node-tofu"]
    agents = cluster.start(3, lambda i: [
        "--data-dir", str(tmp_path / f"data-a{i}"), "--node-identity", "require",
        *extra[f"a{i}"]])
    for a in agents:
        assert all(m["key_id"] for m in a.members().values()), a.members()
    return agents, Attacker(keyring)


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed-ca", "plaintext-tofu"])
def test_nobody_can_climb_move_evict_or_retire_another_member(
        cluster: AgentCluster, tmp_path: Path, keyed: bool) -> None:
    agents, attacker = _start_signed(cluster, tmp_path, keyed)
    v = agents[2]
    before = agents[0].members()[v.name]
    inc = before["incarnation"]
    evil = (HOST, 1)
    for a in agents[:2]:
        # The two-step climb, the hijack and a forged leave, all in one datagram each.
        attacker.send(a, Alive(inc + MAX_INCARNATION_JUMP, v.name, (HOST, v.port), {}),
                      Dead(inc + 2 * MAX_INCARNATION_JUMP, v.name, a.name))
        attacker.send(a, Alive(inc + 1, v.name, evil, {"rumor.inbound": "1"}))
        attacker.send(a, Dead(inc, v.name, v.name))
    time.sleep(3.0)
    for a in agents[:2]:
        m = a.members()[v.name]
        assert m["status"] == "alive", m
        assert m["addr"] == before["addr"] and m["tags"] == before["tags"]
        assert m["incarnation"] == inc
    # An accusation at the signed incarnation is SWIM's right: it never lasts.
    for a in agents[:2]:
        attacker.send(a, Dead(inc, v.name, a.name))
    wait_for(lambda: all(a.status_of(v.name) == "alive"
                         and a.members()[v.name]["incarnation"] == inc + 1
                         for a in agents[:2]), 15, "the victim to refute by one")


def test_a_mixed_cluster_of_the_previous_build_and_prefer_mode_works(
        tmp_path: Path) -> None:
    with previous_build(tmp_path, PREVIOUS_BUILD) as old_tree:
        if old_tree is None:
            pytest.skip(f"no git history with {PREVIOUS_BUILD} (the previous build) here")
        _mixed(tmp_path, old_tree)


def _mixed(tmp_path: Path, old_tree: Path) -> None:
    cluster = AgentCluster(tmp_path)
    try:
        ca = _ca_credentials(tmp_path, ["new0", "new1"])
        env = {"PYTHONPATH": str(old_tree / ".typecheck")}
        new = [Agent(f"new{i}", tmp_path, ["--data-dir", str(tmp_path / f"data-new{i}"),
                                             "--node-ca", str(ca / "ca.crt"),
                                             "--node-identity", "prefer",
                                             "--service", f"name=web{i},port={9000 + i}"])
               for i in range(2)]
        old = [Agent(f"old{i}", tmp_path, ["--service", f"name=db{i},port={9100 + i}"],
                     env=env) for i in range(2)]
        order = [old[0], new[0], old[1], new[1]]
        for i, a in enumerate(order):
            a.start(order[0] if i else None)
            cluster.agents.append(a)
            if i == 0:
                wait_for(a.members, 20, "the seed's API")
        wait_for(lambda: cluster.converged(4), 30, "the mixed cluster to converge")
        # The old agents really are the previous build (no signed word in their view).
        assert old[0].get("/v1/members")[0].get("key_id", "absent") == "absent"
        # New members bind each other through the signed twins, old ones stay unsigned.
        wait_for(lambda: new[0].members()["new1"]["key_id"] is not None
                 and new[1].members()["new0"]["key_id"] is not None, 20,
                 "the new agents to bind each other's keys")
        assert new[0].members()["old1"]["key_id"] is None
        for a in order:
            wait_for(lambda a=a: set(a.get("/v1/catalog/services")) >=
                     {"web0", "web1", "db0", "db1"}, 20, f"{a.name}'s catalog")
        victim = new[1]
        victim.signal(signal.SIGKILL)
        victim.wait_exit()
        wait_for(lambda: all(a.status_of(victim.name) == "failed"
                             for a in (old[0], new[0], old[1])), 40,
                 "every agent, old and new, to fail the killed one")
    finally:
        cluster.close()
