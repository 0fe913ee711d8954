"""The request pipeline in process: real OutboundProxy/InboundProxy, fake mesh and
upstreams, virtual time. Retries, budget, breaker, ejection, stale connections and
every self-made answer's code, with no socket."""

from __future__ import annotations

import textwrap
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from rumor.policy.documents import CONNECT_FAILURE
from rumor.policy.evaluate import Evaluator
from rumor.policy.parser import parse_document
from rumor.proxy.attempts import STALE_CONNECTION, BudgetExhausted, Ejected, Retrying, StaleRetry
from rumor.proxy.mesh_view import LocalInstance

from .pipeline_fakes import (
    Behaviour,
    FakeMesh,
    FakePool,
    FakeRequest,
    Recorder,
    call,
    inbound,
    outbound,
)


def _doc(text: str) -> Any:
    return parse_document(textwrap.dedent(text), source="test")


def _resilience(body: str) -> Evaluator:
    return Evaluator([_doc('kind = "resilience"\nname = "web-res"\nversion = 1\n'
                           'service = "web"\n' + textwrap.dedent(body))])


def run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def _setup(ev: Evaluator | None = None, n: int = 3) -> tuple[FakeMesh, FakePool, Recorder, Any]:
    mesh, pool, rec = FakeMesh(), FakePool(), Recorder()
    mesh.add("web", n)
    evaluator = ev or Evaluator([])
    return mesh, pool, rec, outbound(mesh, pool, lambda: evaluator, observer=rec)


def test_a_request_is_observed_once_from_start_to_end() -> None:
    async def main() -> None:
        _, _pool, rec, proxy = _setup()
        status, _, _ = await call(proxy, FakeRequest())
        assert status == 200
        assert len(rec.started) == 1 and len(rec.ended) == 1
        x = rec.ended[0][0]
        assert (x.service, x.tries, x.status, x.code) == ("web", 1, 200, None)
        assert x.headers_at is not None and x.headers_at > x.started
        assert rec.tries == [(x.instance, "200")]
    run(main)


def test_a_503_is_retried_elsewhere_and_the_retry_is_reported() -> None:
    async def main() -> None:
        _mesh, pool, rec, proxy = _setup()
        pool.first = [Behaviour(status=503)]
        status, _, _ = await call(proxy, FakeRequest())
        assert status == 200
        assert [o for _, o in rec.tries] == ["503", "200"]
        assert rec.tries[0][0] != rec.tries[1][0]  # another instance
        assert any(isinstance(d, Retrying) for d in rec.decisions)
        assert rec.ended[0][0].tries == 2
    run(main)


def test_all_tries_failing_answers_with_the_last_failure_and_its_code() -> None:
    async def main() -> None:
        mesh, pool, rec, proxy = _setup()
        for e in mesh.services["web"]:
            pool.upstream(e.port).script = [Behaviour(fail=CONNECT_FAILURE)]
        status, hs, body = await call(proxy, FakeRequest())
        assert status == 503
        assert hs["x-rumor-error-code"] == "upstream_connect_failed"
        assert body["error"] == "upstream_connect_failed"
        assert body["agent"] == "test-agent" and body["service"] == "web"
        assert body["tries"] == 3  # the default policy: 3 attempts
        assert "refused" in body["message"]
        assert rec.ended[0][0].code == "upstream_connect_failed"
    run(main)


def test_the_breaker_is_held_until_the_response_is_over() -> None:
    async def main() -> None:
        ev = _resilience("[circuit_breaker]\nmax_requests = 1\nmax_pending = 10\n")
        _mesh, _pool, _rec, proxy = _setup(ev)
        first = await proxy(FakeRequest())  # a Forward: its response still streams
        status, hs, body = await call(proxy, FakeRequest())
        assert (status, hs["x-rumor-error-code"]) == (503, "breaker_open")
        assert body["policy"] == "resilience/web-res"
        assert first.on_done is not None
        first.on_done(10, True)  # the relay ends the first response
        status, _, _ = await call(proxy, FakeRequest())
        assert status == 200
        target = proxy._targets["web"]
        assert target.state.breaker.in_flight == 0
    run(main)


def test_consecutive_failures_eject_an_instance_and_traffic_avoids_it() -> None:
    async def main() -> None:
        ev = _resilience("[outlier_ejection]\nconsecutive_failures = 1\n"
                         'base_ejection_time = "30s"\n[retries]\nattempts = 1\n')
        mesh, pool, rec, proxy = _setup(ev)
        bad = mesh.services["web"][0]
        pool.upstream(bad.port).script = [Behaviour(status=502)]
        for _ in range(60):
            await call(proxy, FakeRequest())
        ejected = [d for d in rec.decisions if isinstance(d, Ejected)]
        assert [e.key for e in ejected] == [bad.key]
        before = pool.upstream(bad.port).tries
        for _ in range(60):
            await call(proxy, FakeRequest())
        assert pool.upstream(bad.port).tries == before  # out for 30 virtual seconds
    run(main)


def test_a_stale_pooled_connection_is_resent_on_a_new_one_and_counted() -> None:
    async def main() -> None:
        mesh, pool, rec, proxy = _setup(n=1)
        ep = mesh.services["web"][0]
        pool.idle.add(ep.port)
        pool.upstream(ep.port).script = [Behaviour(fail=STALE_CONNECTION), Behaviour()]
        status, _, _ = await call(proxy, FakeRequest())
        assert status == 200
        assert [o for _, o in rec.tries] == [STALE_CONNECTION, "200"]
        assert [type(d) for d in rec.decisions] == [StaleRetry]
    run(main)


