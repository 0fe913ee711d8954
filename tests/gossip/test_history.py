"""The member history: bounded in bytes, the records the core makes, the wire."""

from __future__ import annotations

import contextlib
import logging
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip import history as h
from rumor.gossip.config import LOCAL
from rumor.gossip.history import (
    HistoryDecodeError,
    MemberHistory,
    Record,
    from_wire,
    to_wire,
    wire_evicted,
)

from ..fakenet import FakeNet


def _packed(r: Record) -> int:
    return len(msgpack.packb(to_wire([r])["records"][0]))


def test_history_stays_within_its_byte_bound_and_counts_evictions() -> None:
    hist = MemberHistory("me", max_bytes=4096)
    made = 0
    for i in range(5000):
        hist.record(h.SUSPECT_CONFIRMED, float(i), f"member-{i % 97}", f"accuser-{i % 13}",
                    i % 8, incarnation=i, confirmations=i % 4, timeout=1.5 + i,
                    helpers=("a", "bb", "ccc"))
        made += 1
        assert hist.bytes <= hist.max_bytes
    assert hist.recorded == made
    assert hist.evicted == made - len(hist) > 4000
    # The estimate is the sum of the held records' costs, each an upper bound on its
    # encoded size: the whole history as a query answer fits the bound.
    held = hist.records()
    assert hist.bytes == sum(r.cost() for r in held)
    assert all(_packed(r) <= r.cost() for r in held)
    assert len(msgpack.packb(to_wire(held, 1e9))) <= hist.max_bytes + 64
    # The newest survive, oldest first.
    assert [r.at for r in held] == sorted(r.at for r in held)
    assert held[-1].at == 4999.0


def test_cost_bounds_encoded_size_for_unicode_names() -> None:
    r = Record(h.DEAD_HEARD, 1.0, "nœud-é" * 10, "ünïcode", 3, {"why": "ça va ✓" * 9})
    assert _packed(r) <= r.cost()


def test_a_record_larger_than_the_bound_is_dropped_and_counted() -> None:
    hist = MemberHistory("me", max_bytes=1024)
    hist.record(h.HEALTH, 0.0, "me", "me", 0, why="x" * 2000)
    assert len(hist) == 0 and hist.evicted == 1 and hist.bytes == 0


def test_about_and_since_filter_by_member_and_time() -> None:
    hist = MemberHistory("me")
    hist.record(h.PROBE_DIRECT_FAILED, 1.0, "a", "me", 0, after=0.5)
    hist.record(h.HEALTH, 2.0, "me", "me", 1, old=0, new=1, why="probe")
    hist.record(h.SUSPECT_RAISED, 2.0, "a", "me", 1, incarnation=1)
    hist.record(h.SUSPECT_HEARD, 3.0, "b", "x", 1, incarnation=4)
    assert [r.kind for r in hist.about("a")] == [h.PROBE_DIRECT_FAILED, h.SUSPECT_RAISED]
    assert [r.kind for r in hist.about("a", since=1.5)] == [h.SUSPECT_RAISED]
    assert [r.kind for r in hist.about("a", health=True)] == [
        h.PROBE_DIRECT_FAILED, h.HEALTH, h.SUSPECT_RAISED]
    assert [r.at for r in hist.since(2.0)] == [2.0, 2.0, 3.0]


def _crashed_cluster(n: int = 5) -> FakeNet:
    net = FakeNet(LOCAL)
    net.cluster(n)
    net.run(2.0)
    net.crash(f"n{n - 1}")
    net.run_until(lambda: all(net.status(o, f"n{n - 1}") == "failed"
                              for o in net.live_names()), limit=30)
    return net


