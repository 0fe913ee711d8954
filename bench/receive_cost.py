"""What one received gossip packet costs the membership core, in µs: the price of the
decode-time validation, flood limits and recipient-bound sealing.

Drives ``Membership.receive`` directly (no sockets) with the packets an idle or busy
cluster actually exchanges — a ping, an ack, a compound of 8 alive messages about known
members (the steady state of dissemination) — plaintext and sealed. Runs against any
tree, so the same script measures before and after::

    /work/baseline/.venv/bin/python bench/receive_cost.py --rounds 5    # before
    .venv/bin/python bench/receive_cost.py --rounds 5                   # after

Prints the median and range over rounds of the per-packet µs of each kind, as JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack

from rumor.gossip.config import LAN
from rumor.gossip.keyring import Keyring, KeyringSeal

try:
    from rumor.gossip.keyring_file import generate_key
except ImportError:  # a tree from before the keyring's file I/O left keyring.py
    from rumor.gossip.keyring import generate_key  # type: ignore[attr-defined,no-redef]
from rumor.gossip.membership import Membership
from rumor.gossip.wire import PROTOCOL_VERSION

ME = "n0"
PEERS = [f"n{i}" for i in range(1, 9)]


def _new_seal(ring: Keyring) -> Any:
    params = inspect.signature(KeyringSeal).parameters
    if "wall_offset" in params:  # the hardened tree: the shell injects time and randomness
        # The core's clock starts at 0 here; the seal maps it to calendar time.
        return KeyringSeal(ring, wall_offset=time.time(), random_bytes=os.urandom,
                           replay_capacity=10_000_000)
    return KeyringSeal(ring)


def _sealer(seal: Any) -> Callable[[bytes], bytes]:
    params = inspect.signature(seal.seal).parameters
    if "to" in params:
        return lambda data: bytes(seal.seal(1.0, data, ME))
    return lambda data: bytes(seal.seal(data))


def _core(seal: Any) -> Membership:
    core = Membership(ME, ("10.0.0.1", 7946), LAN, random.Random(1), seal=seal)
    join = bytes([PROTOCOL_VERSION]) + msgpack.packb(
        [[5, 1, n, [f"10.0.0.{i + 2}", 7946], {}] for i, n in enumerate(PEERS)])
    core.receive(0.0, ("10.0.0.2", 7946), join if seal is None else _sealer(seal)(join))
    assert len(core.members) == 9, len(core.members)
    return core


def _packets() -> dict[str, bytes]:
    v = bytes([PROTOCOL_VERSION])
    alive = [[5, 1, n, [f"10.0.0.{i + 2}", 7946], {}] for i, n in enumerate(PEERS)]
    return {"ping": v + msgpack.packb([[1, 7, ME, "n1"]]),
            "ack": v + msgpack.packb([[3, 7]]),
            "8_alive": v + msgpack.packb(alive)}


def measure(n: int, keyed: bool) -> dict[str, float]:
    seal = _new_seal(Keyring([__import__("base64").b64decode(generate_key())])) \
        if keyed else None
    out: dict[str, float] = {}
    for kind, plain in _packets().items():
        core = _core(seal)
        src = ("10.0.0.2", 7946)
        # Each sealed packet is distinct (a replay would be refused): seal them up front.
        datas = [_sealer(seal)(plain) for _ in range(n)] if seal is not None else [plain] * n
        t0 = time.perf_counter()
        for i, d in enumerate(datas):
            core.receive(1.0 + i * 1e-6, src, d)
            core.take_effects()
        out[kind] = (time.perf_counter() - t0) / n * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--packets", type=int, default=20_000)
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for keyed in (False, True):
            for kind, us in measure(args.packets, keyed).items():
                rows.setdefault(f"{'sealed' if keyed else 'plain'}/{kind}", []).append(us)
    print(json.dumps({k: {"median_us": round(statistics.median(v), 2),
                          "min_us": round(min(v), 2), "max_us": round(max(v), 2)}
                      for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
