"""Integration: signed policies across real agents on 127.0.0.1 (CLI, API, gossip
replication, persistence, forgery, key rotation)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rumor.policy.envelope import encode_envelope, read_envelope_file

from ..agents import Agent, AgentCluster, rumor, wait_for

ACCESS = """kind = "access"
name = "web-access"
version = {version}
destination = "web"
default = "deny"
allow = ["{allow}"]
"""


def held(a: Agent) -> dict[str, int]:
    try:
        return {d["name"]: d["version"] for d in a.get("/v1/policies")["documents"]}
    except (OSError, ValueError, urllib.error.URLError):
        return {}


def policies(a: Agent) -> dict[str, Any]:
    doc: dict[str, Any] = a.get("/v1/policies")
    return doc


def put_envelope(a: Agent, data: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://{a.api}/v1/policies", data=data, method="PUT",
                                 headers={"content-type": "application/x-rumor-envelope"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("ops", "ops2", "mallory"):
        rumor("keygen", "--out", str(tmp_path / name))
        out[name] = tmp_path / name
    return out


def start(cluster: AgentCluster, n: int, extra: list[str]) -> list[Agent]:
    return cluster.start(n, lambda i: [*extra, "--data-dir", str(cluster.workdir / f"data{i}")])


def test_publish_replicate_forge_restart(tmp_path: Path, keys: dict[str, Path]) -> None:
    doc = tmp_path / "access.toml"
    doc.write_text(ACCESS.format(version=1, allow="api"))
    cluster = AgentCluster(tmp_path)
    try:
        agents = start(cluster, 5, ["--trust-key", f"{keys['ops']}.pub"])
        # Publish through one agent (the CLI signs locally) and every agent holds it.
        out = rumor("policy", "publish", str(doc), "--key", f"{keys['ops']}.key",
                    "--api", agents[2].api)
        assert "accepted" in out.stdout
        wait_for(lambda: all(held(a) == {"web-access": 1} for a in agents), 15,
                 "every agent to hold the document")
        ev = json.loads(rumor("policy", "evaluate", "web", "--json", "--source", "api",
                              "--api", agents[4].api).stdout)
        assert ev["access"]["allowed"] is True
        ev = json.loads(rumor("policy", "evaluate", "web", "--json", "--source", "batch",
                              "--api", agents[4].api).stdout)
        assert ev["access"]["allowed"] is False

        # A forged document (untrusted key) is rejected with its reason, exit 1...
        doc.write_text(ACCESS.format(version=2, allow="mallory"))
        bad = rumor("policy", "publish", str(doc), "--key", f"{keys['mallory']}.key",
                    "--api", agents[1].api, check=False)
        assert bad.returncode == 1 and "untrusted" in bad.stderr
        # ...and a tampered one (valid signature, edited payload) too.
        rumor("policy", "sign", str(doc), "--key", f"{keys['ops']}.key",
              "--out", str(tmp_path / "v2.signed"))
        env = read_envelope_file((tmp_path / "v2.signed").read_text())
        tampered = encode_envelope(env.payload.replace(b"mallory", b"mallorz"),
                                   env.signatures)
        status, body = put_envelope(agents[1], tampered)
        assert status == 422 and body["reason"] == "untrusted"
        status, body = put_envelope(agents[1], b"\x93garbage")
        assert status == 400
        # Neither went anywhere: nobody else saw a rejection, everyone still holds v1.
        # The garbage body's 400 is counted too.
        assert policies(agents[1])["stats"]["rejected"] == {"untrusted": 2, "malformed": 1}
        with urllib.request.urlopen(f"http://{agents[1].api}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'rumor_policy_rejected_total{reason="untrusted"} 2.0' in metrics
        assert 'rumor_policy_rejected_total{reason="malformed"} 1.0' in metrics
        assert "rumor_policy_documents 1.0" in metrics
        assert "rumor_gossip_packets_in_total" in metrics
        for a in agents[2:]:
            assert policies(a)["stats"]["rejected"] == {}, a.name
        assert all(held(a) == {"web-access": 1} for a in agents)

        # An agent restarted with its data directory holds its documents at once, even
        # with nobody to join; a tampered file is set aside, not loaded.
        victim = agents[3]
        victim.signal(15)
        assert victim.wait_exit() == 0
        alone = Agent("a3", tmp_path, victim.extra)
        alone.start()
        wait_for(lambda: held(alone) == {"web-access": 1}, 15, "the restarted agent")
        alone.signal(15)
        alone.wait_exit()
        stored = tmp_path / "data4" / "policies" / "web-access.env"
        stored.write_bytes(stored.read_bytes().replace(b"api", b"apj"))
        agents[4].signal(15)
        agents[4].wait_exit()
        again = Agent("a4", tmp_path, agents[4].extra)
        again.start(agents[0])
        cluster.agents.append(again)
        wait_for(lambda: held(again) == {"web-access": 1}, 20,
                 "the repaired agent to fetch the document back")
        log = again.log.read_text()
        assert "policy_set_aside" in log
        assert list((tmp_path / "data4" / "policies" / "rejected").iterdir())
    finally:
        cluster.close()


def test_key_rotation_end_to_end(tmp_path: Path, keys: dict[str, Path]) -> None:
    cluster = AgentCluster(tmp_path)
    try:
        agents = start(cluster, 3, ["--trust-key", f"{keys['ops']}.pub"])
        new_pub = (Path(f"{keys['ops2']}.pub")).read_text().strip()
        trust = tmp_path / "trust.toml"
        trust.write_text(f'kind = "trust"\nname = "trust"\nversion = 1\n'
                         f'keys = ["{new_pub}"]\nthreshold = 1\n')
        # The new key alone cannot take over...
        bad = rumor("policy", "publish", str(trust), "--key", f"{keys['ops2']}.key",
                    "--api", agents[0].api, check=False)
        assert bad.returncode == 1 and "untrusted" in bad.stderr
        # ...the old and the new key together can (signed in two steps, offline).
        rumor("policy", "sign", str(trust), "--key", f"{keys['ops']}.key",
              "--out", str(tmp_path / "trust.signed"))
        rumor("policy", "sign", str(tmp_path / "trust.signed"), "--key",
              f"{keys['ops2']}.key", "--out", str(tmp_path / "trust.signed"))
        ok = rumor("policy", "verify", str(tmp_path / "trust.signed"),
                   "--trust-key", f"{keys['ops']}.pub")
        assert "OK" in ok.stdout
        rumor("policy", "publish", str(tmp_path / "trust.signed"), "--api", agents[1].api)
        wait_for(lambda: all(policies(a)["trust"]["version"] == 1 for a in agents), 15,
                 "every agent to rotate its keys")
        doc = tmp_path / "access.toml"
        doc.write_text(ACCESS.format(version=1, allow="api"))
        old = rumor("policy", "publish", str(doc), "--key", f"{keys['ops']}.key",
                    "--api", agents[2].api, check=False)
        assert old.returncode == 1 and "untrusted" in old.stderr
        rumor("policy", "publish", str(doc), "--key", f"{keys['ops2']}.key",
              "--api", agents[2].api)
        wait_for(lambda: all(held(a).get("web-access") == 1 for a in agents), 15,
                 "the new key's document everywhere")
        # A late agent configured with the old key follows the chain on join.
        late = Agent("late", tmp_path, ["--trust-key", f"{keys['ops']}.pub"])
        late.start(agents[0])
        cluster.agents.append(late)
        wait_for(lambda: held(late).get("web-access") == 1, 20, "the late agent")
        assert policies(late)["trust"]["version"] == 1
    finally:
        cluster.close()


def test_policy_cli_offline(tmp_path: Path, keys: dict[str, Path]) -> None:
    for kind in ("route", "resilience", "access", "fault", "ratelimit", "trust"):
        text = rumor("policy", "example", kind).stdout
        path = tmp_path / f"{kind}.toml"
        path.write_text(text)
        rumor("policy", "sign", str(path), "--key", f"{keys['ops']}.key", "--version", "7",
              "--out", str(tmp_path / f"{kind}.signed"))
        env = read_envelope_file((tmp_path / f"{kind}.signed").read_text())
        assert env.version == 7 and env.kind == kind
    ok = rumor("policy", "verify", str(tmp_path / "route.signed"), "--trust-key",
               f"{keys['ops']}.pub")
    assert ok.returncode == 0
    bad = rumor("policy", "verify", str(tmp_path / "route.signed"), "--trust-key",
                f"{keys['mallory']}.pub", check=False)
    assert bad.returncode == 1 and "REJECTED (untrusted)" in bad.stderr
    (tmp_path / "broken.toml").write_text('kind = "access"\nname = "x"\nversion = 1\n')
    res = rumor("policy", "sign", str(tmp_path / "broken.toml"), "--key",
                f"{keys['ops']}.key", "--out", str(tmp_path / "x.signed"), check=False)
    assert res.returncode == 1 and "broken.toml" in res.stderr and "destination" in res.stderr
    res = rumor("policy", "sign", str(tmp_path / "route.toml"), "--key",
                f"{keys['ops']}.pub", "--out", str(tmp_path / "x.signed"), check=False)
    assert res.returncode == 1 and "secret key" in res.stderr
    res = rumor("agent", "--trust-key", str(tmp_path / "nope.pub"), check=False)
    assert res.returncode == 2 and "nope.pub" in res.stderr
