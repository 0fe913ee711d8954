#!/usr/bin/env python3
"""A rumor sidecar pair as a proxy target of ../shared/anchors/proxy/bench.py.

The harness gives a listen address and the backends (environment ``BENCH_*``); this
starts, in the harness's process session:

- one *callee* agent per backend, each announcing the backend as an instance of
  ``BENCH_SERVICE`` behind its inbound listener (a host running the service);
- the *caller* agent, whose outbound listener is ``BENCH_LISTEN``, joined to them.

So every request takes the path of the mesh: load generator → caller's outbound →
a callee's inbound → backend. The caller only learns the instances through gossip
and picks among them with its own balancer (p2c over peak EWMA); nothing tells it
which backend is degraded. Agents gossip with the LAN profile. Exits (taking every
agent with it) on SIGTERM.

    python3 bench.py overhead --targets direct,haproxy,nginx,rumor --host-header bench \\
        --proxy-cmd 'rumor=/path/to/venv/bin/python /path/to/bench/proxy_pair.py'

Options (environment): ``RUMOR_PAIR_CALLEES=one`` puts every backend behind a single
callee agent instead of one each; ``RUMOR_PAIR_EXTRA`` adds agent flags to all;
``RUMOR_PAIR_TLS=1`` makes a cluster CA and certificates in the work folder and runs
the sidecar hop over mutual TLS (the caller's certificate names ``loadgen``, each
callee's the benchmarked service). ``RUMOR_PAIR_POLICY=a.toml,b.toml`` signs those
policy documents (``{service}`` in them becomes the benchmarked service, ``{expires}``
an hour from now; ``bench/policies/`` holds the ones of RESULTS.md) with a key made
in the work folder, which every agent trusts, and publishes them once all agents run;
``RUMOR_PAIR_BALANCER=round_robin`` (or any balancer) publishes a resilience document
choosing it. ``RUMOR_PAIR_TAP=1`` keeps a ``rumor tap`` of the benchmarked service
running against the caller's API (output discarded) for the whole run: every agent's
sidecar then holds an open tap session that every request is offered to; its polls
and the tap command's own CPU count in the pair's session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    listen = os.environ["BENCH_LISTEN"]
    service = os.environ.get("BENCH_SERVICE", "bench")
    work = Path(os.environ.get("BENCH_WORKDIR", "."))
    backends = json.loads(Path(os.environ["BENCH_BACKENDS_FILE"]).read_text())["backends"] \
        if os.environ.get("BENCH_BACKENDS_FILE") else [
            {"name": f"b{i + 1}", "addr": a}
            for i, a in enumerate(os.environ["BENCH_BACKENDS"].split(","))]
    extra = os.environ.get("RUMOR_PAIR_EXTRA", "").split()
    # The LAN profile, as deployed: the ``local`` one (5 probes and 20 gossip rounds a
    # second, for tests) costs the 2-core machine enough to add to the latency tail.
    rumor = [sys.executable, "-m", "rumor.cli", "agent", "--profile", "lan",
             "--log-level", "warning", *extra]
    groups = [backends] if os.environ.get("RUMOR_PAIR_CALLEES") == "one" \
        else [[b] for b in backends]
    tls: dict[str, list[str]] = {}
    if os.environ.get("RUMOR_PAIR_TLS"):
        from rumor.proxy.ca import init_ca, issue
        ca = work / "ca"
        if not (ca / "ca.key").exists():
            init_ca(ca, "bench")
        for node, svc in [("caller", "loadgen")] + [(f"callee{i}", service)
                                                     for i in range(len(groups))]:
            cert, key = issue(ca, node, [svc], 1, work / node)
            tls[node] = ["--tls-ca", str(ca / "ca.crt"), "--tls-cert", str(cert),
                         "--tls-key", str(key)]
    policies = _policy_texts(service)
    if policies:
        from rumor.policy.keys import SecretKey
        key = SecretKey.generate()
        (work / "ops.pub").write_text(key.public.line() + "\n")
        rumor += ["--trust-key", str(work / "ops.pub")]
    procs: list[subprocess.Popen[bytes]] = []
    apis: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    caller_port = free_port()
    apis.append(free_port())
    procs.append(subprocess.Popen(
        [*rumor, "--name", "caller", "--bind", f"127.0.0.1:{caller_port}",
         "--api", f"127.0.0.1:{apis[0]}", "--outbound", listen, *tls.get("caller", [])],
        stdout=open(work / "caller.log", "ab"), stderr=subprocess.STDOUT))  # noqa: SIM115
    time.sleep(0.5)
    for i, group in enumerate(groups):
        services = []
        for b in group:
            host, port = b["addr"].rsplit(":", 1)
            services += ["--service", f"name={service},id={b['name']},port={port},"
                         f"address={host}"]
        apis.append(free_port())
        procs.append(subprocess.Popen(
            [*rumor, "--name", f"callee{i}", "--bind", f"127.0.0.1:{free_port()}",
             "--api", f"127.0.0.1:{apis[-1]}", "--inbound", f"127.0.0.1:{free_port()}",
             "--join", f"127.0.0.1:{caller_port}", *services,
             *tls.get(f"callee{i}", [])],
            stdout=open(work / f"callee{i}.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT))
    if policies:
        _publish(policies, key, apis)
    # Where the agents' APIs are, for a script that asks them (caller first).
    (work / "apis.json").write_text(json.dumps([f"127.0.0.1:{p}" for p in apis]))
    tap: subprocess.Popen[bytes] | None = None
    while True:
        if os.environ.get("RUMOR_PAIR_TAP") and (tap is None or tap.poll() is not None):
            if tap is not None:
                procs.remove(tap)
            tap = subprocess.Popen(
                [sys.executable, "-m", "rumor.cli", "tap", service, "--api",
                 f"127.0.0.1:{apis[0]}", "--duration", "5m", "--max", "100000", "--json"],
                stdout=subprocess.DEVNULL, stderr=open(work / "tap.log", "ab"))  # noqa: SIM115
            procs.append(tap)
        for p in procs:
            if p.poll() is not None and p is not tap:
                print(f"proxy_pair: agent {p.args[5]} exited with {p.returncode}",  # type: ignore[index]
                      file=sys.stderr)
                stop(signal.SIGTERM, None)
        time.sleep(0.5)


RESILIENCE = """kind = "resilience"
name = "bench-balancer"
version = 1
service = "{service}"
balancer = "{balancer}"
"""


def _policy_texts(service: str) -> list[str]:
    texts = [Path(p).read_text() for p in os.environ.get("RUMOR_PAIR_POLICY", "").split(",")
             if p]
    balancer = os.environ.get("RUMOR_PAIR_BALANCER")
    if balancer:
        texts.append(RESILIENCE.replace("{balancer}", balancer))
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    return [t.replace("{service}", service).replace("{expires}", expires) for t in texts]


def _publish(texts: list[str], key: object, apis: list[int]) -> None:
    """Sign and publish ``texts`` through the caller; return once every agent holds
    them (or after 30 s, saying so)."""
    import urllib.request

    from rumor.policy.envelope import make_payload, sign
    from rumor.policy.keys import SecretKey
    from rumor.policy.parser import parse_document
    assert isinstance(key, SecretKey)
    deadline = time.monotonic() + 30
    names = {}
    for text in texts:
        doc = parse_document(text)
        names[doc.name] = doc.version
        data = sign(make_payload(doc.kind, doc.name, doc.version, time.time(), doc.expires,
                                 text.encode()), [key]).encode()
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{apis[0]}/v1/policies", data=data, method="PUT",
                    headers={"content-type": "application/x-rumor-envelope"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    print(f"proxy_pair: published {doc.kind} {doc.name}: "
                          f"{json.loads(r.read())['status']}", file=sys.stderr)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def held(api: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api}/v1/policies",
                                        timeout=2) as r:
                got = {d["name"]: d["version"] for d in json.loads(r.read())["documents"]}
        except OSError:
            return False
        return all(got.get(n) == v for n, v in names.items())

    while not all(held(a) for a in apis):
        if time.monotonic() > deadline:
            print("proxy_pair: not every agent holds the policies after 30 s",
                  file=sys.stderr)
            return
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
