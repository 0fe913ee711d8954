"""The explain view: clock offsets, one merged timeline, and the story it tells."""

from __future__ import annotations

import math

import pytest

from rumor.gossip import history as h
from rumor.gossip.explain import estimate_offset, format_story, merge_timeline, story
from rumor.gossip.history import MemberHistory, Record, from_wire, to_wire
from rumor.gossip.query import Answer, Pending

# Each agent's clock minus the true (the asker's) clock.
OFFSETS = {"a": -5.0, "b": 2.0, "c": 0.0, "m": 3.0}


def _agents() -> dict[str, list[Record]]:
    """A synthetic story of member m, each agent's records on its own clock (true time
    plus its offset): b suspects m first; c and a confirm; m refutes (incarnation 2);
    later c suspects m again, nobody confirms, c declares it failed, a hears so."""
    hist = {name: MemberHistory(name) for name in OFFSETS}

    def rec(agent: str, t: float, kind: str, by: str, health: int, **d: h.DetailValue) -> None:
        hist[agent].record(kind, t + OFFSETS[agent], "m", by, health, **d)

    rec("b", 10.0, h.PROBE_DIRECT_FAILED, "b", 0, after=0.5, helpers=("a", "c"))
    rec("b", 10.5, h.PROBE_INDIRECT_FAILED, "b", 0, after=1.0, helpers=("a", "c"),
        nacks=0, expected_nacks=2, tcp=1)
    rec("b", 10.5, h.SUSPECT_RAISED, "b", 2, incarnation=1, confirmations=0, timeout=6.0)
    rec("a", 10.6, h.SUSPECT_HEARD, "b", 0, incarnation=1, confirmations=0, timeout=6.0)
    rec("c", 10.7, h.SUSPECT_HEARD, "b", 0, incarnation=1, confirmations=0, timeout=6.0)
    rec("c", 11.0, h.PROBE_DIRECT_FAILED, "c", 0, after=0.5, helpers=("a",))
    rec("c", 11.0, h.SUSPECT_CONFIRMED, "c", 1, incarnation=1, confirmations=1, timeout=4.0)
    rec("a", 11.1, h.SUSPECT_CONFIRMED, "c", 0, incarnation=1, confirmations=1, timeout=4.0)
    rec("b", 11.1, h.SUSPECT_CONFIRMED, "c", 1, incarnation=1, confirmations=1, timeout=4.0)
    # a's clock is 5 s behind: on the raw clocks its confirmation looks first of all.
    rec("a", 11.2, h.SUSPECT_CONFIRMED, "a", 1, incarnation=1, confirmations=2, timeout=3.0)
    rec("m", 12.0, h.REFUTED, "m", 0, accused=1, accuser="b", incarnation=2)
    rec("a", 12.1, h.REFUTE_SEEN, "m", 1, incarnation=2, was="suspect")
    rec("c", 12.2, h.REFUTE_SEEN, "m", 1, incarnation=2, was="suspect")
    rec("c", 20.0, h.SUSPECT_RAISED, "c", 3, incarnation=2, confirmations=0, timeout=6.0)
    rec("b", 20.1, h.SUSPECT_HEARD, "c", 0, incarnation=2, confirmations=0, timeout=6.0)
    rec("c", 26.0, h.DECLARED_DEAD, "c", 3, incarnation=2, after=6.0, confirmations=0)
    rec("a", 26.1, h.DEAD_HEARD, "c", 0, incarnation=2)
    rec("b", 26.2, h.DEAD_HEARD, "c", 0, incarnation=2)
    return {name: x.records() for name, x in hist.items()}


def _timeline(offsets: dict[str, float]) -> list:  # type: ignore[type-arg]
    # Through the wire, as the query carries the records (wall clock = core time here).
    answers = [(name, offsets[name], from_wire(to_wire(recs))) for name, recs in
               _agents().items()]
    return merge_timeline(answers)


