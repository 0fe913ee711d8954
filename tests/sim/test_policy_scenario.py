"""The simulator's ``policy`` scenario: the real policy store and replication delegate
on every simulated node."""

from __future__ import annotations

from rumor.simulations.scenarios import SCENARIOS, Params


def test_document_reaches_every_node_under_loss_and_run_is_reproducible() -> None:
    p = Params(nodes=200, loss=0.05, seed=4)
    a = SCENARIOS["policy"](p, None)
    b = SCENARIOS["policy"](p, None)
    res = a["result"]
    assert res["held_by"] == 200 and res["rejected"] == 0
    assert res["reach_100pct_s"] is not None and res["reach_100pct_s"] <= 5.0
    assert res["reach_50pct_s"] <= res["reach_99pct_s"] <= res["reach_100pct_s"]
    a.pop("wall"), b.pop("wall")
    assert a == b
    c = SCENARIOS["policy"](Params(nodes=200, loss=0.05, seed=5), None)
    assert c["result"]["origin"] != res["origin"] or c["result"] != res


def test_the_cli_knows_every_scenario_by_name() -> None:
    from rumor.simulations.cli import SCENARIO_NAMES
    assert set(SCENARIO_NAMES) == set(SCENARIOS) and len(SCENARIO_NAMES) == len(SCENARIOS)
