"""``rumor sim traffic``: the proxy's request-path cores under open-loop load."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from rumor.policy.documents import ResilienceSpec
from rumor.proxy.attempts import Endpoint
from rumor.simulations.cli import main as sim_main
from rumor.simulations.traffic import (
    InstanceSpec,
    TrafficParams,
    make_sim_balancer,
    parse_variant,
    run_traffic,
)


def _run(**kw: Any) -> dict[str, Any]:
    kw.setdefault("duration", 2.0)
    kw.setdefault("warmup", 0.5)
    return run_traffic(TrafficParams(**kw))


def _rows(report: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = report["result"]["balancers"]
    return rows


def test_the_same_seed_gives_the_same_report() -> None:
    a = _run(seed=7, variant="tail10x200", arrivals="poisson")
    b = _run(seed=7, variant="tail10x200", arrivals="poisson")
    a.pop("wall")
    b.pop("wall")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = _run(seed=8, variant="tail10x200", arrivals="poisson")
    assert _rows(c) != _rows(a)  # the seed matters


def test_peak_ewma_sends_less_to_a_degraded_instance_than_round_robin() -> None:
    rows = _rows(_run(variant="fixed50", balancers=("peak_ewma", "round_robin")))
    pe, rr = rows["peak_ewma"], rows["round_robin"]
    assert rr["share_degraded"] == pytest.approx(1 / 3, abs=0.01)
    assert pe["share_degraded"] < 0.01
    # and so the tail: round robin's p99 is the +50 ms instance, peak EWMA's is not
    assert rr["latency_ms"]["p99"] > 50.0
    assert pe["latency_ms"]["p99"] < 5.0


def test_a_failing_instance_with_retries_still_gives_full_success() -> None:
    # b3 answers 30% of its requests with 503. Outlier ejection off, so that only the
    # retries can save those requests (with it, 5 in a row eject b3 for a while).
    spec = ResilienceSpec.default("bench")
    no_ejection = replace(spec, outlier_ejection=replace(spec.outlier_ejection,
                                                         enabled=False))
    # (peak EWMA counts a 503 as 1 s of latency: after b3's first few it gets almost
    # nothing, so it needs few retries at all.)
    for balancer in ("round_robin", "peak_ewma"):
        on = _rows(_run(variant="failing503", balancers=(balancer,)))[balancer]
        alone = _rows(_run(variant="failing503", balancers=(balancer,),
                           resilience=no_ejection))[balancer]
        off = _rows(_run(variant="failing503", balancers=(balancer,), attempts=1,
                         resilience=no_ejection))[balancer]
        assert on["success_rate"] > 0.999, balancer
        assert alone["success_rate"] > 0.999, balancer
        assert off["retries"] == 0
        if balancer == "round_robin":  # a third of the requests meet b3's 30% of 503s
            assert off["success_rate"] == pytest.approx(0.9, abs=0.02)
            assert alone["retries"] == pytest.approx(0.1 * alone["requests"], rel=0.2)
    resets = _rows(_run(variant="failingreset", balancers=("round_robin",)))["round_robin"]
    assert resets["success_rate"] > 0.999 and resets["retries"] > 0


def test_open_loop_latency_includes_queueing_at_a_saturated_instance() -> None:
    # b3 takes 5 ms a request, one at a time; round robin offers it 333 req/s (1.7x
    # what it can serve), so its queue grows for the whole run.
    def p99(variant: str) -> float:
        row = _rows(_run(variant=variant, balancers=("round_robin",)))["round_robin"]
        return float(row["latency_ms"]["p99"])
    unlimited = p99("x=0,0,5")
    saturated = p99("saturated")
    assert unlimited < 6.0
    assert saturated > 10 * unlimited
    # below saturation (two at a time: 400 req/s) the queue stays short
    assert p99("x=0,0,5+conc=2") < 3 * unlimited


def test_the_sidecars_queue_too() -> None:
    # At 1,000 req/s a 1.2 ms caller hop is a single server past saturation.
    quiet = _rows(_run(variant="healthy", balancers=("random",), hop_ms=0.15))["random"]
    busy = _rows(_run(variant="healthy", balancers=("random",), hop_ms=1.2))["random"]
    assert quiet["latency_ms"]["p99"] == pytest.approx(0.35, abs=0.1)
    assert busy["latency_ms"]["p99"] > 100.0
    # an exponential hop of the same mean spreads the latency
    spread = _rows(_run(variant="healthy", balancers=("random",), hop_dist="exp"))["random"]
    assert spread["latency_ms"]["p99"] > 2 * spread["latency_ms"]["p50"]


def test_variants_parse_as_the_harness_writes_them() -> None:
    assert parse_variant("fixed50") == ("fixed50", (InstanceSpec(), InstanceSpec(),
                                                    InstanceSpec(50.0)))
    name, inst = parse_variant("tail10x200")
    assert inst[2] == InstanceSpec(0.0, 0.1, 200.0) and inst[2].degraded
    assert not inst[0].degraded
    name, inst = parse_variant("mine=1,2:0.5:10+503=0.1+conc=3")
    assert name == "mine" and inst[1] == InstanceSpec(2.0, 0.5, 10.0, fail_503=0.1,
                                                      concurrency=3)
    for bad in ("nope", "x=1:2", "x=0+503=2", "x=0+what=1", "x=-1"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_every_balancer_name_is_made_and_unknown_ones_are_refused() -> None:
    import random
    for name in ("peak_ewma", "least_request", "round_robin", "random"):
        b = make_sim_balancer(name, random.Random(1))
        eps = [Endpoint(k, k, k, "", (), "127.0.0.1", 0, None) for k in ("a", "b")]
        assert b.pick(0.0, eps) in eps
    with pytest.raises(ValueError):
        make_sim_balancer("hash", random.Random(1))


def test_the_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main(["traffic", "--duration", "1", "--warmup", "0.5", "--rate", "500",
                     "--balancers", "peak_ewma,round_robin", "--variant", "tail10x200",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenario"] == "traffic"
    assert set(out["result"]["balancers"]) == {"peak_ewma", "round_robin"}
    assert out["result"]["balancers"]["round_robin"]["requests"] == 500
    assert sim_main(["traffic", "--balancers", "nope"]) == 2
