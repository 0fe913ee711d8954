"""Integration: the shipped dashboard and rules against a real Prometheus and 3 agents.

a0 calls ``web`` (two instances, on a1 and a2), ``pay`` (one instance on a1 that answers
503) and a name nobody serves, through its outbound sidecar, all the time the tests run;
a fourth agent is killed with ``kill -9`` so the others list a failed member. Debian's
``prometheus`` runs the shipped ``docs/prometheus/prometheus.yml`` (intervals cut from
15 s to 1 s, targets the three agents' APIs) with ``rumor-rules.yml``, on 127.0.0.1 only,
and every expression of every panel of ``docs/grafana/rumor-mesh.json`` and every rule
must return a finite sample; both alerts must be pending or firing, for what they name.
``promtool`` checks the agents' ``/metrics``, the config and the rules, and runs the
rules' unit tests (``tests/prometheus/rumor-rules.test.yml``).
"""

from __future__ import annotations

import http.client
import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..agents import REPO, Agent, AgentCluster, wait_for
from ..backends import Backend
from ..ports import free_port

HOST = "127.0.0.1"
DASHBOARD = REPO / "docs" / "grafana" / "rumor-mesh.json"
PROM_DOCS = REPO / "docs" / "prometheus"
RULES_TEST = REPO / "tests" / "prometheus" / "rumor-rules.test.yml"

#: What Grafana substitutes in expressions, as the test does: a 1 s scrape makes
#: Grafana's $__rate_interval at least 4 s; 10 s holds 10 samples.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "1m"}


def _binary(name: str) -> str | None:
    """Debian's binary, else one on PATH."""
    debian = Path("/usr/bin") / name
    return str(debian) if debian.exists() else shutil.which(name)


PROMETHEUS, PROMTOOL = _binary("prometheus"), _binary("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus; "
    ".ci/run installs it with apt-get where it can)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="/usr/bin/prometheus or promtool is not "
    "installed (Debian package prometheus; .ci/run installs it with apt-get where it can)")


class Traffic(threading.Thread):
    """Requests through a0's outbound sidecar until stopped (or 120 s): ``web``, ``pay``
    and a service nobody serves, about 50 requests/s."""

    HOSTS = ("web", "web", "pay", "web", "nowhere")

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.statuses: dict[tuple[str, int], int] = {}
        self.errors = 0

    def run(self) -> None:
        deadline = time.monotonic() + 120
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set() and time.monotonic() < deadline:
            for host in self.HOSTS:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                    conn.request("GET", f"/{host}", headers={"host": host})
                    r = conn.getresponse()
                    r.read()
                    key = (host, r.status)
                    self.statuses[key] = self.statuses.get(key, 0) + 1
                    if r.getheader("connection", "").lower() == "close":
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException):
                    self.errors += 1
                    if conn is not None:
                        conn.close()
                    conn = None
            self.stop.wait(0.08)
        if conn is not None:
            conn.close()

    def count(self, host: str, status: int) -> int:
        return self.statuses.get((host, status), 0)


class Prometheus:
    """A Prometheus server on 127.0.0.1, asked over its HTTP API."""

    def __init__(self, tmp: Path, targets: list[Agent]) -> None:
        assert PROMETHEUS is not None
        config = _scrape_config(tmp, targets)
        self.port = free_port()
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address={HOST}:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://{HOST}:{self.port}{path}{query}",
                                    timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}: "
                                 f"{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _scrape_config(tmp: Path, targets: list[Agent]) -> Path:
    """The shipped prometheus.yml with 1 s intervals, beside the shipped rules and a
    targets file naming ``targets``' APIs."""
    text = (PROM_DOCS / "prometheus.yml").read_text()
    for key in ("scrape_interval", "evaluation_interval"):
        assert text.count(f"{key}: 15s") == 1, f"prometheus.yml: no single {key}: 15s"
        text = text.replace(f"{key}: 15s", f"{key}: 1s")
    config = tmp / "prometheus.yml"
    config.write_text(text)
    shutil.copy(PROM_DOCS / "rumor-rules.yml", tmp / "rumor-rules.yml")
    (tmp / "rumor-targets.json").write_text(json.dumps(
        [{"targets": [a.api], "labels": {"agent": a.name}} for a in targets]))
    return config


