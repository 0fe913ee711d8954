"""Policy's trio shell on a virtual clock: a publish is accepted, persisted and routed
at once; a document expires at its calendar time (file removed, routing back to every
instance); a restart reloads what is valid and sets aside what was tampered with."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from rumor.gossip.assembly import NodeSpec, assemble
from rumor.gossip.config import LOCAL
from rumor.policy.envelope import MAX_FILE, make_payload, sign
from rumor.policy.examples import canary_route
from rumor.policy.keys import SecretKey
from rumor.policy.replication import PolicyReplicator
from rumor.policy.runtime import PolicyRuntime
from rumor.policy.store import ACCEPTED
from rumor.policy.trust import TrustSet
from rumor.proxy.api.metrics import AgentCollector
from rumor.proxy.api.policies import add_policy_routes
from rumor.proxy.api.router import Router
from rumor.proxy.api.server import HttpError, Request

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


@pytest.mark.parametrize(("body", "reason"), [
    (b"\x93garbage", "malformed"),             # msgpack that is no envelope
    (b'{"format": "nope"}', "malformed"),      # JSON that is no .signed file
    (b"", "malformed"),                        # nothing at all
    (b"x" * (MAX_FILE + 1), "oversized"),      # past the file limit, never parsed
])
def test_a_publish_that_is_no_envelope_gets_400_and_is_counted_as_rejected(
        tmp_path: Path, body: bytes, reason: str) -> None:
    """The API refuses these before the store sees them; they are rejections all the
    same: counted by reason (GET /v1/policies, /metrics) and logged."""
    async def main() -> None:
        rt, _ = _runtime(tmp_path)
        rt.start()
        router = Router()
        add_policy_routes(router, rt)
        registry = CollectorRegistry()
        registry.register(AgentCollector(policy=rt.status))
        for _ in range(2):
            with pytest.raises(HttpError) as e:
                await router(Request("PUT", "/v1/policies", body=body, client="127.0.0.1"))
            assert e.value.status == 400
        assert rt.status()["stats"]["rejected"] == {reason: 2}
        # Listed once, with its reason, count and who sent it.
        (listed,) = rt.status()["rejections"]
        assert (listed["reason"], listed["count"], listed["origin"]) == \
            (reason, 2, "api:127.0.0.1")
        text = generate_latest(registry).decode()
        assert f'rumor_policy_rejected_total{{reason="{reason}"}} 2.0' in text
        # A good publish afterwards is accepted as ever.
        assert (await router(Request("PUT", "/v1/policies", body=_envelope(None)))).status \
            == 200
    trio.run(main, clock=trio.testing.MockClock())


def test_a_reason_outside_the_bounded_set_is_refused(tmp_path: Path) -> None:
    rt, _ = _runtime(tmp_path)
    with pytest.raises(ValueError, match="unknown rejection reason"):
        rt.store.refuse("whatever-a-client-says", "")
    assert rt.store.rejections == {}
