#!/usr/bin/env python3
"""Policy benchmark: envelope verification rate, and replication latency on loopback.

1. Verification cost on one core: envelopes of a realistic route document, signed by
   ``--signers`` keys, (a) decoded and signature-checked (``TrustSet.verify``), and
   (b) taken through the whole acceptance path (``PolicyStore.offer``: size, decode,
   signatures, TOML validation) into a fresh store. Target: ≥ 5,000/s.
2. Replication: ``--nodes`` real agents (``--profile``, LAN by default) trust one key;
   each trial publishes a new version through a random agent's API and reads, from
   every agent's JSON log, when it logged ``policy_accepted`` for that version. The
   figure is publish → last agent, as a distribution over ``--trials`` (p50, p95,
   p99, max, trials over 1 s). ``--loss 0.1`` drops 10% of all gossip packets, UDP
   and TCP, with nftables (``bench/netloss.py``).

    python bench/policy_bench.py                      # both parts, 30 agents
    python bench/policy_bench.py --skip-cluster --json
    python bench/policy_bench.py --trials 200 --loss 0.1 --json
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from figures import distribution  # bench/figures.py, beside this script
from netloss import Loss  # bench/netloss.py, beside this script

from rumor.cli.ports import free_port
from rumor.policy.envelope import decode_envelope, make_payload, sign
from rumor.policy.examples import EXAMPLES
from rumor.policy.keys import SecretKey, load_secret_key, write_keypair
from rumor.policy.store import PolicyStore
from rumor.policy.trust import TrustSet

HOST = "127.0.0.1"
#: How long a trial waits for every agent: beyond the 30 s push-pull period.
WATCH_LIMIT = 45.0


def bench_verify(signers: int, seconds: float) -> dict[str, float]:
    keys = [SecretKey.generate() for _ in range(signers)]
    body = EXAMPLES["route"].encode()
    data = sign(make_payload("route", "web-canary", 1, time.time(), None, body), keys).encode()
    trust = TrustSet.of([k.public for k in keys], signers)
    out: dict[str, float] = {"signers": signers, "envelope_bytes": len(data)}

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            assert trust.verify(decode_envelope(data)).ok
        n += 100
    out["verify_per_s"] = round(n / (time.perf_counter() - t0))

    now = time.time()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            assert PolicyStore(trust).offer(now, data).accepted
        n += 100
    out["accept_per_s"] = round(n / (time.perf_counter() - t0))
    return out


class Agent:
    def __init__(self, i: int, workdir: Path, profile: str, pub: Path) -> None:
        self.name = f"n{i:02d}"
        self.port, self.api_port = free_port(), free_port()
        self.profile, self.pub = profile, pub
        self.log = workdir / f"{self.name}.log"
        self.log_offset = 0
        self.accepted: dict[int, float] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, seed: Agent | None, extra: list[str]) -> None:
        argv = [sys.executable, "-m", "rumor.cli", "agent", "--name", self.name,
                "--bind", f"{HOST}:{self.port}", "--api", f"{HOST}:{self.api_port}",
                "--profile", self.profile, "--log-format", "json",
                "--trust-key", str(self.pub), *extra]
        if seed is not None:
            argv += ["--join", f"{HOST}:{seed.port}"]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{HOST}:{self.api_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def put(self, path: str, data: bytes) -> Any:
        req = urllib.request.Request(f"http://{HOST}:{self.api_port}{path}", data=data,
                                     method="PUT",
                                     headers={"content-type": "application/x-rumor-envelope"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def accepted_at(self, version: int) -> float | None:
        """When this agent logged ``policy_accepted`` for ``version`` of the bench
        document (the log is read on from where the last call stopped)."""
        if version not in self.accepted:
            with open(self.log, "rb") as f:
                f.seek(self.log_offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # a partly written last line waits
            self.log_offset += end
            for line in chunk[:end].splitlines():
                if b'"policy_accepted"' in line:
                    ev = json.loads(line)
                    if ev.get("policy") == "bench":
                        self.accepted.setdefault(int(ev["version"]), datetime.fromisoformat(
                            ev["ts"].replace("Z", "+00:00")).timestamp())
        return self.accepted.get(version)


def wait_for(cond: Any, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _alive(a: Agent) -> int:
    try:
        return sum(1 for m in a.get("/v1/members") if m["status"] == "alive")
    except OSError:
        return 0


def bench_cluster(nodes: int, trials: int, profile: str, seed: int, loss: float,
                  tune: list[str]) -> dict[str, Any]:
    rng = random.Random(seed)
    extra = [x for t in tune for x in ("--tune", t)]
    with tempfile.TemporaryDirectory(prefix="rumor-policy-bench-") as tmp:
        work = Path(tmp)
        secret, public, _ = write_keypair(work / "ops")
        key = load_secret_key(secret)
        agents = [Agent(i, work, profile, public) for i in range(nodes)]
        dropping: Loss | None = None
        try:
            for i, a in enumerate(agents):
                a.start(agents[0] if i else None, extra)
                if i == 0:
                    wait_for(lambda: _alive(agents[0]) == 1, 20, "the seed")
            wait_for(lambda: all(_alive(a) == nodes for a in agents), 120, "convergence")
            if loss:
                dropping = Loss(loss, [a.port for a in agents])
            times: list[float] = []
            for v in range(1, trials + 1):
                body = (f'kind = "access"\nname = "bench"\nversion = {v}\n'
                        f'destination = "web"\ndefault = "allow"\n').encode()
                data = sign(make_payload("access", "bench", v, time.time(), None, body),
                            [key]).encode()
                via = rng.choice(agents)
                t0 = time.time()
                via.put("/v1/policies", data)
                try:
                    wait_for(lambda v=v: all(a.accepted_at(v) is not None for a in agents),
                             WATCH_LIMIT, f"version {v} everywhere")
                    last = max(a.accepted_at(v) or 0.0 for a in agents)
                    took = max(0.0, last - t0)
                except SystemExit:  # counted as the watch limit: a lower bound
                    took = WATCH_LIMIT
                times.append(took)
                print(f"   version {v}: on all {nodes} after {took * 1000:.0f} ms",
                      file=sys.stderr, flush=True)
                time.sleep(0.5)
        finally:
            if dropping is not None:
                dropping.close()
            for a in agents:
                if a.proc is not None and a.proc.poll() is None:
                    a.proc.send_signal(signal.SIGTERM)
            for a in agents:
                if a.proc is not None:
                    try:
                        a.proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        a.proc.kill()
    return {"nodes": nodes, "profile": profile, "trials": trials, "loss": loss,
            "tune": tune,
            "publish_to_all_s": distribution(times),
            "all_s": [round(t, 3) for t in times]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--profile", default="lan", choices=["lan", "wan", "local"])
    ap.add_argument("--signers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0, help="per verification figure")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--loss", type=float, default=0.0,
                    help="drop this fraction of all gossip packets, UDP and TCP (nftables; root)")
    ap.add_argument("--tune", action="append", default=[], metavar="NAME=VALUE",
                    help="passed to every agent (rumor agent --tune)")
    ap.add_argument("--skip-cluster", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report: dict[str, Any] = {"verify": bench_verify(args.signers, args.seconds)}
    if not args.json:
        v = report["verify"]
        print(f"verification ({v['signers']} signer(s), {v['envelope_bytes']} B envelope): "
              f"{v['verify_per_s']:,}/s signature checks, {v['accept_per_s']:,}/s full "
              "acceptance path (target ≥ 5,000/s)", flush=True)
    if not args.skip_cluster:
        report["cluster"] = bench_cluster(args.nodes, args.trials, args.profile, args.seed,
                                          args.loss, args.tune)
        if not args.json:
            c = report["cluster"]
            d = c["publish_to_all_s"]
            print(f"replication, {c['nodes']} agents ({c['profile']}, loss {c['loss']}): "
                  f"publish -> all agents p50 {d['p50']} s, p95 {d['p95']} s, p99 "
                  f"{d['p99']} s, max {d['max']} s, {d['over_1s']} of {d['n']} over 1 s")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
