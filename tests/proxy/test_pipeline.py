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


# ---- faults -----------------------------------------------------------------------------

FAULT = '''kind = "fault"
name = "web-fault"
version = 1
expires = 2030-01-01T00:00:00Z
service = "web"
'''


def _faults(rules: str, extra: str = "") -> Evaluator:
    return Evaluator([_doc(FAULT + textwrap.dedent(rules)), *(
        [_doc(extra)] if extra else [])])


def test_fault_aborts_hit_their_share_and_never_reach_an_instance() -> None:
    async def main() -> None:
        ev = _faults('[[rule]]\nname = "half"\nabort = { status = 503, percent = 30.0 }\n')
        _mesh, pool, rec, proxy = _setup(ev)
        n, aborted = 2000, 0
        for _ in range(n):
            status, hs, body = await call(proxy, FakeRequest())
            if hs.get("x-rumor-error-code") == "fault_abort":
                aborted += 1
                assert status == 503 and body["policy"] == "fault/web-fault"
        # Binomial(2000, 0.3): sd 20.5; 4 sd either side.
        assert abs(aborted - 0.3 * n) < 4 * (n * 0.3 * 0.7) ** 0.5
        assert sum(u.tries for u in pool.upstreams.values()) == n - aborted
        state = proxy._targets["web"].state
        assert state.budget.retries == 0 and state.outliers.ejections == 0
        assert state.breaker.in_flight == 0 and state.breaker.rejected == 0
        assert not any(isinstance(d, Retrying) for d in rec.decisions)
    run(main)


def test_faults_apply_by_source_and_by_header_only() -> None:
    async def main() -> None:
        ev = _faults('''
            [[rule]]
            name = "by-header"
            headers = [{ name = "x-chaos", exact = "1" }]
            abort = { status = 500, percent = 50.0 }
            [[rule]]
            name = "by-source"
            sources = ["checkout"]
            abort = { status = 502, percent = 20.0 }
            ''')
        mesh, pool, _rec, proxy = _setup(ev)
        counts = {}
        for label, req in (("chaos", FakeRequest(headers=[(b"x-chaos", b"1")])),
                           ("plain", FakeRequest())):
            got = [(await call(proxy, req))[0] for _ in range(1000)]
            counts[label] = got
        assert abs(counts["chaos"].count(500) - 500) < 4 * (1000 * .25) ** 0.5
        assert counts["plain"].count(500) == 0 and counts["plain"].count(502) == 0
        other = outbound(mesh, pool, lambda: ev, identity="checkout")
        got = [(await call(other, FakeRequest()))[0] for _ in range(1000)]
        assert abs(got.count(502) - 200) < 4 * (1000 * .16) ** 0.5
    run(main)


def test_a_fault_delay_counts_toward_the_overall_timeout() -> None:
    async def main() -> None:
        res = ('kind = "resilience"\nname = "web-res"\nversion = 1\nservice = "web"\n'
               '[timeouts]\nper_try = "1s"\noverall = "1s"\n')
        ev = _faults('[[rule]]\ndelay = { duration = "800ms", percent = 100.0 }\n', res)
        mesh, pool, rec, proxy = _setup(ev)
        for e in mesh.services["web"]:
            pool.upstream(e.port).script = [Behaviour(delay=0.5)]
        t0 = trio.current_time()
        status, hs, _ = await call(proxy, FakeRequest())
        # 0.8 s held, then 0.2 s left for a 0.5 s answer: the overall timeout answers.
        assert status == 504 and hs["x-rumor-error-code"] in ("upstream_timeout",
                                                              "overall_timeout")
        assert trio.current_time() - t0 == pytest.approx(1.0, abs=1e-6)
        x = rec.ended[0][0]
        assert x.fault == "rule[0]" and x.fault_delay == pytest.approx(0.8)
    run(main)


def test_a_fault_reset_resets_and_an_expired_fault_stops() -> None:
    from rumor.proxy.relay import ResetConnection

    async def main() -> None:
        current = [_faults('[[rule]]\nabort = { reset = true, percent = 100.0 }\n')]
        mesh, pool, rec = FakeMesh(), FakePool(), Recorder()
        mesh.add("web", 2)
        proxy = outbound(mesh, pool, lambda: current[0], observer=rec)
        with pytest.raises(ResetConnection):
            await proxy(FakeRequest())  # type: ignore[arg-type]
        assert rec.ended[-1][0].code == "fault_reset"
        current[0] = Evaluator([])  # the policy runtime dropped the expired document
        assert (await call(proxy, FakeRequest()))[0] == 200
    run(main)


# ---- route matches and header edits -----------------------------------------------------

