"""The simulator's ``catalog`` scenario: the straggler it reproduced, and its fix."""

from __future__ import annotations

from rumor.simulations.scenarios import SCENARIOS, Params

OLD = ("user_retransmit_mult=4", "state_repair=false", "gossip_on_news=false")


def _run(tune: tuple[str, ...]) -> dict[str, object]:
    p = Params(nodes=30, seed=2, extra={"trials": 60, "flips": 5}, tune=tune)
    return SCENARIOS["catalog"](p, None)["result"]  # type: ignore[no-any-return]


def test_the_old_straggler_is_reproduced_and_the_fix_bounds_it() -> None:
    """Seed 2 holds a registration whose copies all went elsewhere (no node was sent
    one); with memberlist's counts and the periodic push-pull alone it took seconds.
    The same seed with today's settings puts every registration everywhere in 1 s."""
    old = _run(OLD)
    assert old["trials_with_a_node_without_copy"] >= 1
    assert old["registration_s"]["max"] > 2.0  # type: ignore[index]
    new = _run(())
    assert new["registration_s"]["max"] <= 1.0  # type: ignore[index]
    assert new["health_flip_s"]["max"] <= 1.0  # type: ignore[index]