def test_a_failed_probe_records_direct_then_indirect_failure() -> None:
    net = _crashed_cluster()
    raisers = []
    for name in net.live_names():
        recs = net.nodes[name].history.about("n4")
        kinds = [r.kind for r in recs]
        if h.SUSPECT_RAISED in kinds:
            raisers.append(name)
            i = kinds.index(h.SUSPECT_RAISED)
            assert kinds[i - 2:i] == [h.PROBE_DIRECT_FAILED, h.PROBE_INDIRECT_FAILED]
            direct, indirect = recs[i - 2], recs[i - 1]
            assert direct.by == indirect.by == name
            assert math.isclose(direct.get("after"), LOCAL.probe_timeout)
            assert indirect.get("after") >= direct.get("after")
            helpers = indirect.get("helpers")
            assert helpers == direct.get("helpers")
            assert 0 < len(helpers) <= LOCAL.indirect_checks and "n4" not in helpers
            assert indirect.get("nacks") == 0 and indirect.get("expected_nacks") == len(helpers)
            # The failed probe raised the local-health score: recorded, and carried on.
            assert recs[i].health > indirect.health
    assert len(raisers) == 1  # one first suspicion; the others confirm or hear it


def test_suspicion_confirmation_and_failure_records_have_the_right_fields() -> None:
    net = _crashed_cluster()
    for name in net.live_names():
        recs = net.nodes[name].history.about("n4")
        sus = [r for r in recs if r.kind in (h.SUSPECT_RAISED, h.SUSPECT_HEARD)]
        assert len(sus) == 1, name
        s = sus[0]
        assert s.get("incarnation") == 1 and s.get("confirmations") == 0
        assert s.by != name or s.kind == h.SUSPECT_RAISED
        confirms = [r for r in recs if r.kind == h.SUSPECT_CONFIRMED]
        # Each confirmation counts one more distinct accuser, and shrinks the timeout.
        assert [r.get("confirmations") for r in confirms] == list(range(1, len(confirms) + 1))
        assert len({r.by for r in confirms} | {s.by}) == len(confirms) + 1
        timeouts = [s.get("timeout")] + [r.get("timeout") for r in confirms]
        assert timeouts == sorted(timeouts, reverse=True)
        ends = [r for r in recs if r.kind in (h.DECLARED_DEAD, h.DEAD_HEARD)]
        assert len(ends) == 1 and ends[0].get("incarnation") == 1
        if ends[0].kind == h.DECLARED_DEAD:
            assert ends[0].by == name
            assert ends[0].get("confirmations") == len(confirms)
        assert all(r.member == "n4" for r in recs)


def test_refutation_is_recorded_by_the_suspect_and_by_those_who_see_it() -> None:
    net = FakeNet(LOCAL)
    net.cluster(5)
    net.run(2.0)
    before = net.nodes["n4"].incarnation
    net.pause("n4")
    net.run_until(lambda: any(net.status(o, "n4") == "suspect" for o in net.nodes
                              if o != "n4"), limit=10)
    net.run(0.2)  # below the suspicion's minimum
    net.resume("n4")
    net.run(3.0)
    assert all(net.status(o, "n4") == "alive" for o in net.nodes)
    own = net.nodes["n4"].history.about("n4")
    refuted = [r for r in own if r.kind == h.REFUTED]
    assert refuted, [r.kind for r in own]
    r = refuted[0]
    assert r.by == "n4" and r.get("accused") == before
    assert r.get("incarnation") == before + 1 and r.get("accuser") in net.nodes
    inc = [x for x in own if x.kind == h.INCARNATION]
    assert inc and inc[0].get("old") == before and inc[0].get("new") == before + 1
    assert any(x.kind == h.HEALTH and x.get("why") == "refuted an accusation" for x in own)
    seen = [name for name in net.nodes if name != "n4" and any(
        x.kind == h.REFUTE_SEEN and x.get("was") == "suspect"
        and x.get("incarnation") == before + 1 for x in net.nodes[name].history.about("n4"))]
    assert seen


def test_a_successful_probe_records_nothing() -> None:
    net = FakeNet(LOCAL)
    net.cluster(4)
    counts = {n: c.history.recorded for n, c in net.nodes.items()}
    net.run(5.0)  # 25 probe periods, every probe answered
    assert {n: c.history.recorded for n, c in net.nodes.items()} == counts
    assert sum(c.stats["probes"] for c in net.nodes.values()) > 50


