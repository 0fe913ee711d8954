"""`rumor sim crash --explain`: the story told from the simulated nodes' histories
agrees with what the simulator itself saw (its member events, recorded apart)."""

from __future__ import annotations

import pytest

from rumor.gossip.effects import MemberEvent
from rumor.simulations import cli
from rumor.simulations.scenarios import Params, capture_sims, crash, explain


def _run(seed: int) -> tuple[dict, list]:  # type: ignore[type-arg]
    events: list[tuple[float, str, MemberEvent]] = []
    with capture_sims() as sims:
        # Listen beside the scenario's own recorder: every member event of every node.
        import rumor.simulations.scenarios as sc
        make = sc.make_sim

        def spy(*a, **kw):  # type: ignore[no-untyped-def]
            sim, rec = make(*a, **kw)
            inner = sim.on_member

            def both(now: float, idx: int, e: MemberEvent) -> None:
                events.append((now, sim.nodes[idx].name, e))
                if inner is not None:
                    inner(now, idx, e)
            sim.on_member = both
            return sim, rec
        sc.make_sim = spy
        try:
            report = crash(Params(nodes=40, seed=seed, duration=30.0))
        finally:
            sc.make_sim = make
    return report, [sims[-1], events]


@pytest.mark.parametrize("seed", [3, 11])
def test_story_of_a_crash_matches_the_simulators_own_events(seed: int) -> None:
    report, (sim, events) = _run(seed)
    victim = report["result"]["victims"][0]
    s, _timeline = explain(sim, victim)
    suspects = sorted((t, who) for t, who, e in events
                      if e.name == victim and e.kind == "suspect")
    failed = {who for _, who, e in events if e.name == victim and e.kind == "failed"}
    assert suspects and failed
    # The first node anywhere to mark the victim suspect is the one whose own probe
    # failed first: the story's first suspecter, at that very time.
    first_t, first_who = suspects[0]
    assert s.first_suspecter == first_who
    ep = s.episodes[0]
    assert ep.suspected_at == first_t
    assert [e.kind for e in ep.missed_probes] == ["probe_direct_failed",
                                                  "probe_indirect_failed"]
    assert all(e.agent == first_who for e in ep.missed_probes)
    assert ep.heard_by == {who for _, who in suspects}
    assert ep.failed_known_by == failed
    assert ep.refuted_at is None and ep.declared
    assert report["result"]["detection"]["first_suspicion_s"]["count"] == 1
    # Independent confirmations: distinct, not the first suspecter.
    names = [c.agent for c in ep.confirmers]
    assert first_who not in names and len(set(names)) == len(names) >= 1


def test_sim_cli_prints_the_story(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["crash", "--nodes", "20", "--seed", "5", "--duration", "20",
                   "--explain", "victim"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "explain n" in out and "first suspected by" in out and "timeline:" in out
    assert cli.main(["crash", "--nodes", "20", "--seed", "5", "--duration", "5",
                     "--explain", "nobody"]) == 2
