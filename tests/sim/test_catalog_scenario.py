"""The simulator's ``catalog`` scenario: the straggler it reproduced, and its fix."""

from __future__ import annotations

from rumor.simulations.scenarios import SCENARIOS, Params

OLD = ("user_retransmit_mult=4", "state_repair=false", "gossip_on_news=false")


def _run(tune: tuple[str, ...]) -> dict[str, object]:
    p = Params(nodes=30, seed=1, extra={"trials": 60, "flips": 5}, tune=tune)
    return SCENARIOS["catalog"](p, None)["result"]  # type: ignore[no-any-return]


def test_the_old_straggler_is_reproduced_and_the_fix_bounds_it() -> None:
    """Seed 1 holds a registration whose copies all went elsewhere (no node was sent
    one); with memberlist's counts and the periodic push-pull alone it took seconds.
    The same seed with today's settings puts every registration everywhere in 1 s."""
    old = _run(OLD)
    assert old["trials_with_a_node_without_copy"] >= 1
    assert old["registration_s"]["max"] > 2.0  # type: ignore[index]
    new = _run(())
    assert new["registration_s"]["max"] <= 1.0  # type: ignore[index]
    assert new["health_flip_s"]["max"] <= 1.0  # type: ignore[index]


def test_detect_runs_the_harness_procedure() -> None:
    """``detect`` kills victims one after another, as the shared harness does; each is
    suspected before it is failed everywhere, and no live node is accused."""
    p = Params(nodes=10, seed=3, extra={"trials": 3})
    r = SCENARIOS["detect"](p, None)["result"]
    assert len(r["trials"]) == 3 and r["undetected"] == 0
    for t in r["trials"]:
        assert 0 < t["first_suspect_s"] <= t["first_failed_s"] <= t["all_failed_s"] < 30
    assert r["false_positives"]["failed_healthy"] == 0
