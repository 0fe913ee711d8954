"""Integration: encrypted gossip across real agents on 127.0.0.1 (``--keyring``, the
``rumor keyring`` commands, refusals of keyless and wrong-key agents)."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from pathlib import Path

from rumor.gossip.keyring import decode_key
from rumor.gossip.keyring_commands import key_id
from rumor.gossip.keyring_file import generate_key, load_keyring

from ..agents import Agent, AgentCluster, rumor, wait_for

JSON = {"content-type": "application/json"}


def register(a: Agent, name: str) -> None:
    body = json.dumps({"name": name, "port": 9000}).encode()
    req = urllib.request.Request(f"http://{a.api}/v1/agent/service/register", data=body,
                                 method="PUT", headers=JSON)
    with urllib.request.urlopen(req, timeout=5):
        pass


def services(a: Agent) -> set[str]:
    try:
        return set(a.get("/v1/catalog/services"))
    except OSError:
        return set()


def test_rotation_across_five_live_agents_loses_no_member_or_message(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    assert len(rumor("keyring", "generate").stdout.strip()) == 44
    cluster = AgentCluster(tmp_path)
    files = []
    for i in range(5):
        f = tmp_path / f"keyring{i}"
        f.write_text(old + "\n")
        files.append(f)
    try:
        for i in range(5):
            a = Agent(f"a{i}", tmp_path, ["--keyring", str(files[i])])
            a.start(cluster.agents[0] if cluster.agents else None)
            cluster.agents.append(a)
            if i == 0:
                wait_for(a.members, 20, "the seed's API")
        wait_for(lambda: cluster.converged(5), 30, "5 encrypted agents to converge")
        agents = list(cluster.agents)

        # Watch for any member that stops looking alive during the whole rotation.
        seen_down: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for a in agents:
                    for m in a.members().values():
                        if m["status"] != "alive":
                            seen_down.append(f"{a.name} saw {m['name']} {m['status']}")
                stop.wait(0.05)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for step, (op, key) in enumerate((("install", new), ("use", new),
                                              ("remove", old))):
                out = rumor("keyring", op, key, "--api", agents[step].api).stdout
                assert f"{op}: 5/5 member(s) answered" in out, out
                # A message sent right after each step reaches everyone.
                register(agents[4 - step], f"svc{step}")
                wait_for(lambda s=step: all(f"svc{s}" in services(a) for a in agents), 10,
                         f"svc{step} to reach every agent after {op}")
        finally:
            stop.set()
            watcher.join()
        assert seen_down == []
        listing = rumor("keyring", "list", "--api", agents[2].api).stdout
        new_id = key_id(decode_key(new))
        assert f"id {new_id}  on 5/5 member(s), primary on 5" in listing, listing
        assert old not in listing and new not in listing  # fingerprints, never keys
        assert rumor("keyring", "id", new).stdout.strip() == new_id
        # Every agent rewrote its --keyring file: a restart keeps the new key.
        for f in files:
            assert load_keyring(f).keys == [decode_key(new)]
        # Using a key that not every member holds is refused before anyone switches.
        stray = generate_key()
        res = rumor("keyring", "use", stray, "--api", agents[1].api, check=False)
        assert res.returncode == 1 and "not installed on a0, a1, a2, a3, a4" in res.stderr
        assert all(load_keyring(f).keys == [decode_key(new)] for f in files)
        # Removing the key in use is refused everywhere, and said so.
        res = rumor("keyring", "remove", new, "--api", agents[0].api, check=False)
        assert res.returncode == 1 and "cannot remove the primary key" in res.stdout

        # An agent with the old key, or none, cannot join, and says why.
        stale = tmp_path / "stale"
        stale.write_text(old + "\n")
        for name, extra, why in (("old-key", ["--keyring", str(stale)],
                                  "no gossip key of the receiving agent"),
                                 ("keyless", [], "--keyring")):
            x = Agent(name, tmp_path, extra)
            x.start(agents[0])
            cluster.agents.append(x)
            assert x.wait_exit(30) == 1
            assert why in x.log.read_text()
        assert all(sorted(a.members()) == [f"a{i}" for i in range(5)] for a in agents), \
            [sorted(a.members()) for a in agents]
        # Forged plaintext and garbage datagrams are dropped before parsing, and counted.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for junk in (b"\x01\x91\x93\x00\x01\xa1x", b"RK\x01" + bytes(60), b"\xff"):
                s.sendto(junk, ("127.0.0.1", agents[0].port))
        wait_for(lambda: agents[0].get("/v1/health")["stats"]["packets_unauthenticated"] >= 3,
                 5, "the forged datagrams to be counted")
        health = agents[0].get("/v1/health")
        refused = health["encryption"]["refused"]
        assert refused["unknown_key"] >= 1 and refused["plaintext"] >= 1
        metrics = urllib.request.urlopen(f"http://{agents[0].api}/metrics", timeout=5).read()
        assert b'rumor_gossip_refused_total{reason="plaintext"}' in metrics
    finally:
        cluster.close()


def test_keyring_flag_and_commands_fail_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not-a-key\n")
    res = rumor("agent", "--name", "x", "--keyring", str(bad), check=False)
    assert res.returncode == 2 and "--keyring" in res.stderr and "base64" in res.stderr
    res = rumor("agent", "--name", "x", "--keyring", str(tmp_path / "missing"), check=False)
    assert res.returncode == 2 and "cannot read keyring" in res.stderr
    cluster = AgentCluster(tmp_path)
    try:
        a = cluster.start(1)[0]
        res = rumor("keyring", "list", "--api", a.api, check=False)
        assert res.returncode == 1 and "without gossip encryption" in res.stderr
        res = rumor("keyring", "install", "zzz", "--api", a.api, check=False)
        assert res.returncode == 1
    finally:
        cluster.close()