class Mesh:
    """The agents, their backends, the traffic, and (where installed) a Prometheus.

    Prometheus starts first, on the agents' API ports picked beforehand: it hands its
    first targets to the scrapers only after 5 s (the discovery manager's fixed update
    interval), time the agents spend starting anyway."""

    def __init__(self, tmp: Path) -> None:
        self.backends = {n: Backend(n) for n in ("web-1", "web-2", "pay-1")}
        self.backends["pay-1"].status = 503
        self.cluster = AgentCluster(tmp)
        out_port = free_port()
        b = self.backends
        specs = [
            ["--outbound", f"{HOST}:{out_port}", "--identity", "api"],
            ["--inbound", f"{HOST}:{free_port()}",
             "--service", f"name=web,id=web-1,port={b['web-1'].port}",
             "--service", f"name=pay,id=pay-1,port={b['pay-1'].port}"],
            ["--inbound", f"{HOST}:{free_port()}",
             "--service", f"name=web,id=web-2,port={b['web-2'].port}"],
            [],  # a3: killed, so that the others list a failed member
        ]
        agents = [Agent(f"a{i}", tmp, spec) for i, spec in enumerate(specs)]
        self.traffic = Traffic(out_port)
        self.prometheus: Prometheus | None = None
        try:
            if PROMETHEUS is not None and PROMTOOL is not None:
                prom_dir = tmp / "prometheus"
                prom_dir.mkdir()
                self.prometheus = Prometheus(prom_dir, agents[:3])
            for a in agents:
                a.start(agents[0] if self.cluster.agents else None)
                self.cluster.agents.append(a)
                if a is agents[0]:
                    wait_for(a.members, 20, "the seed's API")
            wait_for(lambda: self.cluster.converged(4), 30, "4 agents to converge")
            victim = agents[3]
            assert victim.proc is not None
            victim.proc.kill()
            victim.proc.wait(timeout=10)
            # Both services reachable from a0 before the traffic starts.
            wait_for(lambda: {"web", "pay"} <= set(agents[0].get("/v1/catalog/services")),
                     20, "web and pay in a0's catalog")
            self.traffic.start()
            wait_for(lambda: self.traffic.count("web", 200) >= 20
                     and self.traffic.count("pay", 503) >= 5, 20, "traffic through a0")
        except BaseException:
            self.close()
            raise

    @property
    def scraped(self) -> list[Agent]:
        """The agents Prometheus scrapes (the killed one is only a failed member)."""
        return self.cluster.agents[:3]

    def close(self) -> None:
        if self.prometheus is not None:
            self.prometheus.close()
        self.traffic.stop.set()
        if self.traffic.is_alive():
            self.traffic.join(timeout=10)
        self.cluster.close()
        for backend in self.backends.values():
            backend.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("prometheus-mesh"))
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def prometheus(mesh: Mesh) -> Prometheus:
    """The mesh's Prometheus, ready."""
    assert mesh.prometheus is not None
    wait_for(mesh.prometheus.ready, 20, "prometheus to be ready")
    return mesh.prometheus


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, timeout=60)


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]