def test_a_stale_connection_is_not_resent_without_retry_budget() -> None:
    async def main() -> None:
        ev = _resilience("[retries.budget]\nratio = 0.0\nmin_per_second = 0\n")
        mesh, pool, rec, proxy = _setup(ev, n=1)
        ep = mesh.services["web"][0]
        pool.idle.add(ep.port)
        pool.upstream(ep.port).script = [Behaviour(fail=STALE_CONNECTION)]
        status, hs, _ = await call(proxy, FakeRequest())
        assert (status, hs["x-rumor-error-code"]) == (502, "upstream_reset")
        assert any(isinstance(d, BudgetExhausted) for d in rec.decisions)
        assert pool.upstream(ep.port).tries == 1
    run(main)


def test_the_overall_timeout_ends_a_request_of_slow_tries() -> None:
    async def main() -> None:
        ev = _resilience('[timeouts]\nper_try = "1s"\noverall = "1500ms"\n')
        mesh, pool, _rec, proxy = _setup(ev)
        for e in mesh.services["web"]:
            pool.upstream(e.port).script = [Behaviour(delay=5.0)]
        t0 = trio.current_time()
        status, hs, _ = await call(proxy, FakeRequest())
        elapsed = trio.current_time() - t0
        assert status == 504
        assert hs["x-rumor-error-code"] in ("upstream_timeout", "overall_timeout")
        assert elapsed <= 1.5 + 1e-6
    run(main)


@pytest.mark.parametrize(("setup", "status", "code"), [
    ("unknown", 503, "unknown_service"),
    ("critical", 503, "no_healthy_instance"),
    ("loop", 508, "loop_detected"),
    ("bad", 400, "bad_target"),
])
def test_each_refusal_before_a_try_has_its_code(setup: str, status: int, code: str) -> None:
    async def main() -> None:
        mesh, pool, rec, proxy = _setup()
        req = FakeRequest(host=b"nothere")
        if setup == "critical":
            mesh.critical.add("nothere")
        elif setup == "loop":
            req = FakeRequest(headers=[(b"via", b"1.1 " + proxy.mark)])
        elif setup == "bad":
            req = FakeRequest(b"http://[::1", host=b"")
        got, hs, body = await call(proxy, req)
        assert (got, hs["x-rumor-error-code"], body["error"]) == (status, code, code)
        assert pool.order == []  # nothing was sent
        assert rec.ended[0][0].code == code
    run(main)


def test_inbound_serves_refuses_and_codes() -> None:
    async def main() -> None:
        mesh, pool, rec = FakeMesh(), FakePool(), Recorder()
        mesh.local["web"] = [LocalInstance("web-1", "127.0.0.1", 30001, 1)]
        ev = Evaluator([_doc('kind = "access"\nname = "web-acl"\nversion = 1\n'
                             'destination = "web"\ndefault = "deny"\nallow = ["good"]\n')])
        proxy = inbound(mesh, pool, lambda: ev, observer=rec)
        ok = FakeRequest(headers=[(b"x-rumor-source", b"good")])
        assert (await call(proxy, ok))[0] == 200
        status, hs, body = await call(proxy, FakeRequest(headers=[(b"x-rumor-source", b"bad")]))
        assert (status, hs["x-rumor-error-code"], body["policy"]) == (
            403, "access_denied", "access/web-acl")
        status, hs, _ = await call(proxy, FakeRequest(host=b"other"))
        assert (status, hs["x-rumor-error-code"]) == (404, "not_served_here")
        pool.upstream(30001).script = [Behaviour(fail=CONNECT_FAILURE)]
        status, hs, _ = await call(proxy, ok)
        assert (status, hs["x-rumor-error-code"]) == (503, "local_connect_failed")
        assert [x.code for x, _, _ in rec.ended] == [
            None, "access_denied", "not_served_here", "local_connect_failed"]
    run(main)


def test_weight_zero_drains_and_all_draining_says_so() -> None:
    async def main() -> None:
        mesh, pool, rec = FakeMesh(), FakePool(), Recorder()
        eps = mesh.add("web", 3, weights=[0, 1, 1])
        proxy = outbound(mesh, pool, lambda: Evaluator([]), observer=rec)
        for _ in range(200):
            assert (await call(proxy, FakeRequest()))[0] == 200
        assert pool.upstream(eps[0].port).tries == 0
        assert pool.upstream(eps[1].port).tries > 0 and pool.upstream(eps[2].port).tries > 0
        drained = FakeMesh()
        drained.add("web", 2, weights=[0, 0])
        proxy = outbound(drained, pool, lambda: Evaluator([]), observer=rec)
        status, hs, body = await call(proxy, FakeRequest())
        assert (status, hs["x-rumor-error-code"]) == (503, "instances_draining")
        assert "draining" in body["message"]
    run(main)


def test_a_callees_rate_limit_refusal_is_delivered_not_retried_nor_judged() -> None:
    async def main() -> None:
        mesh, pool, _rec, proxy = _setup(n=1)
        ep = mesh.services["web"][0]
        pool.upstream(ep.port).script = [Behaviour(status=429, delay=0.0001)]
        for _ in range(50):
            status, _, _ = await call(proxy, FakeRequest())
            assert status == 429
        assert pool.upstream(ep.port).tries == 50  # one try each: never retried
        snap = proxy._targets["web"].state.balancer.snapshot(trio.current_time())
        assert snap[ep.key]["outstanding"] == 0
        assert snap[ep.key]["observed"] is False  # no latency taken from a refusal
    run(main)
