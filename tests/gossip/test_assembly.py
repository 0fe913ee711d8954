"""One node assembly: a simulated node and a real ``Node`` are built by the same
function, so they run the same delegates in the same order (only the clock and the
network differ), and a simulated restart brings them all back."""

from __future__ import annotations

import os
import random

import trio

from rumor.gossip.assembly import NodeSpec, assemble
from rumor.gossip.catalog import Catalog
from rumor.gossip.config import LOCAL
from rumor.gossip.keyring import Keyring, KeyringSeal
from rumor.gossip.keyring_commands import KeyringCommands
from rumor.gossip.node import Node, NodeConfig
from rumor.policy.keys import SecretKey
from rumor.policy.replication import PolicyReplicator
from rumor.policy.trust import TrustSet
from rumor.simulations.engine import Simulator
from rumor.simulations.network import PROFILE_LATENCY, Network

TRUST = TrustSet.of([SecretKey(bytes(range(32))).public])


def _shape(delegates: dict[str, object]) -> list[tuple[str, str]]:
    return [(channel, type(d).__name__) for channel, d in delegates.items()]


def test_a_simulated_node_and_a_real_one_run_the_same_delegates() -> None:
    extras = [PolicyReplicator.factory(TRUST)]

    async def real() -> list[tuple[str, str]]:
        cfg = NodeConfig(name="real", bind=("127.0.0.1", 0), gossip=LOCAL, extras=extras)
        async with Node(cfg) as node:
            return _shape(node.core.delegates)

    sim = Simulator(LOCAL, Network(PROFILE_LATENCY["local"]), seed=1, extras=extras)
    idx = sim.add_node()
    simulated = _shape(sim.nodes[idx].core.delegates)
    assert simulated == trio.run(real) == [("catalog", "Catalog"),
                                           ("catalog-signed", "_SignedChannel"),
                                           ("query", "Queries"),
                                           ("policy", "PolicyReplicator")]
    sim.restart(idx, [])  # a new life is assembled again, delegates and all
    assert _shape(sim.nodes[idx].core.delegates) == simulated
    assert sim.nodes[idx].parts.core is sim.nodes[idx].core


def test_an_encrypted_node_also_runs_the_keyring_commands() -> None:
    seal = KeyringSeal(Keyring([os.urandom(32)]), wall_offset=0.0, random_bytes=os.urandom)
    spec = NodeSpec("n", ("10.0.0.1", 7946), LOCAL, seal=seal,
                    extras=[PolicyReplicator.factory(TRUST)])
    parts = assemble(spec, 0.0, random.Random(1), new_id=lambda: "id")
    assert _shape(parts.core.delegates) == [("catalog", "Catalog"),
                                            ("catalog-signed", "_SignedChannel"),
                                            ("query", "Queries"),
                                            ("keyring", "LegacyKeyringChannel"),
                                            ("policy", "PolicyReplicator")]
    assert isinstance(parts.catalog, Catalog) and isinstance(parts.keyring, KeyringCommands)
    assert parts.queries.handlers["keyring"].write  # the commands are a write query
    assert parts.extras["policy"].channel == "policy"


def test_the_catalog_epoch_is_calendar_microseconds() -> None:
    spec = NodeSpec("n", ("10.0.0.1", 7946), LOCAL, wall_offset=1_800_000_000.0)
    parts = assemble(spec, 5.0, random.Random(1), new_id=lambda: "id")
    assert parts.catalog.epoch == 1_800_000_005_000_000