def test_story_names_the_first_suspecter_confirmers_and_refutation() -> None:
    tl = _timeline(OFFSETS)
    assert [e.at for e in tl] == sorted(e.at for e in tl)
    s = story(tl, "m")
    assert s.agents == ["a", "b", "c", "m"]
    assert [ep.incarnation for ep in s.episodes] == [1, 2]
    first, second = s.episodes
    assert s.first_suspecter == first.first_suspecter == "b"
    assert math.isclose(first.suspected_at or 0, 10.5)
    assert first.suspecter_health == 2
    assert [e.kind for e in first.missed_probes] == [h.PROBE_DIRECT_FAILED,
                                                     h.PROBE_INDIRECT_FAILED]
    assert [(c.agent, round(c.at, 6), c.health, c.own) for c in first.confirmers] == [
        ("c", 11.0, 1, True), ("a", 11.2, 1, True)]
    assert s.confirmers == ["c", "a"]
    assert first.heard_by == {"a", "b", "c"}
    assert first.refuted_own and first.refuted_incarnation == 2
    assert math.isclose(first.refuted_at or 0, 12.0)
    assert first.refuted_accuser == "b" and first.refute_seen_by == {"a", "c"}
    assert not first.declared
    assert second.first_suspecter == "c" and not second.confirmers
    assert second.refuted_at is None
    assert [(d.agent, d.own, d.health) for d in second.declared] == [("c", True, 3)]
    assert second.failed_known_by == {"a", "b", "c"}
    assert s.declared_by == []  # the first suspicion was refuted


def test_without_the_clock_offsets_the_story_would_be_wrong() -> None:
    s = story(_timeline(dict.fromkeys(OFFSETS, 0.0)), "m")
    assert s.first_suspecter == "a"  # a's slow clock puts its confirmation first


def test_an_accuser_that_did_not_answer_is_named_from_hearsay() -> None:
    tl = [e for e in _timeline(OFFSETS) if e.agent != "b"]
    s = story(tl, "m")
    first = s.episodes[0]
    assert first.first_suspecter == "b" and first.suspecter_health is None
    assert first.missed_probes == []
    assert math.isclose(first.suspected_at or 0, 10.6)  # when a first heard it


def test_format_story_prints_summary_and_aligned_relative_timeline() -> None:
    tl = _timeline(OFFSETS)
    text = format_story(story(tl, "m"), tl)
    lines = text.splitlines()
    assert lines[0].startswith("explain m: 4 agent(s), 18 record(s)")
    assert "first suspected by b at +0.500s (health 2)" in text
    assert "confirmed by c at +1.000s (health 1), a at +1.200s (health 1)" in text
    assert "refuted at +2.000s with incarnation 2 (told by b)" in text
    assert "declared failed by c at +16.000s (health 3)" in text
    rows = lines[lines.index("timeline:") + 1:]
    assert len(rows) == 18 and rows[0].split()[0] == "+0.000s"
    # Aligned: the agent column starts at the same place on every row.
    assert len({row.index("  ", 4) for row in rows}) == 1


def test_format_story_elides_rumours_in_a_long_timeline() -> None:
    hist = MemberHistory("x")
    recs = {f"n{i}": [h.Record(h.SUSPECT_HEARD, 1.0 + i / 1000, "m", "n0", 0,
                               {"incarnation": 1})] for i in range(1, 300)}
    recs["n0"] = [hist.record(h.SUSPECT_RAISED, 1.0, "m", "n0", 0, incarnation=1)]
    tl = merge_timeline((a, 0.0, r) for a, r in recs.items())
    text = format_story(story(tl, "m"), tl, max_lines=40)
    assert "first suspected by n0" in text
    assert "more suspect_heard entries" in text
    assert len(text.splitlines()) < 60


@pytest.mark.parametrize(("true_offset", "out", "back", "hold"), [
    (0.0, 0.01, 0.01, 0.0), (5.0, 0.02, 0.04, 0.003), (-120.5, 0.3, 0.1, 0.05)])
def test_estimate_offset_is_ntp_and_agrees_with_the_query_core(
        true_offset: float, out: float, back: float, hold: float) -> None:
    sent = 1000.0
    received = sent + out + true_offset
    answered = received + hold
    arrived = sent + out + hold + back
    offset, bound = estimate_offset(sent, received, answered, arrived)
    assert abs(offset - true_offset) <= bound + 1e-9
    assert math.isclose(bound, (out + back) / 2)
    p = Pending("q", "explain", 50.0, 60.0, False, b"", {"x"}, sent)
    p.answers["x"] = Answer(True, received_wall=received, answered_wall=answered,
                            arrived=50.0 + (arrived - sent))
    got = p.offset("x")
    assert got is not None
    assert math.isclose(got[0], offset, abs_tol=1e-9)
    assert math.isclose(got[1], bound, abs_tol=1e-9)
