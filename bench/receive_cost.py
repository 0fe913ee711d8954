"""What one received gossip packet costs the membership core, in µs: the price of the
decode-time validation, flood limits, recipient-bound sealing and signed membership.

Drives ``Membership.receive`` directly (no sockets) with the packets an idle or busy
cluster actually exchanges — a ping, an ack, a compound of 8 alive messages about known
members (the steady state of dissemination: ``8_alive``, the same statements again),
8 alives that are news (``8_alive_news``: each packet raises every incarnation) —
plaintext and sealed. Runs against any tree, so the same script measures before and
after::

    /tmp/base-lead/.venv/bin/python bench/receive_cost.py --rounds 5    # before
    .venv/bin/python bench/receive_cost.py --rounds 5                   # after

On a tree with signed membership (``rumor.gossip.identity``; found by feature
detection, so the old tree runs the rest) it also measures, in ``require`` mode with
node credentials signed by a mesh CA (``rumor ca``: ECDSA P-256) and plaintext gossip:

* ``require/ping``, ``require/ack``: the probes, for the mode's base cost;
* ``require/8_signed_alive``: 8 ``SignedAlive`` (credential by reference, as every
  alive after a life's first) repeated — the steady state, the same statement again;
* ``require/8_signed_news_cached``: 8 signed alives that are news to this core but
  whose signatures the process verified already (the verification cache hit: the
  simulator's case, or an agent that held the statement before);
* ``require/8_signed_news_fresh``: 8 fresh signatures per packet (cache miss: 8
  Ed25519 verifications). The per-source verification budget is lifted for this
  run (``verify_burst``), else it would refuse all but the first 400;
* ``credential_ca_verify_us``: one CA credential check (a member's first alive).

And the cost of a push-pull merge (``handle_stream`` of a peer's push-pull frame:
decode, our reply, merge) of 30 and 1,000 members (``--pp-sizes``): ``pp<N>/first``
into a core that knows none of them (a join; caches cleared, so in ``require`` every
member costs a credential and a signature check), ``pp<N>/repeat`` the same state
again (the periodic push-pull of a quiet cluster), plain on every tree and with the
``identity`` channel in ``require``. ``pp<N>/first`` also reports how many members the
merge bound (``members_after``) and why some did not (``stats``)::

    .venv/bin/python bench/receive_cost.py --rounds 5 --pp-sizes 30,1000

Prints the median and range over rounds of the per-packet (per-merge) µs of each kind,
as JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import tempfile
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
from rumor.gossip.wire import PROTOCOL_VERSION, MemberState, PushPull, Status, encode_packet

try:  # signed membership (issue 27): absent from the trees before it
    from rumor.gossip import identity as _identity_mod
    from rumor.gossip import node_key as _node_key_mod
    from rumor.gossip import wire as _wire_mod
    from rumor.gossip.identity import ALIVE_CONTEXT, Identity
    from rumor.gossip.node_key import (
        CREDENTIAL_CONTEXT,
        NodeKey,
        credential_payload,
        encode_credential,
    )
    from rumor.gossip.signed_state import IDENTITY_CHANNEL
    from rumor.gossip.wire import Alive, SignedAlive, pack_message
    SIGNED = True
except ImportError:
    SIGNED = False

ME = "n0"
PEERS = [f"n{i}" for i in range(1, 9)]
SRC = ("10.0.0.2", 7946)


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


def _alive_rows(inc: int = 1) -> list[list[Any]]:
    return [[5, inc, n, [f"10.0.0.{i + 2}", 7946], {}] for i, n in enumerate(PEERS)]


def _core(seal: Any) -> Membership:
    core = Membership(ME, ("10.0.0.1", 7946), LAN, random.Random(1), seal=seal)
    join = bytes([PROTOCOL_VERSION]) + msgpack.packb(_alive_rows())
    core.receive(0.0, SRC, join if seal is None else _sealer(seal)(join))
    _admit(core)
    assert len(core.members) == 9, len(core.members)
    return core


def _admit(core: Membership) -> None:
    """Answer the admission pings of a plaintext core (trees after issue 27 admit a
    name heard from a third party only once it answered a direct ping)."""
    pending = getattr(core, "_pending", None)
    for p in list((pending or {}).values()):
        core.receive(0.5, p.alive.addr,
                     bytes([PROTOCOL_VERSION]) + msgpack.packb([[3, p.seq]]))
    core.take_effects()


def _packets() -> dict[str, bytes]:
    v = bytes([PROTOCOL_VERSION])
    return {"ping": v + msgpack.packb([[1, 7, ME, "n1"]]),
            "ack": v + msgpack.packb([[3, 7]]),
            "8_alive": v + msgpack.packb(_alive_rows())}


def _run(core: Membership, datas: list[bytes]) -> float:
    t0 = time.perf_counter()
    for i, d in enumerate(datas):
        core.receive(1.0 + i * 1e-6, SRC, d)
        core.take_effects()
    return (time.perf_counter() - t0) / len(datas) * 1e6


def measure(n: int, keyed: bool) -> dict[str, float]:
    seal = _new_seal(Keyring([__import__("base64").b64decode(generate_key())])) \
        if keyed else None
    out: dict[str, float] = {}
    for kind, plain in _packets().items():
        # Each sealed packet is distinct (a replay would be refused): seal them up front.
        datas = [_sealer(seal)(plain) for _ in range(n)] if seal is not None else [plain] * n
        out[kind] = _run(_core(seal), datas)
    v = bytes([PROTOCOL_VERSION])
    news = [v + msgpack.packb(_alive_rows(2 + i)) for i in range(n)]
    if seal is not None:
        news = [_sealer(seal)(d) for d in news]
    out["8_alive_news"] = _run(_core(seal), news)
    return out


# ---- signed membership (new trees only) -------------------------------------------------

class _Signed:
    """A mesh CA, node keys and CA-signed credentials for ``ME``, ``PEERS`` and the
    push-pull members (made once; ECDSA signing is the slow part)."""

    def __init__(self, names: list[str]) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        from rumor.proxy.ca import _load_ca, init_ca
        from rumor.proxy.node_credential import CA_SIGNER, CaAuthority
        d = tempfile.mkdtemp(prefix="rc-ca-")
        crt, _ = init_ca(__import__("pathlib").Path(d), "bench")
        _, ca_key, cluster = _load_ca(__import__("pathlib").Path(d))
        self.authority = CaAuthority.from_cert_file(crt)
        self.keys: dict[str, Any] = {}
        self.creds: dict[str, bytes] = {}
        for name in [ME, *PEERS, *names]:
            k = NodeKey.from_seed(f"bench:{name}".encode())
            payload = credential_payload(cluster, name, k.public, 1)
            sig = ca_key.sign(CREDENTIAL_CONTEXT + payload, ec.ECDSA(hashes.SHA256()))
            self.keys[name] = k
            self.creds[name] = encode_credential("ca", payload, [(CA_SIGNER, sig)])

    def identity(self) -> Any:
        ident = Identity(mode="require", key=self.keys[ME], credential=self.creds[ME],
                         authority=self.authority)
        ident.verify_burst = ident.verify_rate = 1e12  # measure verification, not refusal
        return ident

    def signed(self, name: str, inc: int, addr: tuple[str, int], cred: bool) -> Any:
        a = Alive(inc, name, addr, {})
        body = pack_message(a)
        sig = self.keys[name].sign(ALIVE_CONTEXT + body)
        return SignedAlive(a, body, sig, self.creds[name] if cred else b"")

    def packet(self, inc: int, cred: bool = False) -> bytes:
        return bytes(encode_packet([self.signed(n, inc, (f"10.0.0.{i + 2}", 7946), cred)
                                    for i, n in enumerate(PEERS)]))

    def core(self) -> Membership:
        core = Membership(ME, ("10.0.0.1", 7946), LAN, random.Random(1),
                          identity=self.identity())
        core.receive(0.0, SRC, self.packet(1, cred=True))
        assert len(core.members) == 9, (len(core.members), core.stats)
        return core


def _clear_caches() -> None:
    """Forget every process-wide cache a fresh statement would miss."""
    _identity_mod.clear_caches()
    _wire_mod._SEEN.clear()
    _node_key_mod._DECODED.clear()
    _node_key_mod._VERIFY_KEYS.clear()


def measure_signed(n: int, sk: _Signed, round_no: int) -> dict[str, float]:
    out: dict[str, float] = {}
    _clear_caches()
    for kind, data in _packets().items():
        if kind != "8_alive":
            out[kind] = _run(sk.core(), [data] * n)
    out["8_signed_alive"] = _run(sk.core(), [sk.packet(1)] * n)
    # Incarnations unique to the round, so no signature is cached from an earlier one.
    base = 10 + round_no * (n + 1)
    news = [sk.packet(base + i) for i in range(n)]
    fresh, cached = sk.core(), sk.core()
    _clear_caches()
    out["8_signed_news_fresh"] = _run(fresh, news)
    out["8_signed_news_cached"] = _run(cached, news)
    assert fresh.members["n1"].incarnation == base + n - 1, fresh.stats
    assert cached.members["n1"].incarnation == base + n - 1, cached.stats
    c = _node_key_mod.decode_credential(sk.creds["n1"])
    t0 = time.perf_counter()
    for _ in range(200):
        sk.authority.vouches(c)
    out["credential_ca_verify_us"] = (time.perf_counter() - t0) / 200 * 1e6
    return out


# ---- push-pull merges ---------------------------------------------------------------------

def _pp_names(size: int) -> list[str]:
    return [f"m{i:04d}" for i in range(size)]


def _pp_addr(i: int) -> tuple[str, int]:
    return (f"10.1.{i // 250}.{i % 250 + 1}", 7946)


def _pp_body(size: int, sk: _Signed | None) -> bytes:
    names = _pp_names(size)
    states = tuple(MemberState(n, _pp_addr(i), 1, Status.ALIVE, {})
                   for i, n in enumerate(names))
    user: dict[str, bytes] = {}
    if sk is not None:
        items = []
        for i, n in enumerate(names):
            s = sk.signed(n, 1, _pp_addr(i), cred=True)
            items.append(msgpack.packb([SignedAlive.TYPE, s.body, s.sig, s.credential]))
        user[IDENTITY_CHANNEL] = msgpack.packb(items)
    return bytes(encode_packet([PushPull(False, names[0], states, user)]))


def measure_pp(size: int, reps: int, sk: _Signed | None) -> dict[str, Any]:
    body = _pp_body(size, sk)
    src = (_pp_addr(0)[0], 7946)
    first: list[float] = []
    repeat: list[float] = []
    core: Membership | None = None
    for _ in range(reps):
        if sk is not None:
            _clear_caches()
            core = Membership(ME, ("10.0.0.1", 7946), LAN, random.Random(1),
                              identity=sk.identity())
        else:
            core = Membership(ME, ("10.0.0.1", 7946), LAN, random.Random(1))
        data = bytes(bytearray(body))  # a frame read from a socket: new bytes
        t0 = time.perf_counter()
        core.handle_stream(1.0, src, data)
        core.take_effects()
        _admit(core)  # (outside the timing: a round trip each, as a real join)
        first.append((time.perf_counter() - t0) * 1e6)
    assert core is not None
    members_after = len(core.members)
    stats = {k: v for k, v in core.stats.items() if v and (
        "sign" in k or "bind" in k or "identity" in k or "throttl" in k or "pin" in k)}
    for r in range(reps):
        data = bytes(bytearray(body))
        t0 = time.perf_counter()
        core.handle_stream(2.0 + r, src, data)
        core.take_effects()
        repeat.append((time.perf_counter() - t0) * 1e6)
    return {"first_us": statistics.median(first), "repeat_us": statistics.median(repeat),
            "members_after": members_after, "frame_bytes": len(body), "stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--packets", type=int, default=20_000)
    ap.add_argument("--signed-packets", type=int, default=4_000,
                    help="packets per signed kind (each fresh one costs 8 signatures)")
    ap.add_argument("--pp-sizes", default="30,1000",
                    help="push-pull sizes, comma-separated ('' for none)")
    ap.add_argument("--pp-reps", type=int, default=0,
                    help="merges per size and round (default 60000/size, at least 3)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.pp_sizes.split(",") if x]
    sk = _Signed(_pp_names(max(sizes, default=0))) if SIGNED else None
    rows: dict[str, list[float]] = {}
    extra: dict[str, Any] = {"tree_has_signed_membership": SIGNED}
    for r in range(args.rounds):
        for keyed in (False, True):
            for kind, us in measure(args.packets, keyed).items():
                rows.setdefault(f"{'sealed' if keyed else 'plain'}/{kind}", []).append(us)
        if sk is not None:
            for kind, us in measure_signed(args.signed_packets, sk, r).items():
                rows.setdefault(f"require/{kind}", []).append(us)
        for size in sizes:
            reps = args.pp_reps or max(3, 60_000 // size)
            modes: list[tuple[str, _Signed | None]] = [("plain", None)]
            if sk is not None:
                modes.append(("require", sk))
            for mode, s in modes:
                got = measure_pp(size, reps, s)
                rows.setdefault(f"{mode}/pp{size}/first", []).append(got["first_us"])
                rows.setdefault(f"{mode}/pp{size}/repeat", []).append(got["repeat_us"])
                extra[f"{mode}/pp{size}"] = {k: got[k] for k in
                                             ("members_after", "frame_bytes", "stats")}
    out: dict[str, Any] = {k: {"median_us": round(statistics.median(v), 2),
                               "min_us": round(min(v), 2), "max_us": round(max(v), 2)}
                           for k, v in rows.items()}
    out.update(extra)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
