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
    for name in ("peak_ewma", "least_request", "round_robin", "random", "hash"):
        b = make_sim_balancer(name, random.Random(1))
        eps = [Endpoint(k, k, k, "", (), "127.0.0.1", 0, None) for k in ("a", "b")]
        assert b.pick(0.0, eps, b"key") in eps
    with pytest.raises(ValueError):
        make_sim_balancer("nope", random.Random(1))
    with pytest.raises(ValueError, match="hash-keys"):  # hash without keys is random
        TrafficParams(balancers=("hash",)).validate()


def test_the_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main(["traffic", "--duration", "1", "--warmup", "0.5", "--rate", "500",
                     "--balancers", "peak_ewma,round_robin", "--variant", "tail10x200",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenario"] == "traffic"
    assert set(out["result"]["balancers"]) == {"peak_ewma", "round_robin"}
    assert out["result"]["balancers"]["round_robin"]["requests"] == 500
    assert sim_main(["traffic", "--balancers", "nope"]) == 2


# ---- the fault, rate-limit and hash layers ------------------------------------------------


def _binomial_ok(k: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(k / n - p) <= sds * (p * (1 - p) / n) ** 0.5


def test_an_abort_fault_answers_its_share_at_once_and_is_never_retried() -> None:
    rows = _rows(_run(variant="healthy", balancers=("round_robin", "peak_ewma"),
                      fault_abort="503:20"))
    rr = rows["round_robin"]
    n = rr["requests"]
    assert _binomial_ok(rr["fault_aborted"], n, 0.2)
    assert rr["success_rate"] == pytest.approx(1 - rr["fault_aborted"] / n)
    assert _binomial_ok(round(rr["success_rate"] * n), n, 0.8)
    assert rr["status"]["503"] == rr["fault_aborted"]
    # never reaches the balancer, the breaker or the retry budget: no try, no retry
    assert rr["retries"] == 0 and rr["tries"] == n - rr["fault_aborted"]
    assert sum(rr["tries_to"].values()) == rr["tries"]
    # the fault's own stream: the same requests are hit under every balancer
    assert rows["peak_ewma"]["fault_aborted"] == rr["fault_aborted"]
    reset = _rows(_run(variant="healthy", balancers=("random",),
                       fault_abort="reset:10"))["random"]
    assert reset["status"]["0"] == reset["fault_aborted"] > 0 and reset["retries"] == 0


def test_a_delay_fault_adds_its_delay_to_the_share_it_hits() -> None:
    base = _rows(_run(variant="healthy", balancers=("round_robin",)))["round_robin"]
    hit = _rows(_run(variant="healthy", balancers=("round_robin",),
                     fault_delay="50:10"))["round_robin"]
    assert _binomial_ok(hit["fault_delayed"], hit["requests"], 0.1)
    assert hit["latency_ms"]["p50"] == pytest.approx(base["latency_ms"]["p50"], abs=0.01)
    assert hit["latency_ms"]["p99"] == pytest.approx(base["latency_ms"]["p99"] + 50.0,
                                                     abs=0.05)
    assert hit["success_rate"] == 1.0
    # The delay counts toward the overall timeout: with 20 ms overall, every delayed
    # request ends in 504 before any try.
    spec = ResilienceSpec.default("bench")
    short = replace(spec, timeouts=replace(spec.timeouts, overall=0.02))
    out = _rows(_run(variant="healthy", balancers=("round_robin",), fault_delay="50:10",
                     resilience=short))["round_robin"]
    assert out["status"]["504"] == out["fault_delayed"] > 0
    assert out["tries"] == out["requests"] - out["fault_delayed"]


def test_the_mesh_wide_rate_limit_admits_about_r_and_never_more_than_r_t_plus_burst() -> None:
    # 1,000 req/s spread evenly over three instances (333/s each) against R = 600: each
    # instance's share, 200/s, is offered more than it admits.
    rows = _rows(_run(variant="healthy", balancers=("round_robin", "peak_ewma"),
                      rate_limit="600:1", duration=3.0))
    for name, row in rows.items():
        rl = row["rate_limit"]
        assert rl["share"] == {"b1": 200.0, "b2": 200.0, "b3": 200.0}
        assert 0.9 * 600 * 3.0 <= rl["admitted_total"] <= 600 * (3.0 + 1.0), name
        assert all(v > 0 for v in rl["refused"].values())
        # a 429 is delivered as it is: not retried, and no instance is ejected for it
        assert row["retries"] == 0 and row["ejections"] == 0
        assert row["status"]["429"] == row["rate_limited"] > 0
    # Uneven load: peak EWMA keeps b3 (+50 ms) idle, so its share goes unused and the
    # mesh admits about 2R/3.
    uneven = _rows(_run(variant="fixed50", balancers=("peak_ewma",), rate_limit="600:1",
                        duration=3.0))["peak_ewma"]["rate_limit"]
    assert uneven["of_rate"] < 0.8
    assert uneven["admitted"]["b3"] < 0.05 * uneven["admitted_total"]


def test_weights_set_the_shares_and_weight_zero_drains() -> None:
    row = _rows(_run(variant="healthy", balancers=("round_robin",), rate_limit="600",
                     weights=(1, 1, 2)))["round_robin"]
    assert row["rate_limit"]["share"] == {"b1": 150.0, "b2": 150.0, "b3": 300.0}
    assert row["share_by"]["b3"] == pytest.approx(0.5, abs=0.01)  # smooth WRR: exact
    drained = _rows(_run(variant="healthy", balancers=("round_robin",), rate_limit="600",
                         weights=(1, 1, 0)))["round_robin"]
    assert drained["tries_to"]["b3"] == 0 and drained["rate_limit"]["share"]["b3"] == 0.0
    for bad in ((1, 1), (0, 0, 0), (1, -1, 1)):
        with pytest.raises(ValueError):
            TrafficParams(weights=bad, variant="healthy").validate()


def test_hash_sends_each_key_to_one_instance() -> None:
    rows = _rows(_run(variant="healthy", balancers=("hash", "round_robin"), hash_keys=50))
    h, rr = rows["hash"], rows["round_robin"]
    assert h["hash_keys"]["seen"] == 50 and h["hash_keys"]["on_one_instance"] == 1.0
    assert rr["hash_keys"]["on_one_instance"] < 0.2  # round robin ignores the key
    assert sum(h["share_by"].values()) == pytest.approx(1.0)
    # Zipf over 50 keys: the first key is 1/H(50) ≈ 22% of the requests
    assert h["hash_keys"]["top_key_share"] == pytest.approx(0.222, abs=0.03)
    uniform = _rows(_run(variant="healthy", balancers=("hash",), hash_keys=50,
                         hash_dist="uniform"))["hash"]
    assert uniform["hash_keys"]["top_key_share"] < 0.04
    assert uniform["hash_keys"]["on_one_instance"] == 1.0


def test_the_cli_takes_the_layer_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main(["traffic", "--duration", "1", "--warmup", "0.5", "--variant", "healthy",
                     "--balancers", "hash", "--hash-keys", "20", "--fault-abort", "503:10",
                     "--fault-delay", "5:10", "--rate-limit", "400:0.5", "--weights", "1,2,1",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["fault"]["rules"][0]["abort"] == {"status": 503, "percent": 10.0}
    assert out["config"]["rate_limit"]["requests_per_second"] == 400.0
    row = out["result"]["balancers"]["hash"]
    assert row["rate_limit"]["share"]["b2"] == 200.0 and row["fault_aborted"] > 0
    for bad in (["--fault-abort", "200:10"], ["--fault-delay", "5"], ["--rate-limit", "x"],
                ["--weights", "1,a,1"], ["--fault-abort", "503:101"],
                ["--balancers", "hash"]):
        assert sim_main(["traffic", *bad]) == 2, bad
