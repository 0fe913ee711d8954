"""Cluster-wide queries on the membership core (``query.py``), over the test network:
who answers, who is reported missing, filters, answers fetched by stream, spreading,
writes resent to the silent, and the refusals (bad input, forged, unsigned, flooding)."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.gossip.builtin_queries import register_builtins
from rumor.gossip.config import LOCAL
from rumor.gossip.membership import Membership
from rumor.gossip.query import (
    MAX_PAYLOAD,
    QUERY_CONTEXT,
    Pending,
    Queries,
    QueryError,
    QueryLimits,
    Request,
    new_filter,
)
from rumor.gossip.wire import Status, UserMessage, encode_packet

from ..fakenet import FakeNet
from .test_signed_state import identity, signed_cluster

WALL = 1_800_000_000.0


def with_queries(net: FakeNet, cores: list[Membership],
                 limits: QueryLimits | None = None) -> list[Queries]:
    ids = random.Random(11)
    out = []
    for c in cores:
        q = Queries(c, rand_id=lambda: f"{ids.getrandbits(64):016x}", now=net.now,
                    wall_offset=WALL, limits=limits)
        c.register(q)
        register_builtins(q, c, "9.9.9")
        out.append(q)
    return out


def cluster(n: int, **kw: object) -> tuple[FakeNet, list[Membership], list[Queries]]:
    net = FakeNet(LOCAL)
    cores = net.cluster(n)
    return net, cores, with_queries(net, cores, **kw)  # type: ignore[arg-type]


def ask(net: FakeNet, q: Queries, name: str, payload: bytes = b"", run: float = 2.0,
        **kw: object) -> Pending:
    qid = q.start(net.now, name, payload, **kw)  # type: ignore[arg-type]
    net.flush(q.core.name)
    net.run_until(lambda: q.done(net.now, qid), limit=run + 1)
    p = q.finish(qid)
    assert p is not None
    return p


def test_every_member_answers_ping_and_the_caller_stops_when_all_did() -> None:
    net, _cores, qs = cluster(5)
    t0 = net.now
    p = ask(net, qs[0], "ping", timeout=2.0)
    assert sorted(p.answers) == [f"n{i}" for i in range(5)] and p.missing == []
    assert net.now - t0 < 0.1  # it did not wait for the deadline
    doc = msgpack.unpackb(p.answers["n3"].data)
    assert doc["name"] == "n3" and doc["version"] == "9.9.9" and doc["protocol"] == 1
    assert p.answers["n0"].via == "local" and p.answers["n3"].via == "datagram"
    offset, bound = p.offset("n3")  # type: ignore[misc]
    assert abs(offset) <= bound + 1e-6 and bound < 0.05  # one clock: within the bound


def test_stats_carries_probe_rtts_to_peers() -> None:
    net, _cores, qs = cluster(4)
    net.run(5.0)  # a few probe rounds
    p = ask(net, qs[0], "stats")
    doc = msgpack.unpackb(p.answers["n2"].data)
    assert set(doc["rtt_ms"]) == {"n0", "n1", "n3"}
    assert all(r[0] > 0 for r in doc["rtt_ms"].values())
    assert doc["members"] == {"alive": 4}


def test_a_crashed_member_is_reported_missing_at_the_deadline() -> None:
    net, _cores, qs = cluster(5)
    net.crash("n4")
    t0 = net.now
    p = ask(net, qs[0], "ping", timeout=1.5)
    assert p.missing == ["n4"] and len(p.answers) == 4
    assert net.now - t0 == pytest.approx(1.5)


def test_a_filter_reaches_only_the_matching_members() -> None:
    net, cores, qs = cluster(5)
    cores[2].set_meta(net.now, {"zone": "b"})
    cores[3].set_meta(net.now, {"zone": "b"})
    net.flush("n2")
    net.flush("n3")
    net.run(3.0)
    p = ask(net, qs[0], "ping", filter=new_filter(tags={"zone": "b"}))
    assert sorted(p.answers) == ["n2", "n3"] and p.expected == {"n2", "n3"}
    p = ask(net, qs[1], "ping", filter=new_filter(nodes=["n4", "n1"]))
    assert sorted(p.answers) == ["n1", "n4"]
    answered = sum(q.stats["queries_answered"] for q in qs)
    assert answered == 3  # n2, n3, n4: the others heard the queries and stayed silent


def test_an_answer_larger_than_a_datagram_is_fetched_by_the_origin() -> None:
    net, _cores, qs = cluster(5)
    for q in qs:
        q.register("big", lambda r: b"x" * 100_000)
    p = ask(net, qs[0], "big")
    assert p.missing == [] and all(len(a.data) == 100_000 for a in p.answers.values())
    assert {a.via for n, a in p.answers.items() if n != "n0"} == {"stream"}
    assert qs[0].stats["answers_fetched"] == 4


def test_answers_are_spread_over_the_deadline_without_drawing_randomness() -> None:
    net = FakeNet(LOCAL)
    cores = net.cluster(40)
    qs = with_queries(net, cores)
    p = ask(net, qs[0], "ping", timeout=2.0)
    arrivals = sorted(a.arrived for n, a in p.answers.items() if n != "n0")
    assert len(arrivals) == 39
    # 2 ms per member: the 39 answers come over ~80 ms, not in one burst.
    assert arrivals[-1] - arrivals[0] > 0.04
    # The delay is a hash of (query, member): the same on every run, no draw.
    assert qs[5]._spread("q1", 2.0) == qs[5]._spread("q1", 2.0) != qs[6]._spread("q1", 2.0)


def test_a_write_reaches_a_member_that_lost_the_broadcast_by_a_resend() -> None:
    net, _cores, qs = cluster(4)
    applied: list[str] = []
    for q in qs:
        q.register("set", lambda r, q=q: applied.append(q.core.name) or b"ok", write=True)
    net.drop_udp = lambda s, d: d == "n3"  # n3 hears no datagram at all
    p = ask(net, qs[0], "set", timeout=2.0)
    assert p.missing == [] and p.answers["n3"].via == "stream"
    assert sorted(applied) == ["n0", "n1", "n2", "n3"]
    assert qs[0].stats["writes_resent"] >= 1


def test_a_read_is_asked_again_once_of_a_member_that_lost_the_broadcast() -> None:
    net, _cores, qs = cluster(4)
    net.drop_udp = lambda s, d: d == "n3"  # n3 hears no datagram at all
    t0 = net.now
    p = ask(net, qs[0], "ping", timeout=2.0)
    assert p.missing == [] and p.answers["n3"].via == "stream"
    assert qs[0].stats["reads_reasked"] == 1  # once, and only the silent one
    # Asked again when every datagram answer should have come, well before the deadline.
    assert p.answers["n3"].arrived - t0 < 0.5
    # A member whose answer is lost on the way back is asked again too: it holds it.
    net.drop_udp = lambda s, d: s == "n2" and d == "n0"
    p = ask(net, qs[0], "ping", timeout=2.0)
    assert p.missing == [] and p.answers["n2"].via == "stream"


def test_bad_names_payloads_and_timeouts_are_refused_before_anything_is_sent() -> None:
    net, cores, qs = cluster(2)
    for name in ("", "Ping", "9lives", "a" * 65, "sp ace"):
        with pytest.raises(QueryError, match="bad query name"):
            qs[0].start(net.now, name)
    with pytest.raises(QueryError, match=f"at most {MAX_PAYLOAD} bytes"):
        qs[0].start(net.now, "ping", b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(QueryError, match="timeout"):
        qs[0].start(net.now, "ping", timeout=120)
    with pytest.raises(QueryError, match="fit one datagram"):
        qs[0].start(net.now, "ping", b"x" * MAX_PAYLOAD,
                    filter=new_filter(nodes=[f"node-{i:040d}" for i in range(30)]))
    assert cores[0].take_effects() == [] and qs[0].pending == {}


def test_an_unknown_query_gets_an_error_answer_and_a_handler_error_says_which() -> None:
    net, _cores, qs = cluster(3)
    seen: list[str] = []
    qs[2].on_handler_error = lambda name, e: seen.append(name)

    def broken(r: Request) -> bytes:
        raise RuntimeError("bug")
    qs[2].register("oops", broken)
    p = ask(net, qs[0], "oops")
    assert p.answers["n1"].error == "no handler for query 'oops' on this agent"
    assert p.answers["n2"].error == "the oops handler failed: RuntimeError"
    assert seen == ["oops"] and qs[2].stats["handler_errors"] == 1


def test_a_flood_from_one_origin_is_throttled_and_not_relayed() -> None:
    net, _cores, qs = cluster(3, limits=QueryLimits(rate=0.001, burst=5))
    for _ in range(30):
        qs[0].start(net.now, "ping", timeout=5.0)
    net.flush("n0")
    net.run(3.0)
    for q in qs[1:]:
        assert q.stats["queries_answered"] == 5
        assert q.stats["queries_throttled"] == 25


def _forged_query(origin: str, qid: str, sig: bytes = b"", issued: float = WALL) -> bytes:
    body = msgpack.packb([1, qid, origin, "ping", b"", [[], {}, ""], 2000,
                          int(issued * 1000), False])
    return encode_packet([UserMessage("query", msgpack.packb(["q", body, sig]))])


def test_a_forged_origin_gets_answers_only_at_its_own_address_which_drops_them() -> None:
    """Plaintext cluster: the query counts unsigned, but its answer goes where our
    membership table says the origin lives, never back to the sender."""
    net, cores, qs = cluster(3)
    cores[2].receive(net.now, ("10.66.6.6", 4444), _forged_query("n1", "f1"))
    net.run(0.05)
    assert qs[2].stats["queries_unsigned"] == 1
    assert qs[1].stats["answers_unexpected"] >= 1  # n1 asked nothing: dropped
    # An origin nobody knows gets nothing at all, and a stale recording neither.
    cores[2].receive(net.now, ("10.66.6.6", 4444), _forged_query("ghost", "f2"))
    cores[2].receive(net.now, ("10.66.6.6", 4444),
                     _forged_query("n1", "f3", issued=WALL + net.now - 3600))
    assert qs[2].stats["queries_unknown_origin"] == 1 and qs[2].stats["queries_stale"] == 1


def test_signed_clusters_refuse_forged_and_unsigned_queries_and_count_them() -> None:
    net, cores = signed_cluster(3)
    qs = with_queries(net, cores)
    p = ask(net, qs[0], "ping")
    assert sorted(p.answers) == ["n0", "n1", "n2"]  # signed queries and answers count
    assert qs[2].stats["queries_unsigned"] == 0
    cores[2].receive(net.now, ("10.66.6.6", 4444), _forged_query("n1", "u1"))
    mallory = identity("n1", life=9)  # a key that is not n1's bound one
    body = msgpack.packb([1, "s1", "n1", "ping", b"", [[], {}, ""], 2000,
                          int((WALL + net.now) * 1000), False])
    bad_sig = mallory.sign(QUERY_CONTEXT, body)
    assert bad_sig is not None
    cores[2].receive(net.now, ("10.66.6.6", 4444), encode_packet(
        [UserMessage("query", msgpack.packb(["q", body, bad_sig]))]))
    net.flush("n2")
    assert qs[2].stats["queries_forged"] == 2 and qs[2].stats["queries_answered"] == 1


def test_a_forged_answer_in_a_signed_cluster_is_refused() -> None:
    net, cores = signed_cluster(3)
    qs = with_queries(net, cores)
    qid = qs[0].start(net.now, "ping", timeout=1.0)
    body = msgpack.packb([qid, "n2", True, b"lies", "", 0, 0])
    qs[0].notify_message(net.now, msgpack.packb(["a", body, b""]))
    assert qs[0].stats["answers_forged"] == 1
    assert "n2" not in qs[0].pending[qid].answers


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.lists(st.one_of(
    st.text(max_size=5), st.binary(max_size=20), st.integers(-2**63, 2**63 - 1),
    st.none()),
    max_size=6).map(msgpack.packb)))
def test_junk_on_the_query_channel_is_counted_and_changes_nothing(junk: bytes) -> None:
    net = FakeNet(LOCAL)
    c = net.add("n0")
    q = with_queries(net, [c])[0]
    q.notify_message(0.0, junk)
    q.notify_message(0.0, msgpack.packb(["q", junk, b""]))
    q.notify_message(0.0, msgpack.packb(["a", junk, b""]))
    assert q.handle_request(0.0, "10.0.0.9", junk) is None
    assert q.stats["bad_messages"] + q.stats["answers_unexpected"] >= 3
    assert q.pending == {} and not q._held


def test_explain_gathers_every_agents_history_of_a_member_and_tells_its_story() -> None:
    from rumor.gossip.builtin_queries import explain_payload
    from rumor.gossip.explain import explain_summary

    net, cores, qs = cluster(5)
    net.run(2.0)
    net.crash("n4")
    net.run_until(lambda: all(c.members["n4"].status == Status.DEAD for c in cores[:4]),
                  limit=30)
    assert qs[0].handlers["explain"].guarded and not qs[0].handlers["ping"].guarded
    p = ask(net, qs[0], "explain", explain_payload("n4", WALL), timeout=1.0)
    assert sorted(p.answers) == ["n0", "n1", "n2", "n3"] and p.missing == []
    doc = explain_summary(p, "n4", WALL)
    assert doc["errors"] == {} and sorted(doc["agents"]) == ["n0", "n1", "n2", "n3"]
    # The core's own records say who raised the suspicion first, and who confirmed.
    raised = sorted((r.at, c.name) for c in cores[:4] for r in c.history.about("n4")
                    if r.kind == "suspect_raised" and r.by == c.name)
    assert doc["story"]["first_suspecter"] == raised[0][1]
    own = {c.name for c in cores[:4] for r in c.history.about("n4")
           if r.kind in ("suspect_raised", "suspect_confirmed") and r.by == c.name}
    assert set(doc["story"]["confirmers"]) == own - {raised[0][1]}
    assert doc["story"]["declared_by"]
    # Only the window asked for: nothing from before `since`.
    later = ask(net, qs[0], "explain", explain_payload("n4", WALL + net.now + 1), timeout=1.0)
    assert all(not explain_summary(later, "n4", 0)["agents"][a]["history"]["records"]
               for a in later.answers)


def test_explain_refuses_a_bad_payload_and_the_summary_skips_a_hostile_answer() -> None:
    from rumor.gossip.builtin_queries import explain_payload
    from rumor.gossip.explain import explain_summary

    net, _cores, qs = cluster(3)
    p = ask(net, qs[0], "explain", b"\x93junk", timeout=1.0)
    assert {a.ok for a in p.answers.values()} == {False}
    assert "explain takes [member, since]" in (p.answers["n1"].error or "")
    p = ask(net, qs[0], "explain", explain_payload("n2", WALL), timeout=1.0)
    p.answers["n1"].data = msgpack.packb({"v": 1, "records": [["x", "not a time"]]})
    doc = explain_summary(p, "n2", WALL)
    assert "n1" not in doc["agents"] and doc["errors"]["n1"].startswith("bad history")
