"""Policy's trio shell on a virtual clock: a publish is accepted, persisted and routed
at once; a document expires at its calendar time (file removed, routing back to every
instance); a restart reloads what is valid and sets aside what was tampered with."""

from __future__ import annotations

import random
from pathlib import Path

import trio
import trio.testing

from rumor.gossip.assembly import NodeSpec, assemble
from rumor.gossip.config import LOCAL
from rumor.policy.envelope import make_payload, sign
from rumor.policy.examples import canary_route
from rumor.policy.keys import SecretKey
from rumor.policy.replication import PolicyReplicator
from rumor.policy.runtime import PolicyRuntime
from rumor.policy.store import ACCEPTED
from rumor.policy.trust import TrustSet

KEY = SecretKey(bytes(range(32)))
WALL = 1_800_000_000.0  # the calendar time at virtual time 0


def _runtime(data_dir: Path) -> tuple[PolicyRuntime, list[int]]:
    spec = NodeSpec("me", ("10.0.0.1", 7946), LOCAL, wall_offset=WALL,
                    extras=[PolicyReplicator.factory(TrustSet.of([KEY.public]))])
    parts = assemble(spec, 0.0, random.Random(1), new_id=lambda: "id")
    wakes: list[int] = []
    return PolicyRuntime(parts.extras["policy"], lambda: wakes.append(1),
                         data_dir=data_dir), wakes


def _envelope(expires_in: float | None) -> bytes:
    now = WALL + trio.current_time()
    body = canary_route("web").encode()
    return sign(make_payload("route", "web-canary", 1, now,
                             None if expires_in is None else now + expires_in, body),
                [KEY]).encode()


def test_a_publish_is_persisted_and_routed_then_expires_on_time(tmp_path: Path) -> None:
    async def main() -> None:
        rt, wakes = _runtime(tmp_path)
        assert rt.start() == []
        async with trio.open_nursery() as n:
            n.start_soon(rt.run)
            await trio.sleep(1.0)
            out = rt.publish(_envelope(expires_in=30.0))
            assert out.status == ACCEPTED and wakes  # the node is told to send it
            assert len(list((tmp_path / "policies").glob("*.env"))) == 1
            assert rt.evaluator.route("web", {"x-canary": "1"}).rule == "testers"
            await trio.sleep(29.9)
            assert rt.get("web-canary") is not None
            await trio.sleep(0.2)  # its expiry (31 s) has passed
            assert rt.get("web-canary") is None
            assert rt.evaluator.route("web", {"x-canary": "1"}).policy is None
            assert list((tmp_path / "policies").glob("*.env")) == []
            n.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_restart_reloads_valid_documents_and_sets_aside_tampered_ones(
        tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = _runtime(tmp_path)
        rt.start()
        rt.publish(_envelope(expires_in=None))
        (path,) = (tmp_path / "policies").glob("*.env")
        again, _ = _runtime(tmp_path)
        assert again.start() == [] and again.get("web-canary") is not None
        data = bytearray(path.read_bytes())
        data[-1] ^= 1  # one flipped bit of the signature
        path.write_bytes(bytes(data))
        third, _ = _runtime(tmp_path)
        assert third.start() == [str(path)]
        assert third.get("web-canary") is None and not path.exists()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