ROUTE = '''kind = "route"
name = "web-route"
version = 1
service = "web"
[[subset]]
name = "v1"
version = "v1"
[[subset]]
name = "v2"
version = "v2"
[[split]]
subset = "v1"
weight = 1
[[rule]]
name = "api-writes"
path = { prefix = "/api" }
method = ["POST", "PUT"]
subset = "v2"
[rule.request_headers]
set = { "x-tier" = "write" }
remove = ["x-drop"]
[[rule]]
name = "debug"
query = [{ name = "debug", exact = "1" }]
subset = "v2"
'''


def test_route_rules_match_path_method_and_query_and_edit_headers() -> None:
    async def main() -> None:
        mesh, pool, rec = FakeMesh(), FakePool(), Recorder()
        v1 = list(mesh.add("web", 2))
        ev = Evaluator([_doc(ROUTE)])
        for i in range(2):
            k = len(mesh.services["web"])
            from rumor.proxy.attempts import Endpoint
            mesh.services["web"].append(Endpoint(f"n{k}/web-{k}", f"n{k}", f"web-{k}", "v2",
                                                 (), "127.0.0.1", 21000 + i, 0.001))
        mesh.version += 1
        v2_ports = {21000, 21001}
        proxy = outbound(mesh, pool, lambda: ev, observer=rec)
        cases = [
            (FakeRequest(b"/api/orders", method=b"POST", headers=[(b"x-drop", b"1")]), True,
             "api-writes"),
            (FakeRequest(b"/api/orders", method=b"GET"), False, None),
            (FakeRequest(b"/apix", method=b"POST"), False, None),
            (FakeRequest(b"/x?debug=1&y=2"), True, "debug"),
            (FakeRequest(b"/x?debug=0"), False, None),
        ]
        for req, to_v2, rule in cases:
            before = len(pool.order)
            assert (await call(proxy, req))[0] == 200
            port = pool.order[before]
            assert (port in v2_ports) == to_v2, req.target
            assert rec.ended[-1][0].route_rule == rule
        head = pool.upstream(pool.order[0]).heads[0]
        assert b"x-tier: write\r\n" in head and b"x-drop" not in head
        assert {e.port for e in v1}.isdisjoint(v2_ports)
    run(main)


# ---- hash ------------------------------------------------------------------------------

def test_hash_keeps_a_key_on_one_instance() -> None:
    async def main() -> None:
        ev = _resilience('balancer = "hash"\n[hash]\nheader = "x-user"\n')
        _mesh, pool, _rec, proxy = _setup(ev, n=5)
        homes: dict[bytes, set[int]] = {}
        for i in range(300):
            user = b"user-%d" % (i % 30)
            before = len(pool.order)
            await call(proxy, FakeRequest(headers=[(b"x-user", user)]))
            homes.setdefault(user, set()).add(pool.order[before])
        assert all(len(ports) == 1 for ports in homes.values())
        assert len({p for ports in homes.values() for p in ports}) >= 3  # spread
    run(main)


# ---- rate limit (inbound) ----------------------------------------------------------------

def test_inbound_rate_limit_admits_its_share_with_retry_after() -> None:
    async def main() -> None:
        mesh, pool, rec = FakeMesh(), FakePool(), Recorder()
        mesh.add("web", 3)  # the other instances, as gossip lists them (weights 1)
        mesh.local["web"] = [LocalInstance("web-local", "127.0.0.1", 30001, 1,
                                           "me/web-local")]
        mesh.services["web"].append(mesh.services["web"][0].__class__(
            "me/web-local", "me", "web-local", "v1", (), "127.0.0.1", 40000, 0.0, 1))
        ev = Evaluator([_doc('kind = "ratelimit"\nname = "web-rl"\nversion = 1\n'
                             'service = "web"\nrequests_per_second = 40\nburst = "1s"\n')])
        proxy = inbound(mesh, pool, lambda: ev, observer=rec)
        admitted = refused = 0
        for _ in range(10 * 100):  # 100 req/s offered for 10 s; this share: 40/4 = 10/s
            status, hs, body = await call(proxy, FakeRequest())
            if status == 429:
                refused += 1
                assert hs["x-rumor-error-code"] == "rate_limited"
                assert int(hs["retry-after"]) >= 1
                assert body["policy"] == "ratelimit/web-rl"
            else:
                admitted += 1
            await trio.sleep(0.01)
        # 10/s for 10 s plus a burst of 10: at most 110 (the bound R_i (t + burst)).
        assert 95 <= admitted <= 111, admitted
        # Two instances leave: the share grows to 40/2 = 20/s within a second.
        mesh.remove("web", "node1/web-1")
        mesh.remove("web", "node2/web-2")
        await trio.sleep(1.0)
        admitted = 0
        for _ in range(500):
            status, _, _ = await call(proxy, FakeRequest())
            admitted += status == 200
            await trio.sleep(0.01)
        assert 95 <= admitted <= 122, admitted  # 20/s for 5 s, plus at most one burst
    run(main)