def test_on_record_sees_every_record_and_the_log_line_keeps_the_member_contract(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Record] = []
    hist = MemberHistory("me", on_record=seen.append)
    r = hist.record(h.SUSPECT_HEARD, 1.0, "a", "b", 2, incarnation=3, helpers=("x",))
    assert seen == [r]
    doc = r.to_json()
    assert doc["event"] == "suspicion" and doc["kind"] == h.SUSPECT_HEARD
    assert doc["member"] == "a" and doc["by"] == "b" and doc["helpers"] == ["x"]
    assert all(h.CATEGORY[k] != "member" for k in h.KINDS)
    assert set(h.CATEGORY) == h.KINDS
    # Loggable as extra= (no key clashes with LogRecord's own attributes).
    with caplog.at_level(logging.INFO):
        logging.getLogger("rumor.test").info("%s", r.describe(), extra=doc)
    assert caplog.records[0].kind == h.SUSPECT_HEARD  # type: ignore[attr-defined]
    assert "heard b suspect a" in caplog.text


# ---- the wire ------------------------------------------------------------------------------


def test_wire_round_trip_moves_times_to_the_wall_clock() -> None:
    hist = MemberHistory("me")
    hist.record(h.PROBE_INDIRECT_FAILED, 1.5, "a", "me", 0, after=0.2, helpers=("b", "c"),
                nacks=1, expected_nacks=2, tcp=1)
    hist.record(h.REFUTE_SEEN, 2.0, "a", "a", 1, incarnation=7, was="suspect")
    doc = to_wire(hist.records(), wall_offset=1000.0, evicted=5)
    for data in (doc, msgpack.packb(doc)):
        back = from_wire(data)
        assert [r.at for r in back] == [1001.5, 1002.0]
        assert [(r.kind, r.member, r.by, r.health, dict(r.detail)) for r in back] == [
            (r.kind, r.member, r.by, r.health, dict(r.detail)) for r in hist.records()]
        assert wire_evicted(data) == 5


@pytest.mark.parametrize("bad", [
    None, [], {"v": 2, "records": []}, {"v": 1}, {"v": 1, "records": {}},
    {"v": 1, "records": [[1, 2, 3]]},
    {"v": 1, "records": [["k", float("nan"), "a", "b", 0, {}]]},
    {"v": 1, "records": [["k", 1.0, "a" * 200, "b", 0, {}]]},
    {"v": 1, "records": [["k", 1.0, "a", "b", -1, {}]]},
    {"v": 1, "records": [["k", 1.0, "a", "b", True, {}]]},
    {"v": 1, "records": [["k", 1.0, "a", "b", 0, {"x": {"nested": 1}}]]},
    {"v": 1, "records": [["k", 1.0, "a", "b", 0, {"x": [1, 2]}]]},
    {"v": 1, "records": [["bad kind!", 1.0, "a", "b", 0, {}]]},
    {"v": 1, "records": [["k", 1.0, "a\n", "b", 0, {}]]},
    {"v": 1, "evicted": -1, "records": []},
    {"v": 1, "records": [["k", 1.0, "a", "b", 0, {}]] * (h.MAX_WIRE_RECORDS + 1)},
    b"\xc1", b"\x93\x01", b"",
])
def test_from_wire_refuses_malformed_input_with_its_own_error(bad: object) -> None:
    with pytest.raises(HistoryDecodeError):
        from_wire(bad)


_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.text(max_size=40), st.binary(max_size=20))
_junk = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=8), st.dictionaries(st.text(max_size=10), inner, max_size=8)),
    max_leaves=40)


@settings(max_examples=150, deadline=None)
@given(_junk)
def test_from_wire_on_junk_objects_raises_only_its_error(data: object) -> None:
    with contextlib.suppress(HistoryDecodeError):
        from_wire(data)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["k", 1.0, "a", 0, {}, [], "x" * 300, -1]),
                          _junk), max_size=6))
def test_from_wire_on_near_records_raises_only_its_error(fields: list[tuple[object, object]]
                                                         ) -> None:
    rec = [f[0] if i % 2 else f[1] for i, f in enumerate(fields)]
    doc = {"v": 1, "records": [rec]}
    forms: list[object] = [doc]
    with contextlib.suppress(OverflowError, ValueError, TypeError):
        forms.append(msgpack.packb(doc))  # not for an integer msgpack cannot carry
    for data in forms:
        try:
            out = from_wire(data)
        except HistoryDecodeError:
            continue
        assert len(out) == 1 and isinstance(out[0], Record)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_from_wire_on_junk_bytes_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(HistoryDecodeError):
        from_wire(data)
