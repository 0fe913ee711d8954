"""The keyring commands' trio shell on a virtual clock: it waits for every live
member's answer (woken by each, no polling), gives up on silent ones at its timeout,
refuses a ``use`` that would split the cluster, and keeps the key file in step."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from rumor.gossip.cluster_keyring import ClusterKeyring
from rumor.gossip.cluster_query import ClusterQueries
from rumor.gossip.config import LOCAL
from rumor.gossip.keyring import KEY_BYTES, Keyring, KeyringSeal
from rumor.gossip.keyring_commands import KeyringCommands, KeyringRefused, key_id
from rumor.gossip.keyring_file import load_keyring
from rumor.gossip.query import Queries

from ..fakenet import FakeNet

K1, K2 = (bytes([i]) * KEY_BYTES for i in (1, 2))


def _cluster(tmp_path: Path) -> tuple[FakeNet, ClusterKeyring, list[KeyringSeal]]:
    net = FakeNet(LOCAL)
    seals = []
    cores = []
    for i in range(3):
        rng = random.Random(i)
        seal = KeyringSeal(Keyring([K1]), wall_offset=1_800_000_000.0,
                           random_bytes=lambda n, rng=rng: rng.randbytes(n))
        core = net.add(f"n{i}", seal=seal)
        seals.append(seal)
        cores.append(core)
    ids = random.Random(7)
    commands = []
    for c, s in zip(cores, seals, strict=True):
        q = Queries(c, rand_id=lambda: f"{ids.getrandbits(64):016x}",
                    wall_offset=1_800_000_000.0)
        c.register(q)
        commands.append(KeyringCommands(q, s))
    for c in cores[1:]:
        c.join(net.now, [cores[0].addr])
        net.flush(c.name)
    net.run(3.0)

    def wake() -> None:  # what Node.wake does, on the test network
        net.flush("n0")
        net.run(0.01)
    return net, ClusterKeyring(commands[0], ClusterQueries(commands[0].queries, wake),
                               tmp_path / "ring"), seals


def test_a_command_returns_as_soon_as_every_member_answered(tmp_path: Path) -> None:
    async def main() -> None:
        _net, ring, seals = _cluster(tmp_path)
        t0 = trio.current_time()
        pending, missing = await ring.run("install", K2)
        assert trio.current_time() == t0  # no polling interval, no timeout waited
        assert missing == [] and sorted(pending.answers) == ["n0", "n1", "n2"]
        assert all(K2 in s.keyring.keys for s in seals)
        assert load_keyring(tmp_path / "ring").keys == [K1, K2]  # the file follows
        listing, _ = await ring.run("list", None)
        assert {tuple(a.keys) for a in listing.answers.values()} == {
            (key_id(K1), key_id(K2))}
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_silent_member_is_missing_after_the_timeout_and_use_is_refused(
        tmp_path: Path) -> None:
    async def main() -> None:
        net, ring, seals = _cluster(tmp_path)
        net.crashed.add("n2")  # still listed alive: it has not been detected yet
        t0 = trio.current_time()
        pending, missing = await ring.run("install", K2, timeout=3.0)
        assert trio.current_time() - t0 == pytest.approx(3.0)
        assert missing == ["n2"] and sorted(pending.answers) == ["n0", "n1"]
        with pytest.raises(KeyringRefused, match="no answer from n2"):
            await ring.run("use", K2, timeout=1.0)
        assert all(s.keyring.primary == K1 for s in seals)  # nothing switched
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
