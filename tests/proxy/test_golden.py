"""Golden metrics from known request streams: exact counts, quantiles within the
sketch's stated error, wall-clock-aligned windows that add up across agents, the series
cap, and a peer's answer decoded as untrusted input."""

from __future__ import annotations

import contextlib
import math
import random

import msgpack
import pytest
from ddsketch.pb import ddsketch_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.proxy.attempts import Endpoint
from rumor.proxy.golden import (
    ACCURACY,
    BUCKET,
    OTHER,
    UNKNOWN,
    GoldenDecodeError,
    GoldenMetrics,
    Snapshot,
    from_wire,
    merge,
    quantile,
    summarise,
    to_wire,
)
from rumor.proxy.observe import Exchange

WALL0 = 1_800_000_000.0  # a multiple of BUCKET


def _ep(key: str) -> Endpoint:
    node, inst = key.split("/")
    return Endpoint(key, node, inst, "v1", (), "127.0.0.1", 1, None)


class Clock:
    """The monotonic clock of a listener and the wall clock, 1000 s apart."""

    def __init__(self) -> None:
        self.now = 1000.0

    def wall(self) -> float:
        return self.now - 1000.0 + WALL0


def request(g: GoldenMetrics, clock: Clock, *, service: str = "web", status: int = 200,
            latency: float = 0.01, instance: str = "n1/web", source: str | None = "app",
            route: str | None = None, failed_tries: tuple[str, ...] = (),
            listener: str = "outbound", complete: bool = True) -> None:
    x = Exchange(listener, b"GET", b"/", "c", clock.now, service=service, source=source,
                 route_rule=route)
    for key in failed_tries:
        g.try_ended(x, _ep(key), clock.now, "502")
    if listener == "outbound":
        g.try_ended(x, _ep(instance), clock.now + latency, str(status))
    x.instance, x.status = instance, status
    x.tries = len(failed_tries) + 1
    x.headers_at = clock.now + latency
    t0 = clock.now
    clock.now += latency  # the wall clock reads the same instant as the listener's
    g.request_ended(x, clock.now, 10, complete)
    clock.now = t0


def test_counts_are_exact_and_quantiles_within_the_sketchs_error() -> None:
    clock = Clock()
    g = GoldenMetrics(clock.wall, clock.now)
    rng = random.Random(4)
    latencies = []
    for i in range(3000):
        lat = rng.lognormvariate(-5, 1)
        latencies.append(lat)
        request(g, clock, latency=lat, status=503 if i % 10 == 0 else 200,
                failed_tries=("n2/web",) if i % 5 == 0 else ())
        clock.now += 0.01  # 3,000 requests over 30 s
    clock.now = 1000.0 + 60.0
    snap = g.snapshot(clock.now)
    assert (snap.start, snap.end) == (WALL0, WALL0 + 60.0)
    [row] = summarise(snap, "service")
    assert row["requests"] == 3000 and row["successes"] == 2700
    assert row["tries"] == 3600 and row["try_successes"] == 2700
    assert row["rps"] == pytest.approx(50.0) and row["actual_rps"] == pytest.approx(60.0)
    assert row["success"] == 0.9 and row["actual_success"] == 0.75
    latencies.sort()
    for q in (0.5, 0.95, 0.99):
        true = latencies[math.ceil(q * len(latencies)) - 1]
        got = row[f"p{round(q * 100)}_ms"] / 1000
        # DDSketch: the returned value is within ACCURACY of a value of the right rank.
        lo = latencies[max(0, math.floor(q * (len(latencies) - 1)) - 1)]
        hi = latencies[min(len(latencies) - 1, math.ceil(q * (len(latencies) - 1)) + 1)]
        assert lo * (1 - ACCURACY) - 1e-12 <= got <= hi * (1 + ACCURACY) + 1e-12, (q, got, true)
    # Per instance: the failed tries are n2's, the requests n1's.
    by_inst = {r["instance"]: r for r in summarise(snap, "instance")}
    assert by_inst["n2/web"]["tries"] == 600 and by_inst["n2/web"]["try_successes"] == 0
    assert by_inst["n2/web"]["requests"] == 0
    assert by_inst["n1/web"]["requests"] == 3000 and by_inst["n1/web"]["tries"] == 3000