def substitute(expr: str, service: str) -> str:
    """``expr`` as Grafana would send it with ``$service`` = ``service`` (a regex)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    expr = expr.replace("${service}", service).replace("$service", service)
    assert "$" not in expr, f"a variable the test does not know in {expr!r}"
    return expr


def _variable(dashboard: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in dashboard["templating"]["list"]
                                 if v["name"] == name)
    return found


def service_choices(dashboard: dict[str, Any], prometheus: Prometheus) -> list[str]:
    """What the ``service`` variable offers: its label_values() query, as Grafana sends
    it, filtered by its regex (``/.../``, a JavaScript regex that Python reads alike)."""
    var = _variable(dashboard, "service")
    m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["query"]["query"])
    assert m is not None, var["query"]
    values: list[str] = prometheus.get(f"/api/v1/label/{m.group(2)}/values",
                                       **{"match[]": m.group(1)})
    regex = var["regex"]
    if regex:
        assert regex.startswith("/") and regex.endswith("/"), regex
        values = [v for v in values if re.search(regex[1:-1], v)]
    return sorted(values)


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


# ---- the files alone ----------------------------------------------------------------------


def test_dashboard_is_a_grafana_10_dashboard_on_a_prometheus_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] == 39 and "Grafana 10.4" in dash["description"]
    assert {"type": "grafana", "id": "grafana", "name": "Grafana",
            "version": "10.4.0"} in dash["__requires"]
    assert dash["uid"] == "rumor-mesh" and dash["id"] is None
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    service = variables["service"]
    assert service["type"] == "query"
    assert service["query"]["query"] == "label_values(rumor_proxy_requests_total, service)"
    assert service["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    panels = list(_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Mesh overview", "Service $service: golden metrics", "Gossip health"]
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat"), p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
                p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    # Panels do not overlap.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


@needs_promtool
def test_promtool_accepts_the_shipped_config_and_rules_and_their_unit_tests() -> None:
    for args in (("check", "config", str(PROM_DOCS / "prometheus.yml")),
                 ("check", "rules", str(PROM_DOCS / "rumor-rules.yml")),
                 ("test", "rules", str(RULES_TEST))):
        res = _promtool(*args)
        out = (res.stdout + res.stderr).decode()
        assert res.returncode == 0, f"promtool {' '.join(args)}: {out}"
        assert "WARNING" not in out and "SUCCESS" in out, out


# ---- against the cluster ------------------------------------------------------------------


@needs_promtool
def test_agents_metrics_pass_promtool_check_metrics(mesh: Mesh) -> None:
    for agent in mesh.scraped:  # the caller's sidecar, and two callees'
        with urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=5) as r:
            body = r.read()
        assert b"rumor_proxy_request_duration_seconds_bucket" in body, agent.name
        res = _promtool("check", "metrics", stdin=body)
        out = (res.stdout + res.stderr).decode()
        assert res.returncode == 0 and out == "", f"{agent.name}: {out}"


@needs_prometheus
def test_every_dashboard_and_rule_expression_returns_data(mesh: Mesh,
                                                          prometheus: Prometheus) -> None:
    def targets_up() -> bool:
        active = prometheus.get("/api/v1/targets")["activeTargets"]
        return len(active) == 3 and all(t["health"] == "up" for t in active)
    wait_for(targets_up, 20, "prometheus to scrape the 3 agents")

    rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    found = re.search(rb"SUCCESS: (\d+) rules found",
                      _promtool("check", "rules", str(PROM_DOCS / "rumor-rules.yml")).stdout)
    assert found is not None and len(rules) == int(found.group(1)), "rules not all loaded"

    dash = json.loads(DASHBOARD.read_text())
    services = service_choices(dash, prometheus)
    assert services == ["pay", "web"], services
    all_value = _variable(dash, "service")["allValue"]
    exprs: dict[str, str] = {}  # query -> what it is, for the failure message
    for title, expr in dashboard_expressions(dash):
        if "$service" not in expr and "${service}" not in expr:
            exprs.setdefault(substitute(expr, ""), f"panel {title!r}")
            continue
        for service in [*services, all_value]:  # each service, and "All"
            exprs.setdefault(substitute(expr, service), f"panel {title!r} ($service={service})")
    for rule in rules:
        exprs[rule["query"]] = f"rule {rule.get('name')!r}"

    empty: dict[str, str] = dict(exprs)
    deadline = time.monotonic() + 40
    while empty and time.monotonic() < deadline:
        for expr in list(empty):
            if _finite(prometheus.query(expr)):
                del empty[expr]
        if empty:
            time.sleep(0.5)
    assert not empty, "no finite sample from:\n" + "\n".join(
        f"  {what}: {expr}" for expr, what in empty.items())

    rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    # The alerts fire for what they name: pay (every answer 503) and the killed member,
    # not web.
    def alerts() -> dict[tuple[str, str], str]:
        return {(a["labels"]["alertname"], a["labels"].get("service", "")): a["state"]
                for a in prometheus.get("/api/v1/alerts")["alerts"]}
    expected = {("RumorMemberFailed", ""), ("RumorServiceSuccessRatioLow", "pay")}
    # The alerts' group may be evaluated just before the recorded series they read.
    deadline = time.monotonic() + 5
    while alerts().keys() != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    states = alerts()
    assert states.keys() == expected, states
    assert set(states.values()) <= {"pending", "firing"}, states
    # And the traffic was what the panels show.
    assert mesh.traffic.count("web", 200) > 0 and mesh.traffic.count("pay", 503) > 0
