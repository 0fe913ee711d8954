# layer: shell — wall-clock traces for benchmarks (time)
"""Dissemination trace: which application messages went to whom, and when.

A diagnostic, off by default. The membership core calls its ``trace`` hook for every
datagram that carries application messages (catalog records, policy documents,
keyring commands), in both directions, and for every push-pull it merges; the hook
gets the message digests, so a copy can be followed from node to node. The real agent
writes the events as JSON lines with the host's monotonic clock (``rumor agent
--trace-gossip FILE``, every agent on one host shares that clock); the simulator
collects the same events with its virtual clock. Comparing the two, message by
message, is how a disagreement between simulator and cluster is pinned down.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import IO

#: ``trace(direction, peer, digests)``: direction ``"out"`` (peer: member name),
#: ``"in"`` (peer: source address) or ``"push-pull"`` (peer: member name, no digests).
GossipTrace = Callable[[str, str, list[str]], None]


def digest(packed: bytes) -> str:
    """A short name for one packed message: the same bytes on every node."""
    return hashlib.blake2b(packed, digest_size=6).hexdigest()


class TraceFile:
    """Writes trace events as JSON lines: ``{"t", "node", "dir", "peer", "msgs"}``.

    Line-buffered, so the file can be read while the agent runs: a write per datagram
    that carries application messages, affordable for a diagnostic run only."""

    def __init__(self, path: str, node: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._out: IO[str] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._node = node
        self._clock = clock

    def __call__(self, direction: str, peer: str, digests: list[str]) -> None:
        self._out.write(json.dumps({"t": round(self._clock(), 6), "node": self._node,
                                    "dir": direction, "peer": peer, "msgs": digests},
                                   separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._out.close()