def test_a_window_is_whole_wall_clock_buckets_and_old_buckets_are_dropped() -> None:
    clock = Clock()
    clock.now += 2.0  # starts mid-bucket
    g = GoldenMetrics(clock.wall, clock.now)
    for _ in range(7):
        request(g, clock)
    clock.now += 4.0  # into the next bucket: the first is whole now
    request(g, clock)
    snap = g.snapshot(clock.now, window=5.0)
    assert (snap.start, snap.end) == (WALL0, WALL0 + BUCKET)
    assert summarise(snap)[0]["requests"] == 7
    # The current bucket is not in a default window, but a later end includes it.
    assert summarise(g.snapshot(clock.now, 10.0, end=WALL0 + 10.0))[0]["requests"] == 8
    clock.now += 200.0
    request(g, clock)
    assert g.snapshot(clock.now, 60.0, end=WALL0 + 10.0).series == {}
    assert len(g.buckets) <= 13


def test_views_of_several_agents_add_up_and_their_sketches_merge() -> None:
    clocks = [Clock() for _ in range(3)]
    agents = [GoldenMetrics(c.wall, c.now) for c in clocks]
    everything = GoldenMetrics(clocks[0].wall, clocks[0].now)
    rng = random.Random(9)
    for i in range(900):
        k = i % 3
        lat = rng.uniform(0.001, 0.2)
        for g in (agents[k], everything):
            request(g, clocks[k], latency=lat, status=500 if i % 7 == 0 else 200)
        for c in clocks:
            c.now += 0.01
    for c in clocks:
        c.now += 10
    snaps = [from_wire(to_wire(g.snapshot(c.now, 60.0)), f"a{i}")
             for i, (g, c) in enumerate(zip(agents, clocks, strict=True))]
    mesh = merge(snaps)
    assert mesh.agents == ["a0", "a1", "a2"]
    whole = everything.snapshot(clocks[0].now, 60.0)
    [m], [w] = summarise(mesh), summarise(whole)
    assert m["requests"] == w["requests"] == 900
    assert m["successes"] == w["successes"] == sum(1 for i in range(900) if i % 7)
    # The merged sketch is the sketch of the whole stream (same bins): equal quantiles.
    for q in (0.5, 0.95, 0.99):
        assert quantile(mesh, q) == pytest.approx(quantile(whole, q))
    with pytest.raises(ValueError, match="different windows"):
        merge([snaps[0], Snapshot(0.0, 5.0, {})])


def test_unknown_names_share_one_series_and_the_cap_folds_the_rest_into_other() -> None:
    clock = Clock()
    g = GoldenMetrics(clock.wall, clock.now, known=lambda n: not n.startswith("x"),
                      max_series=10)
    for i in range(50):
        request(g, clock, service=f"x{i}", source=f"x-src{i}", instance=f"n/{i}",
                listener="inbound")
    for i in range(30):
        request(g, clock, service=f"svc{i}", instance="n/1")
    clock.now += BUCKET
    rows = summarise(g.snapshot(clock.now, BUCKET), "edge")
    services = {r["service"]: r["requests"] for r in rows}
    assert services[UNKNOWN] == 50 and services[OTHER] == 21
    assert len(rows) == 11  # the cap, and (other)
    # Two lookups per request (its try, its end), uncached: the 50 unknown names filled
    # the bucket's cache of raw fields (4 x the cap).
    assert g.overflowed == 42 and len(g.buckets[-2].series) == 11
    assert {r["source"] for r in rows} == {"app", UNKNOWN, OTHER}


def test_a_sidecars_own_answer_and_a_broken_response_are_failures() -> None:
    clock = Clock()
    g = GoldenMetrics(clock.wall, clock.now)
    request(g, clock, status=200, complete=False)
    x = Exchange("outbound", b"GET", b"/", "c", clock.now, service="web")
    x.status, x.code = 503, "no_instances"
    g.request_ended(x, clock.now + 0.001, 0, True)
    request(g, clock, listener="inbound", status=404, instance="web-1")
    clock.now += BUCKET
    rows = {r["listener"]: r for r in summarise(g.snapshot(clock.now, BUCKET))}
    assert rows["outbound"]["requests"] == 2 and rows["outbound"]["successes"] == 0
    assert rows["inbound"]["successes"] == 1 and rows["inbound"]["try_successes"] == 1


