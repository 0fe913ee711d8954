"""Integration: spans from two real sidecars reach an OTLP/HTTP receiver as one trace.

a0 calls ``web`` through its outbound listener (as ``api``), a1 serves it. The receiver
(``rumor.cli.span_sink``) decodes each export with the official OTLP messages.
Every request must give a client span on a0 and a server span on a1 whose parent is
the client span, and the backend must see the server span as its parent. Then the
receiver stops: requests must go on as fast, and the drop counter must rise.
"""

from __future__ import annotations

import http.client
import signal
import statistics
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rumor.cli.span_sink import SpanSink

from ..agents import Agent, AgentCluster, wait_for
from ..backends import Backend
from ..ports import free_port

pytestmark = pytest.mark.cluster
HOST = "127.0.0.1"
QUEUE = 50


class Traced:
    def __init__(self, tmp: Path) -> None:
        self.receiver = SpanSink()
        self.backend = Backend("b1")
        self.cluster = AgentCluster(tmp)
        self.out_port = free_port()
        otlp = ["--otlp", self.receiver.url]
        # A small queue and a fast schedule, so the test sees drops and exports quickly.
        env = {"OTEL_BSP_MAX_QUEUE_SIZE": str(QUEUE), "OTEL_BSP_SCHEDULE_DELAY": "200",
               "OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}
        specs = [["--outbound", f"{HOST}:{self.out_port}", "--identity", "api", *otlp],
                 ["--inbound", f"{HOST}:{free_port()}", *otlp,
                  "--service", f"name=web,id=web-1,port={self.backend.port}"]]
        for i, extra in enumerate(specs):
            a = Agent(f"a{i}", tmp, extra, env=env)
            a.start(self.cluster.agents[0] if self.cluster.agents else None)
            self.cluster.agents.append(a)
            if i == 0:
                wait_for(a.members, 20, "the seed's API")
        wait_for(lambda: self.cluster.converged(2), 30, "2 agents to converge")
        wait_for(lambda: self.send(1)[0] == 1, 20, "web through the sidecars")

    def send(self, n: int, headers: dict[str, str] | None = None) -> tuple[int, list[float]]:
        """n GETs through a0's outbound listener: how many got a 200, and each one's time."""
        ok, took = 0, []
        c = http.client.HTTPConnection(HOST, self.out_port, timeout=10)
        try:
            for i in range(n):
                t = time.perf_counter()
                c.request("GET", f"/t/{i}?q=secret", headers={"host": "web", **(headers or {})})
                r = c.getresponse()
                r.read()
                took.append(time.perf_counter() - t)
                ok += r.status == 200
        finally:
            c.close()
        return ok, took

    def dropped(self, agent: Agent) -> float:
        with urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('rumor_trace_spans_dropped_total{reason="queue_full"}'))

    def close(self) -> None:
        self.cluster.close()
        self.backend.close()
        self.receiver.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    t = Traced(tmp_path_factory.mktemp("tracing"))
    try:
        yield t
    finally:
        t.close()


def test_two_sidecars_spans_join_into_one_trace(traced: Traced) -> None:
    app_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert traced.send(1, {"traceparent": app_parent})[0] == 1
    trace = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")

    def both() -> list[tuple[str, Any]]:
        got = traced.receiver.of_trace(trace)
        return got if len(got) == 2 else []
    wait_for(both, 10, "the client and the server span")
    spans = dict(both())
    client, server = spans["api"], spans["web"]
    assert client.kind == client.SPAN_KIND_CLIENT and server.kind == server.SPAN_KIND_SERVER
    assert client.parent_span_id.hex() == "b7ad6b7169203331"  # the application's span
    assert server.parent_span_id == client.span_id
    seen = traced.backend.last_headers["traceparent"]
    assert seen.split("-")[2] == server.span_id.hex()  # the backend's parent: the server span
    # The server span lies within the client span (one host's clock, read by two
    # processes: a millisecond of slack for their conversions to Unix time).
    slack = 1_000_000
    assert client.start_time_unix_nano <= server.start_time_unix_nano + slack
    assert server.end_time_unix_nano <= client.end_time_unix_nano + slack
    assert abs(client.start_time_unix_nano / 1e9 - time.time()) < 60
    attrs = {a.key: a.value for a in client.attributes}
    assert attrs["http.request.method"].string_value == "GET"
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["peer.service"].string_value == "web"
    assert attrs["rumor.instance"].string_value == "a1/web-1"
    assert attrs["rumor.tries"].int_value == 1
    assert attrs["url.path"].string_value == "/t/0"  # never the query string
    server_attrs = {a.key: a.value for a in server.attributes}
    assert server_attrs["peer.service"].string_value == "api"
    assert traced.receiver.content_types == {"application/x-protobuf"}


def test_an_unsampled_trace_exports_nothing_and_stays_unsampled(traced: Traced) -> None:
    parent = "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert traced.send(1, {"traceparent": parent})[0] == 1
    assert traced.backend.last_headers["traceparent"].endswith("-00")
    marker = traced.send(1, {"traceparent": parent[:-2] + "01"})  # a sampled one after it
    assert marker[0] == 1
    trace = bytes.fromhex("1af7651916cd43dd8448eb211c80319c")

    def exported() -> int:
        return len(traced.receiver.of_trace(trace))
    wait_for(lambda: exported() == 2, 10, "the sampled request's spans")
    time.sleep(0.5)  # one more schedule: the unsampled spans must not come late
    assert exported() == 2


def test_an_agent_that_stops_exports_what_it_still_held(traced: Traced, tmp_path: Path) -> None:
    # A caller whose exporter would wait a minute: its spans go out only as it stops.
    port = free_port()
    a = Agent("late", tmp_path, ["--outbound", f"{HOST}:{port}", "--identity", "batch",
                                 "--otlp", traced.receiver.url],
              env={"OTEL_BSP_SCHEDULE_DELAY": "60000"})
    a.start(traced.cluster.agents[0])
    try:
        def web_known() -> bool:
            try:
                return len(a.get("/v1/catalog/service/web")) == 1
            except OSError:
                return False
        wait_for(web_known, 20, "web on the late agent")
        trace = "2af7651916cd43dd8448eb211c80319c"
        c = http.client.HTTPConnection(HOST, port, timeout=10)
        for _ in range(3):
            c.request("GET", "/late", headers={"host": "web", "traceparent":
                                                f"00-{trace}-b7ad6b7169203331-01"})
            r = c.getresponse()
            r.read()
            assert r.status == 200
        c.close()
        time.sleep(0.3)
        assert not [s for svc, s in traced.receiver.of_trace(bytes.fromhex(trace))
                    if svc == "batch"]  # still queued
        a.signal(signal.SIGTERM)
        assert a.wait_exit(15) == 0
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
    assert len([s for svc, s in traced.receiver.of_trace(bytes.fromhex(trace))
                if svc == "batch"]) == 3


@pytest.mark.alone
def test_a_collector_down_drops_and_counts_but_slows_no_request(traced: Traced) -> None:
    ok, before = traced.send(200)
    assert ok == 200
    traced.receiver.stop()
    a0 = traced.cluster.agents[0]
    dropped0 = traced.dropped(a0)
    ok, during = traced.send(200 + 4 * QUEUE)
    assert ok == len(during)
    wait_for(lambda: traced.dropped(a0) > dropped0 + QUEUE, 10, "the drop counter to rise")
    # No request waits for the exporter: the medians agree within noise, and no request
    # took anything like the export timeout (2 s here).
    assert statistics.median(during) < 3 * statistics.median(before) + 0.005
    assert max(during) < 1.0

