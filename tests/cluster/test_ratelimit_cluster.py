"""Integration: the mesh-wide rate limit on real agents. Three agents serve ``web``
behind their inbound listeners (one of them also the caller); a ``ratelimit`` document
caps the service at R requests/s across the mesh. Each instance admits R·w/W of the live
weights, so the total admitted stays within R·(t + burst) as an instance joins and
leaves, and a refusal is a 429 with Retry-After that the caller's sidecar never retries."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from rumor.policy.envelope import make_payload, sign
from rumor.policy.keys import SecretKey

from ..agents import Agent, AgentCluster, wait_for
from ..backends import Backend
from ..ports import free_port

HOST = "127.0.0.1"
RATE = 60.0
BURST = 1.0
#: Seconds each phase drives the limit (long enough for 4 resizes of the shares).
PHASE = 4.0


def _publish(a: Agent, key: SecretKey, kind: str, name: str, body: str) -> None:
    text = f'kind = "{kind}"\nname = "{name}"\nversion = 1\n{body}'
    data = sign(make_payload(kind, name, 1, time.time(), None, text.encode()), [key]).encode()
    req = urllib.request.Request(f"http://{a.api}/v1/policies", data=data, method="PUT",
                                 headers={"content-type": "application/x-rumor-envelope"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read())["status"] == "accepted"


def _drive(port: int, rate: float, seconds: float) -> dict[int, int]:
    """Offer ``rate`` requests/s for ``seconds`` (paced, one connection): statuses."""
    c = http.client.HTTPConnection(HOST, port, timeout=5)
    out: dict[int, int] = {}
    start = time.monotonic()
    n = 0
    try:
        while True:
            due = start + n / rate
            now = time.monotonic()
            if due - start >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            c.request("GET", "/", headers={"host": "web"})
            r = c.getresponse()
            r.read()
            if r.status == 429:
                assert r.getheader("x-rumor-error-code") == "rate_limited"
                assert int(r.getheader("retry-after") or "0") >= 1
            out[r.status] = out.get(r.status, 0) + 1
            n += 1
    finally:
        c.close()
    return out


@pytest.mark.alone
def test_the_mesh_wide_limit_holds_as_an_instance_joins_and_leaves(tmp_path: Path) -> None:
    key = SecretKey.generate()
    pub = tmp_path / "ops.pub"
    pub.write_text(key.public.line() + "\n")
    backends = [Backend(f"b{i}") for i in range(3)]
    cluster = AgentCluster(tmp_path)
    out_port = free_port()
    try:
        def agent(i: int, extra: list[str]) -> Agent:
            return Agent(f"a{i}", tmp_path, [
                "--trust-key", str(pub), "--inbound", f"{HOST}:{free_port()}",
                "--service", f"name=web,id=web-{i},port={backends[i].port}", *extra])
        a0 = agent(0, ["--outbound", f"{HOST}:{out_port}", "--identity", "api"])
        a1 = agent(1, [])
        for a in (a0, a1):
            a.start(cluster.agents[0] if cluster.agents else None)
            cluster.agents.append(a)
            if a is a0:
                wait_for(a.members, 20, "the seed's API")
        wait_for(lambda: cluster.converged(2), 30, "two agents")
        # Round robin spreads the load evenly, so every instance is offered more than its
        # share and the mesh admits its full R (with uneven load it admits less).
        _publish(a0, key, "resilience", "web-res", 'service = "web"\n'
                 'balancer = "round_robin"\n[slow_start]\nwindow = "0s"\n')
        _publish(a0, key, "ratelimit", "web-rl", f'service = "web"\n'
                 f'requests_per_second = {RATE:g}\nburst = "{BURST:g}s"\n')
        wait_for(lambda: all(len(a.get("/v1/policies")["documents"]) == 2
                             for a in cluster.agents), 15, "both documents everywhere")
        wait_for(lambda: len(a0.get("/v1/catalog/service/web")) == 2, 15, "two instances")

        def phase(seconds: float) -> tuple[int, int]:
            got = _drive(out_port, 2.5 * RATE, seconds)
            assert set(got) <= {200, 429}, got
            return got.get(200, 0), got.get(429, 0)

        # Two instances, each admitting R/2.
        ok, refused = phase(PHASE)
        assert refused > 0
        assert 0.8 * RATE * PHASE <= ok <= RATE * (PHASE + BURST) + 5, ok
        # A third joins: every share shrinks to R/3 within a second; the total holds.
        a2 = agent(2, [])
        a2.start(a0)
        cluster.agents.append(a2)
        wait_for(lambda: len(a0.get("/v1/catalog/service/web")) == 3
                 and len(a2.get("/v1/policies")["documents"]) == 2, 20, "a third instance")
        time.sleep(1.0)
        ok, _ = phase(PHASE)
        assert 0.8 * RATE * PHASE <= ok <= RATE * (PHASE + BURST) + 5, ok
        # It leaves: the two left grow back to R/2 each.
        a2.signal(signal.SIGTERM)  # a graceful leave
        a2.wait_exit()
        wait_for(lambda: len(a0.get("/v1/catalog/service/web")) == 2
                 and len(a1.get("/v1/catalog/service/web")) == 2, 20, "the third gone")
        time.sleep(1.0)
        ok, _ = phase(PHASE)
        assert 0.8 * RATE * PHASE <= ok <= RATE * (PHASE + BURST) + 5, ok
        # Every 429 was the callee's own, answered once: no retry reached another instance.
        metrics = urllib.request.urlopen(f"http://{a0.api}/metrics", timeout=5).read().decode()
        assert 'rumor_proxy_rate_limited_total{limit="total",service="web"}' in metrics
        assert 'rumor_proxy_retries_total{service="web"}' not in metrics
    finally:
        cluster.close()
        for b in backends:
            b.close()
