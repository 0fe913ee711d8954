#!/usr/bin/env python3
"""How quickly the web UI (/ui/) shows the cluster, in headless Chromium.

* **failure**: ``--agents`` real agents on 127.0.0.1 (``--profile``, default lan), the
  page of agent 0 open; ``--rounds`` times: ``kill -9`` another agent (a different one
  each round), then poll, every 50 ms in one loop, agent 0's ``GET /v1/members`` (the
  agents' own detection: what ``rumor members`` prints) and the page's DOM, until both
  hold it failed; restart it under the same name and wait until the page shows it
  alive again. Prints per round the time from the kill to each, and their difference.
* **load**: ``--loads`` fresh navigations to /ui/ of agent 0 with those agents: from
  navigation start to DOM complete, and to the members table holding every member
  (the page's own ``data-rendered-ms``).
* **scale**: the page against an in-process API serving a synthetic 100 members, 50
  services of 3 instances and 60 edges: first render, then ``--rounds`` times a
  member's status flipped: the time until the page shows it, and what the update's
  render cost in the page (``data-render-ms``).

    python bench/ui_time.py --agents 30 --rounds 5 --loads 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rumor.cli.ports import free_port

HOST = "127.0.0.1"


@contextmanager
def chromium() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser = shutil.which("chromium") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise SystemExit("needs chromium and chromedriver (Debian: chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    d = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield d
    finally:
        d.quit()


def _count(d: Any, css: str) -> int:
    return int(d.execute_script(f"return document.querySelectorAll({css!r}).length"))


def _until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - t0


def _spread(xs: list[float], unit: str = "s", digits: int = 2) -> str:
    return (f"median {statistics.median(xs):.{digits}f} {unit} "
            f"(range {min(xs):.{digits}f}-{max(xs):.{digits}f}, n={len(xs)})")


# ---- real agents ------------------------------------------------------------------------------


class Agents:
    def __init__(self, n: int, profile: str, tmp: Path) -> None:
        self.profile, self.tmp = profile, tmp
        self.ports = [(free_port(), free_port()) for _ in range(n)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        for i in range(n):
            self.start(i)
            if i == 0:
                _until(lambda: self.members(0) is not None, 20, "agent 0's API")
        _until(lambda: self.alive(0) == n, 120, f"{n} agents to converge", 0.2)

    def api(self, i: int) -> str:
        return f"http://{HOST}:{self.ports[i][1]}"

    def start(self, i: int) -> None:
        cmd = [sys.executable, "-m", "rumor.cli.main", "agent", "--name", f"u{i}",
               "--bind", f"{HOST}:{self.ports[i][0]}", "--api", f"{HOST}:{self.ports[i][1]}",
               "--profile", self.profile]
        if i:
            cmd += ["--join", f"{HOST}:{self.ports[0][0]}"]
        with open(self.tmp / f"u{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL)

    def members(self, i: int) -> dict[str, str] | None:
        try:
            with urllib.request.urlopen(f"{self.api(i)}/v1/members", timeout=2) as r:
                return {m["name"]: m["status"] for m in json.load(r)}
        except OSError:
            return None

    def alive(self, i: int) -> int:
        return sum(s == "alive" for s in (self.members(i) or {}).values())

    def kill(self, i: int) -> None:
        p = self.procs[i]
        assert p is not None
        os.kill(p.pid, signal.SIGKILL)
        p.wait()

    def close(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def load_times(d: Any, agents: Agents, n: int, loads: int) -> None:
    complete, rendered = [], []
    for r in range(loads):
        d.get("about:blank")
        d.get(f"{agents.api(0)}/ui/")
        _until(lambda: _count(d, "tr[data-member]") == n, 30, "every member in the page", 0.01)
        timing = d.execute_script(
            "const t = performance.getEntriesByType('navigation')[0];"
            "return [t.domComplete, Number(document.body.dataset.renderedMs)];")
        complete.append(timing[0])
        rendered.append(timing[1])
        print(f"load {r}: DOM complete {timing[0]:.0f} ms, {n} members rendered "
              f"{timing[1]:.0f} ms after navigation start", flush=True)
    print(f"page load, {n} agents: DOM complete {_spread(complete, 'ms', 0)}; members "
          f"rendered {_spread(rendered, 'ms', 0)}")


def failure_rounds(d: Any, agents: Agents, n: int, rounds: int) -> None:
    api_s, page_s, lag, back = [], [], [], []
    for r in range(rounds):
        victim = 1 + (r * 7) % (n - 1)
        name = f"u{victim}"
        killed = time.monotonic()
        agents.kill(victim)
        seen: dict[str, float] = {}
        while len(seen) < 2:
            now = time.monotonic() - killed
            if now > 60:
                raise SystemExit(f"round {r}: {name} not failed after 60 s ({seen})")
            if "api" not in seen and (agents.members(0) or {}).get(name) == "failed":
                seen["api"] = now
            if "page" not in seen and _count(d, f"tr[data-member={name}][data-status=failed]"):
                seen["page"] = now
            time.sleep(0.05)
        api_s.append(seen["api"])
        page_s.append(seen["page"])
        lag.append(seen["page"] - seen["api"])
        agents.start(victim)
        back.append(_until(lambda name=name: _count(  # type: ignore[misc]
            d, f"tr[data-member={name}][data-status=alive]") == 1, 60,
            f"{name} alive again in the page"))
        print(f"failure {r} ({name}): failed in agent 0's API after {seen['api']:.2f} s, in "
              f"the page after {seen['page']:.2f} s (+{lag[-1]:.2f} s); restarted, alive in "
              f"the page after {back[-1]:.2f} s", flush=True)
        _until(lambda: agents.alive(0) == n, 60, "every agent alive again", 0.2)
        time.sleep(1.0)
    print(f"kill -9 to failed, {n} agents ({agents.profile}): agent 0's API "
          f"{_spread(api_s)}; the page {_spread(page_s)}; page minus API {_spread(lag)}")
    print(f"restart to alive in the page: {_spread(back)}")


# ---- a synthetic API for 100 members and 50 services ----------------------------------------


def scale(rounds: int, loads: int) -> None:
    import trio

    from rumor.gossip.catalog import CheckSummary, Instance
    from rumor.proxy.api.access import ApiAccess, guarded
    from rumor.proxy.api.router import Router
    from rumor.proxy.api.server import Request, Response, json_response, serve_http
    from rumor.proxy.api.ui import add_ui_routes

    members = [{"name": f"m{i:03d}", "addr": f"127.0.0.{i // 250 + 1}:{7000 + i}",
                "status": "alive", "incarnation": 1, "rtt_ms": 0.5 + i / 100, "since": 10.0,
                "tags": {"zone": f"z{i % 3}", "role": f"r{i % 7}"}, "key_id": None,
                "credential": None} for i in range(100)]
    services = [f"svc-{i:02d}" for i in range(50)]

    class Catalog:
        def services(self) -> dict[str, dict[str, Any]]:
            return {s: {"tags": ["blue"], "versions": ["v1"], "instances": 3, "passing": 3,
                        "warning": 0, "critical": 0} for s in services}

        def instances(self, name: str, **_: Any) -> list[Instance]:
            k = services.index(name)
            return [Instance(f"{name}-{j}", name, f"m{(k * 3 + j) % 100:03d}", "127.0.0.1",
                             8000 + j, ("blue",), "v1", 1, "passing",
                             (CheckSummary(f"{name}-{j}:http", "http", "passing"),), 0.001)
                    for j in range(3)]

        def local_services(self) -> list[dict[str, Any]]:
            return []

    class Policies:
        def held(self) -> list[Any]:
            return []

        def status(self) -> dict[str, Any]:
            return {"trust": {"version": 0, "threshold": 1, "keys": ["k"]},
                    "stats": {"rejected": {}}, "conflicts": [], "rejections": []}

    pairs = [(services[i % 40], services[10 + (i * 7) % 40]) for i in range(60)]
    edges: list[dict[str, Any]] = [
        {"listener": "outbound", "source": a, "secured": False, "service": b,
         "requests": 600, "successes": 598, "rps": 60.0, "p99_ms": 12.5}
        for a, b in pairs if a < b]  # layered, as a mesh is

    async def stat(request: Request) -> Response:
        return json_response({"by": "edge", "window": [0, time.time()], "seconds": 10,
                              "agents": ["m000"], "missing": [], "errors": {},
                              "rows": edges})

    async def stats(request: Request) -> Response:
        return json_response({"name": "stats", "missing": [], "expected": 100, "answers": {
            m["name"]: {"ok": True, "answer": {"health_score": 0}} for m in members}})

    router = Router()
    add_ui_routes(router, lambda: [dict(m) for m in members], Catalog(),  # type: ignore[arg-type]
                  Policies(), "m000")  # type: ignore[arg-type]
    router.add("GET", "/v1/stat", stat)
    router.add("GET", "/v1/query/{name}", stats)
    handler = guarded(router, ApiAccess())
    port: list[int] = []

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            port.append(await nursery.start(serve_http, handler, HOST, 0))

    threading.Thread(target=trio.run, args=(serve,), daemon=True).start()
    _until(lambda: bool(port), 10, "the synthetic API")
    with chromium() as d:
        rendered, first_cost = [], []
        for _ in range(loads):
            d.get("about:blank")
            d.get(f"http://{HOST}:{port[0]}/ui/")
            _until(lambda: _count(d, "tr[data-member]") == 100
                   and _count(d, "[data-instance]") == 150 and _count(d, "g.edge") > 0, 30,
                   "100 members, 150 instances and the edges", 0.01)
            # renderMs is the first render's cost until the next state arrives (10 s).
            got = d.execute_script("const b = document.body.dataset;"
                                   "return [Number(b.renderedMs), Number(b.renderMs)]")
            rendered.append(got[0])
            first_cost.append(got[1])
        n_edges = _count(d, "g.edge")
        shown, cost = [], []
        for r in range(rounds):
            m = members[(r * 37) % 100]
            to = "failed" if m["status"] == "alive" else "alive"
            m["status"] = to
            t0 = time.monotonic()
            css = f"tr[data-member={m['name']}][data-status={to}]"
            _until(lambda css=css: _count(d, css) == 1,  # type: ignore[misc]
                   10, "the change", 0.005)
            shown.append(time.monotonic() - t0)
            cost.append(float(d.execute_script("return document.body.dataset.renderMs")))
        print(f"scale: 100 members, 50 services (150 instances), {n_edges} edges: on "
              f"screen {_spread(rendered, 'ms', 0)} after navigation start, the first "
              f"render's cost {_spread(first_cost, 'ms', 1)}; a status change shown after "
              f"{_spread(shown)}, its render {_spread(cost, 'ms', 1)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=30)
    ap.add_argument("--profile", default="lan")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--no-scale", action="store_true")
    args = ap.parse_args()
    if args.agents:
        with tempfile.TemporaryDirectory() as tmp:
            agents = Agents(args.agents, args.profile, Path(tmp))
            try:
                time.sleep(3)  # let probes settle (RTTs, health scores)
                with chromium() as d:
                    load_times(d, agents, args.agents, args.loads)
                    failure_rounds(d, agents, args.agents, args.rounds)
            finally:
                agents.close()
    if not args.no_scale:
        scale(args.rounds * 2, args.loads)


if __name__ == "__main__":
    main()
