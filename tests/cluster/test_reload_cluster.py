"""Integration: live reload on a 3-agent cluster while traffic flows.

Each agent runs from a config file. While a client keeps sending requests through a0's
sidecar to ``web`` on a1, SIGHUP makes a1 announce a second service and every agent
trust a second publisher key: no request fails, no member is suspected or changes
incarnation except a1 for its new tag, and a policy signed by the new key is accepted
everywhere afterwards (refused before). A second reload drops the old key: the new
key's document stays and the old key is refused. A bad file changes nothing and says why; a
setting that cannot change live is reported.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time
from pathlib import Path
from typing import Any

from rumor.policy.envelope import make_payload, sign
from rumor.policy.examples import canary_route
from rumor.policy.keys import SecretKey

from ..agents import Agent, AgentCluster, rumor, wait_for
from ..backends import Backend
from ..ports import free_port
from .test_policy_cluster import put_envelope

HOST = "127.0.0.1"


class Traffic:
    """Requests through the caller's sidecar, one after another, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/", headers={"host": "web"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"status {r.status}")
            except (OSError, http.client.HTTPException) as e:
                self.failed.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _publish(a: Agent, key: SecretKey, version: int) -> tuple[int, dict[str, Any]]:
    # A route for a service nobody calls here: the traffic's path stays the same.
    text = canary_route("other", version=version)
    data = sign(make_payload("route", "other-canary", version, time.time(), None,
                             text.encode()), [key]).encode()
    return put_envelope(a, data)


def _route_version(a: Agent) -> int:
    docs = {d["name"]: d["version"] for d in a.get("/v1/policies")["documents"]}
    return int(docs.get("other-canary", 0))


def _config(path: Path, **extra: str) -> Path:
    lines = [f"{k} = {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sighup_adds_a_service_and_a_trust_key_without_dropping_anything(
        tmp_path: Path) -> None:
    old, new = SecretKey.generate(), SecretKey.generate()
    (tmp_path / "old.pub").write_text(old.public.line() + "\n")
    (tmp_path / "new.pub").write_text(new.public.line() + "\n")
    web, api = Backend("web"), Backend("api")
    out_port = free_port()
    trust_one = f'["{tmp_path / "old.pub"}"]'
    trust_two = f'["{tmp_path / "old.pub"}", "{tmp_path / "new.pub"}"]'
    files = [tmp_path / f"a{i}.toml" for i in range(3)]
    _config(files[0], trust_key=trust_one, outbound=f'"{HOST}:{out_port}"',
            identity='"client"')
    a1_base = (f'trust_key = {trust_one}\ninbound = "{HOST}:{free_port()}"\n'
               f'[[service]]\nname = "web"\nport = {web.port}\n')
    files[1].write_text(a1_base)
    _config(files[2], trust_key=trust_one)
    cluster = AgentCluster(tmp_path)
    traffic = None
    try:
        cluster.start(3, extra=lambda i: ["--config", str(files[i])])
        a0, _, a2 = cluster.agents
        wait_for(lambda: _serves(out_port), 20, "web through the sidecar")
        assert _publish(a0, new, 1)[0] == 422  # not trusted yet
        before = {a.name: a.members() for a in cluster.agents}
        traffic = Traffic(out_port)
        time.sleep(0.5)

        # a1 gets a second service and a tag; everyone trusts the new key.
        files[1].write_text(a1_base.replace("trust_key = " + trust_one,
                                            "trust_key = " + trust_two)
                            + f'\n[[service]]\nname = "api"\nport = {api.port}\n'
                            + '\n[tag]\nrack = "r2"\n')
        for i in (0, 2):
            text = files[i].read_text().replace(trust_one, trust_two)
            files[i].write_text(text)
        t0 = time.monotonic()
        for a in cluster.agents:
            a.signal(signal.SIGHUP)
        wait_for(lambda: all(_has_service(a, "api") for a in cluster.agents), 10,
                 "the new service on every agent")
        took = time.monotonic() - t0
        wait_for(lambda: all(a.members().get("a1", {}).get("tags", {}).get("rack") == "r2"
                             for a in cluster.agents), 10, "a1's new tag everywhere")
        code = 0
        deadline = time.monotonic() + 10
        while code != 200 and time.monotonic() < deadline:  # every SIGHUP handled
            code, body = _publish(a0, new, 2)
            time.sleep(0.1)
        assert code == 200, body
        wait_for(lambda: all(_route_version(a) == 2 for a in cluster.agents), 10,
                 "the new key's policy everywhere")
        time.sleep(0.5)
        traffic.stop()
        assert traffic.failed == []
        assert traffic.ok > 20
        assert took < 5
        after = {a.name: a.members() for a in cluster.agents}
        for name in before:
            for m, info in after[name].items():
                assert info["status"] == "alive", (name, m)
                bumped = info["incarnation"] != before[name][m]["incarnation"]
                assert not bumped or m == "a1", (name, m)  # a1: its new tag
        for a in cluster.agents:
            assert not [e for e in a.events() if e.get("status") in ("suspect", "failed")]
            assert "reload: trust applied" in a.log.read_text()

        # The rotation's second half: the old key goes; the new key's document stays,
        # and the old key can no longer publish.
        trust_new = f'["{tmp_path / "new.pub"}"]'
        for f in files:
            f.write_text(f.read_text().replace(trust_two, trust_new))
        for a in cluster.agents:
            res = rumor("reload", "--api", a.api)
            assert "applied: trust" in res.stdout
        assert all(_route_version(a) == 2 for a in cluster.agents)
        assert _publish(a0, old, 3)[0] == 422

        # A bad file changes nothing and says why; a setting that needs a restart is
        # reported, the rest still applied.
        files[2].write_text(files[2].read_text() + 'bnd = "x"\n')
        res = rumor("reload", "--api", a2.api, check=False)
        assert res.returncode == 1 and "unknown key 'bnd'" in res.stderr
        files[2].write_text(files[2].read_text().replace('bnd = "x"\n', "")
                            + 'balancer_decay = 3.0\nlog_level = "debug"\n')
        res = rumor("reload", "--api", a2.api)
        assert "applied: log_level" in res.stdout
        assert "not applied (needs a restart): balancer_decay" in res.stdout
        shown = rumor("config", "show", "--api", a2.api).stdout
        assert 'log_level = "debug"' in shown and "balancer_decay = 10.0" in shown
    finally:
        if traffic is not None:
            traffic.stop()
        cluster.close()
        web.close()
        api.close()


def _serves(port: int) -> bool:
    try:
        c = http.client.HTTPConnection(HOST, port, timeout=2)
        c.request("GET", "/", headers={"host": "web"})
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except OSError:
        return False


def _has_service(a: Agent, name: str) -> bool:
    try:
        return name in a.get("/v1/catalog/services")
    except OSError:
        return False
