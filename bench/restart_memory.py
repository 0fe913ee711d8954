#!/usr/bin/env python3
"""Restart memory: how long an agent restarted with its snapshot takes to list every
member again.

Starts ``--nodes`` agents on 127.0.0.1, each with its own ``--data-dir``, all joining
the first, and waits until every one lists them all alive. Then, ``--restarts`` times,
one agent (each time the next, never the first) is killed with SIGKILL once its
snapshot lists every other member, and started again with the same name, address and
data directory after ``--down`` seconds, with no ``--join``: it must rejoin through its
snapshot. Measured from the restart's ``exec``: when its API first answers and when it
lists all ``--nodes`` members alive. For comparison, the same restart with ``--join``
to the first agent (what an operator without restart memory configures) alternates
with it unless ``--no-baseline``.

Prints one JSON line per restart, then the median and range of each figure.

    .venv/bin/python bench/restart_memory.py --nodes 10 --restarts 7
    .venv/bin/python bench/restart_memory.py --profile local --down 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port(taken: set[int]) -> int:
    """A port free for both UDP and TCP, not handed out before in this run."""
    while True:
        with socket.socket() as t:
            t.bind((HOST, 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((HOST, port))
                except OSError:
                    continue
        if port not in taken:
            taken.add(port)
            return port


class Agent:
    def __init__(self, name: str, work: Path, profile: str, taken: set[int]) -> None:
        self.name = name
        self.port, self.api = free_port(taken), free_port(taken)
        self.data = work / f"data-{name}"
        self.log = work / f"{name}.log"
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, join: str | None = None) -> float:
        argv = [sys.executable, "-m", "rumor.cli", "agent", "--name", self.name,
                "--bind", f"{HOST}:{self.port}", "--api", f"{HOST}:{self.api}",
                "--profile", self.profile, "--log-format", "json",
                "--data-dir", str(self.data)]
        if join:
            argv += ["--join", join]
        with open(self.log, "ab") as f:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        return t0

    def members(self) -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.api}/v1/members",
                                        timeout=1) as r:
                out: list[dict[str, Any]] = json.loads(r.read())
                return out
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def alive(self) -> int:
        ms = self.members() or []
        return sum(1 for m in ms if m["status"] == "alive")

    def remembered(self) -> int:
        try:
            return len(json.loads((self.data / "members.json").read_text())["members"])
        except (OSError, ValueError, KeyError):
            return 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def wait_for(cond: Any, timeout: float, what: str, step: float = 0.01) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
    return time.monotonic()


def restart(victim: Agent, n: int, join: str | None, down: float) -> dict[str, float]:
    wait_for(lambda: victim.remembered() == n - 1, 30, f"{victim.name}'s snapshot")
    victim.kill()
    time.sleep(down)
    t0 = victim.start(join)
    t_api = wait_for(lambda: victim.members() is not None, 30, "the API")
    t_all = wait_for(lambda: victim.alive() == n, 60, f"{victim.name} to list {n} members")
    return {"api_s": round(t_api - t0, 3), "all_members_s": round(t_all - t0, 3),
            "after_api_s": round(t_all - t_api, 3)}


def summary(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    mine = [r for r in rows if r["mode"] == mode]
    out: dict[str, Any] = {"mode": mode, "restarts": len(mine)}
    for key in ("api_s", "all_members_s", "after_api_s"):
        vals = [r[key] for r in mine]
        out[key] = {"median": round(statistics.median(vals), 3),
                    "min": min(vals), "max": max(vals)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--restarts", type=int, default=5, help="of each mode (default 5)")
    p.add_argument("--profile", default="lan", choices=["lan", "wan", "local"])
    p.add_argument("--down", type=float, default=0.0,
                   help="seconds between the kill and the restart (default 0)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the --join restarts")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.nodes < 2 or args.restarts < 1:
        p.error("need --nodes >= 2 and --restarts >= 1")

    work = Path(tempfile.mkdtemp(prefix="rumor-restart-"))
    taken: set[int] = set()
    agents = [Agent(f"n{i}", work, args.profile, taken) for i in range(args.nodes)]
    seed = f"{HOST}:{agents[0].port}"
    rows: list[dict[str, Any]] = []
    try:
        for i, a in enumerate(agents):
            a.start(None if i == 0 else seed)
            if i == 0:
                wait_for(lambda: agents[0].members() is not None, 30, "the seed's API")
        wait_for(lambda: all(a.alive() == args.nodes for a in agents), 60, "convergence",
                 step=0.1)
        modes = ["snapshot"] if args.no_baseline else ["snapshot", "join"]
        k = 0
        for r in range(args.restarts):
            for mode in modes:
                victim = agents[1 + k % (args.nodes - 1)]
                k += 1
                res = restart(victim, args.nodes, seed if mode == "join" else None,
                              args.down)
                row = {"round": r, "mode": mode, "victim": victim.name, **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
                # Let the cluster settle (the restarted agent's refutation spreads).
                wait_for(lambda: all(a.alive() == args.nodes for a in agents), 60,
                         "the cluster to settle", step=0.1)
        print(json.dumps({"nodes": args.nodes, "profile": args.profile,
                          "down_s": args.down}))
        for mode in modes:
            print(json.dumps(summary(rows, mode)))
    finally:
        for a in agents:
            with contextlib.suppress(Exception):
                a.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory: {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