def _doc(**over: object) -> bytes:
    clock = Clock()
    g = GoldenMetrics(clock.wall, clock.now)
    request(g, clock)
    clock.now += BUCKET
    doc = msgpack.unpackb(to_wire(g.snapshot(clock.now, BUCKET)))
    doc.update(over)
    return msgpack.packb(doc)  # type: ignore[no-any-return]


def _bad_sketch(**fields: object) -> bytes:
    p = pb.DDSketch()
    p.mapping.gamma = (1 + ACCURACY) / (1 - ACCURACY)
    for k, v in fields.items():
        if k == "offset":
            p.positiveValues.contiguousBinIndexOffset = v  # type: ignore[assignment]
        elif k == "counts":
            p.positiveValues.contiguousBinCounts.extend(v)  # type: ignore[arg-type]
        elif k == "gamma":
            p.mapping.gamma = v  # type: ignore[assignment]
    return p.SerializeToString()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("doc", "why"), [
    (b"\xc1", "not msgpack"),
    (_doc(v=2), "version 1"),
    (_doc(start=0.0, end=1e9), "bad window"),
    (_doc(accuracy=0.02), "not mergeable"),
    (_doc(series=[["outbound", "a", True, "web", "", "n/1", 5, 6, 0, 0, b""]]),
     "more successes"),
    (_doc(series=[["outbound", "a", 1, "web", "", "n/1", 1, 1, 0, 0, b""]]), "boolean"),
    (_doc(series=[["outbound", "a", True, "web", "", "n/1", 1, 1, 0, 0,
                   _bad_sketch(offset=2**30, counts=[1.0])]]), "outside 1 µs"),
    (_doc(series=[["outbound", "a", True, "web", "", "n/1", 1, 1, 0, 0,
                   _bad_sketch(gamma=1.5)]]), "mapping is not ours"),
    (_doc(series=[["outbound", "a", True, "web", "", "n/1", 1, 1, 0, 0,
                   _bad_sketch(offset=0, counts=[5.0])]]), "more latencies"),
    (_doc(series=[["outbound", "a", True, "web", "", "n/1", 9, 1, 0, 0,
                   _bad_sketch(offset=0, counts=[float("nan")])]]), "bad bin counts"),
])
def test_a_bad_answer_is_refused_with_the_reason(doc: bytes, why: str) -> None:
    with pytest.raises(GoldenDecodeError, match=why):
        from_wire(doc)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_junk_answers_raise_only_the_decode_error(junk: bytes) -> None:
    with contextlib.suppress(GoldenDecodeError):  # anything else fails the test
        from_wire(junk)


def test_the_golden_query_payload_round_trips_and_junk_is_refused() -> None:
    from rumor.gossip.query import QueryError
    from rumor.proxy.api.stat import golden_payload, golden_request

    assert golden_request(golden_payload(60.0, WALL0)) == (60.0, WALL0)
    assert golden_request(golden_payload(7.0, WALL0)) == (5.0, WALL0)  # whole buckets
    for junk in (b"", b"\x92\xa1x\x01", msgpack.packb([600.0, WALL0]),
                 msgpack.packb([60.0, float("inf")]), msgpack.packb([60.0])):
        with pytest.raises(QueryError, match="golden takes"):
            golden_request(junk)


def test_merge_answers_adds_what_fits_the_window_and_says_why_the_rest_was_left_out() -> None:
    from rumor.gossip.query import Answer
    from rumor.proxy.golden import merge_answers

    clock = Clock()
    g = GoldenMetrics(clock.wall, clock.now)
    request(g, clock)
    clock.now += BUCKET
    good = to_wire(g.snapshot(clock.now, BUCKET))
    other = to_wire(g.snapshot(clock.now, BUCKET, end=WALL0 + 2 * BUCKET))

    def ans(data: bytes, ok: bool = True) -> Answer:
        return Answer(ok, data, "" if ok else "boom", 0.0, 0.0, 0.0, "datagram")

    snap, errors = merge_answers({"a": ans(good), "b": ans(good), "c": ans(other),
                                  "d": ans(b"\xc1"), "e": ans(b"", ok=False)},
                                 WALL0, WALL0 + BUCKET)
    assert snap.agents == ["a", "b"] and summarise(snap)[0]["requests"] == 2
    assert errors["c"].startswith("answered for another window")
    assert errors["d"].startswith("bad answer") and errors["e"] == "boom"
