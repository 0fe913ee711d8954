#!/usr/bin/env python3
"""Live reload on real agents: from SIGHUP to the new configuration everywhere.

``--nodes`` agents on 127.0.0.1 (LAN profile by default), each running from its own
config file. Every round rewrites every file (a new tag ``round = R`` and the agent's
service ``bench`` at version ``rR``) and sends SIGHUP to every agent, then polls every
agent's API until it lists every member with the new tag and every ``bench`` instance
at the new version. Figures per round: SIGHUP → the last agent's reload logged (local
apply), → every agent sees every tag, → every agent sees every service change.

    python bench/reload_bench.py                       # 10 agents, 20 rounds
    python bench/reload_bench.py --nodes 30 --rounds 30 --json
"""

from __future__ import annotations

import argparse
import json
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

from rumor.cli.ports import free_port

HOST = "127.0.0.1"


class Agent:
    def __init__(self, i: int, workdir: Path) -> None:
        self.name = f"n{i:02d}"
        self.port, self.api_port = free_port(), free_port()
        self.config = workdir / f"{self.name}.toml"
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, rnd: int, seed: Agent | None) -> None:
        join = f'join = ["{HOST}:{seed.port}"]\n' if seed is not None else ""
        self.config.write_text(
            f'name = "{self.name}"\nbind = "{HOST}:{self.port}"\n'
            f'api = "{HOST}:{self.api_port}"\nlog_format = "json"\n{join}'
            f'[tag]\nround = "{rnd}"\n'
            f'[[service]]\nname = "bench"\nid = "bench-{self.name}"\nport = 9000\n'
            f'version = "r{rnd}"\n')

    def start(self, profile: str) -> None:
        argv = [sys.executable, "-m", "rumor.cli", "agent", "--config", str(self.config),
                "--profile", profile]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{HOST}:{self.api_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def sees_tags(self, rnd: int, n: int) -> bool:
        ms = [m for m in self.get("/v1/members") if m["status"] == "alive"]
        return len(ms) == n and all(m["tags"].get("round") == str(rnd) for m in ms)

    def sees_services(self, rnd: int, n: int) -> bool:
        rows = self.get("/v1/catalog/service/bench?critical=1")
        return len(rows) == n and all(r["version"] == f"r{rnd}" for r in rows)

    def reloads_logged(self) -> list[float]:
        """Wall times of this agent's reload_applied lines, one per reload."""
        out: dict[str, float] = {}
        for line in self.log.read_text().splitlines():
            if '"reload_applied"' in line:
                ev = json.loads(line)
                out.setdefault(ev["ts"], datetime.fromisoformat(
                    ev["ts"].replace("Z", "+00:00")).timestamp())
        return sorted(out.values())


def wait_for(cond: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def run(nodes: int, rounds: int, profile: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rumor-reload-bench-") as tmp:
        work = Path(tmp)
        agents = [Agent(i, work) for i in range(nodes)]
        try:
            for i, a in enumerate(agents):
                a.write(0, agents[0] if i else None)
                a.start(profile)
                if i == 0:
                    wait_for(lambda: agents[0].get("/v1/members"), 20, "the seed")
            wait_for(lambda: all(a.sees_tags(0, nodes) and a.sees_services(0, nodes)
                                 for a in agents), 120, "convergence")
            rows = []
            for rnd in range(1, rounds + 1):
                for i, a in enumerate(agents):
                    a.write(rnd, agents[0] if i else None)
                t0_wall, t0 = time.time(), time.monotonic()
                for a in agents:
                    assert a.proc is not None
                    a.proc.send_signal(signal.SIGHUP)
                pending_tags, pending_svc = set(agents), set(agents)
                tags_at = svc_at = None
                while tags_at is None or svc_at is None:
                    for a in list(pending_tags):
                        if a.sees_tags(rnd, nodes):
                            pending_tags.discard(a)
                    for a in list(pending_svc):
                        if a.sees_services(rnd, nodes):
                            pending_svc.discard(a)
                    now = time.monotonic() - t0
                    if tags_at is None and not pending_tags:
                        tags_at = now
                    if svc_at is None and not pending_svc:
                        svc_at = now
                    if now > 60:
                        raise SystemExit(f"round {rnd}: not applied everywhere in 60 s")
                    time.sleep(0.005)
                local = max(min(t for t in a.reloads_logged() if t >= t0_wall - 0.05)
                            - t0_wall for a in agents)
                rows.append({"round": rnd, "local_apply_last_s": round(local, 4),
                             "tags_everywhere_s": round(tags_at, 4),
                             "services_everywhere_s": round(svc_at, 4)})
                time.sleep(1.0)
        finally:
            for a in agents:
                if a.proc is not None:
                    a.proc.kill()
                    a.proc.wait()
    return {"nodes": nodes, "profile": profile, "rounds": rows,
            "summary": {k: distribution([r[k] for r in rows])
                        for k in ("local_apply_last_s", "tags_everywhere_s",
                                  "services_everywhere_s")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--profile", default="lan")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.nodes, args.rounds, args.profile)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"SIGHUP on {args.nodes} agents ({args.profile}), {args.rounds} rounds:")
    for k, d in res["summary"].items():
        print(f"  {k}: {d}")


if __name__ == "__main__":
    main()
