# layer: shell — rejoins after a restart (trio, time)
"""The trio shell of restart memory: the member snapshot on disk, rejoining through
it at start, and ``--retry-join``.

The decisions are pure and live elsewhere: what a snapshot holds and whom to rejoin
through (``snapshot.py``), how long to wait between retries (``backoff.py``). This
module only reads and writes the file, watches the node's membership events to know
when a write is due, and drives ``Node.join``::

    snapshots, prior = open_snapshot(Path("/var/lib/rumor"), node.name)
    keeper = SnapshotKeeper(node, snapshots)
    nursery.start_soon(keeper.run)            # rewrites the file as members change
    await join_at_start(node, seeds, prior, rng)   # seeds, else the snapshot
    nursery.start_soon(retry_join, node, seeds, 30.0, rng)
    ...
    await node.leave(); await keeper.close(left=True)
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from .address import format_address
from .backoff import retry_delay
from .files import write_atomic
from .node import JoinError, Node
from .snapshot import (
    MAX_SNAPSHOT_BYTES,
    SNAPSHOT_INTERVAL,
    Remembered,
    Snapshot,
    SnapshotError,
    WriteSchedule,
    decode_snapshot,
    encode_snapshot,
    rejoin_batches,
)
from .wire import Address

log = logging.getLogger("rumor.gossip")

#: The snapshot's name in the data directory (beside ``policies/``).
SNAPSHOT_FILE = "members.json"


class SnapshotFile:
    """``DATA_DIR/members.json``: read once at start, rewritten atomically."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / SNAPSHOT_FILE

    def load(self) -> Snapshot | None:
        """The snapshot, or None when there is none yet; ``SnapshotError`` (naming the
        file) when it cannot be read or is not a snapshot."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_SNAPSHOT_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SnapshotError(f"{self.path}: {e.strerror or e}") from None
        try:
            return decode_snapshot(data)
        except SnapshotError as e:
            raise SnapshotError(f"{self.path}: {e}") from None

    def save(self, snap: Snapshot) -> None:
        write_atomic(self.path, encode_snapshot(snap))


class SnapshotKeeper:
    """Keeps the snapshot in step with the node's live members (owned by the agent's
    nursery): a membership event marks it stale, ``WriteSchedule`` says when to write,
    and a write that would not change the members is skipped."""

    def __init__(self, node: Node, file: SnapshotFile, *,
                 interval: float = SNAPSHOT_INTERVAL,
                 written: Snapshot | None = None) -> None:
        """``written``: what the file holds now (skips rewriting the same members)."""
        self.node = node
        self.file = file
        self.schedule = WriteSchedule(interval)
        self._written = (written.members, written.left) if written is not None else None
        self._lock = trio.Lock()
        self._closed = False
        self._failing = False
        self.writes = 0

    def members(self) -> tuple[Remembered, ...]:
        """The live members other than this node, by name."""
        me = self.node.name
        return tuple(Remembered(m.name, m.addr, m.cred.raw if m.cred else None)
                     for m in sorted(self.node.core.members.values(), key=lambda m: m.name)
                     if m.live and m.name != me)

    async def run(self) -> None:
        events = self.node.subscribe()
        while True:
            with trio.move_on_at(self.schedule.due_at()) as scope:
                async for _ in events:
                    self.schedule.changed()
                    scope.deadline = self.schedule.due_at()
                return  # the node has stopped
            await self._write(left=False)

    async def close(self, *, left: bool) -> None:
        """The last write (at a graceful leave, ``left=True``); no write follows."""
        await self._write(left=left)
        self._closed = True

    async def _write(self, *, left: bool) -> None:
        async with self._lock:
            if self._closed:
                return
            self.schedule.wrote(trio.current_time())
            members = self.members()
            if not members and self._written is not None:
                # Alone: after a whole-cluster outage or a rejoin nobody answered, the
                # remembered members are still the best way back. Forgetting them
                # here would leave the next start nothing to rejoin through.
                members = self._written[0]
            if self._written == (members, left):
                return
            snap = Snapshot(self.node.name, members, left, saved_at=time.time())
            try:
                # fsync may take tens of milliseconds: not on the gossip loop's time.
                await trio.to_thread.run_sync(self.file.save, snap)
            except OSError as e:
                if not self._failing:  # once until a write succeeds again
                    log.warning("cannot write the member snapshot %s: %s (the agent "
                                "runs on; it will not remember these members)",
                                self.file.path, e.strerror or e,
                                extra={"event": "snapshot_error"})
                self._failing = True
                self.schedule.changed()  # try again at the next slot
                return
            if self._failing:
                log.info("the member snapshot %s is written again", self.file.path,
                         extra={"event": "snapshot_ok"})
            self._failing = False
            self._written = (members, left)
            self.writes += 1
            log.debug("member snapshot: %d member(s)%s", len(members),
                      ", left" if left else "",
                      extra={"event": "snapshot", "members": len(members), "left": left})


def open_snapshot(data_dir: Path, name: str) -> tuple[SnapshotFile, Snapshot | None]:
    """The data directory's snapshot file (the directory made if missing; OSError if
    it cannot be) and what it holds. A snapshot that cannot be read is one warning:
    the agent starts as if it had none."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    snapshots = SnapshotFile(data_dir)
    try:
        prior = snapshots.load()
    except SnapshotError as e:
        log.warning("ignoring the member snapshot: %s", e,
                    extra={"event": "snapshot_ignored", "path": str(snapshots.path)})
        return snapshots, None
    if prior is not None and prior.node != name:
        log.warning("the member snapshot %s was written by agent %s, this is %s: "
                    "rejoining through its members all the same", snapshots.path,
                    prior.node, name, extra={"event": "snapshot_other_node"})
    return snapshots, prior


async def join_at_start(node: Node, seeds: Sequence[str | Address], prior: Snapshot | None,
                        rng: random.Random, *, rejoin_after_leave: bool = False,
                        ) -> tuple[int | None, list[Address]]:
    """Join ``seeds``; when none answers or none is given, rejoin through ``prior``'s
    members. Returns how many answered (None: none was tried, or none answered) and
    the remembered members to keep trying in the background (when none of them
    answered). Raises ``JoinError`` only when seeds were given and neither they nor a
    remembered member answered; without seeds the agent runs alone meanwhile."""
    failure: JoinError | None = None
    if seeds:
        try:
            n = await node.join(seeds)
        except JoinError as e:
            failure = e
        else:
            log.info("joined through %d of %d seed(s)", n, len(seeds),
                     extra={"event": "joined", "seeds": list(seeds), "contacted": n})
            return n, []
    if prior is not None and prior.members:
        batches = rejoin_batches(prior, node.name, node.address, rng,
                                 rejoin_after_leave=rejoin_after_leave)
        remembered = sum(len(b) for b in batches)
        if prior.left and not rejoin_after_leave:
            log.info("this agent left its cluster gracefully last time: not rejoining "
                     "through the %d remembered member(s) (--rejoin-after-leave would)",
                     len(prior.members), extra={"event": "rejoin_skipped"})
        elif remembered:
            log.info("rejoining through %d remembered member(s)%s", remembered,
                     " (no --join seed answered)" if failure else "",
                     extra={"event": "rejoining", "remembered": remembered})
            n = await rejoin(node, batches)
            if n:
                log.info("rejoined through %d remembered member(s)", n,
                         extra={"event": "joined", "rejoined": True, "contacted": n})
                return n, []
            alone = failure is None
            log.warning("no remembered member answered (%d tried)%s", remembered,
                        ": running alone, and trying them again in the background"
                        if alone else "",
                        extra={"event": "rejoin_failed", "remembered": remembered})
            if alone:
                return None, [a for b in batches for a in b]
    if failure is not None:
        raise failure
    return None, []


async def rejoin(node: Node, batches: Sequence[Sequence[Address]]) -> int:
    """Join through the remembered members, one batch at a time (one round each),
    until one answers; how many of that batch answered (0: none did)."""
    for batch in batches:
        try:
            return await node.join(list(batch), attempts=1)
        except JoinError as e:
            log.debug("rejoin through %s: %s", ", ".join(map(format_address, batch)), e)
    return 0


async def retry_join(node: Node, seeds: Sequence[str | Address], interval: float,
                     rng: random.Random, *, per_round: int | None = None) -> int:
    """Try ``seeds`` until one answers, forever, waiting ``retry_delay`` between
    rounds; how many answered. Each failed round is logged with the next try's time.
    ``per_round``: try only that many of them, drawn afresh each round (a long list of
    remembered members must not become a push-pull with every one at once)."""
    addrs = list(seeds)
    shown = ", ".join(a if isinstance(a, str) else format_address(a) for a in addrs)
    if len(shown) > 300:
        shown = f"{len(addrs)} addresses"
    failures = 0
    while True:
        batch = addrs if per_round is None or len(addrs) <= per_round \
            else rng.sample(addrs, per_round)
        try:
            n = await node.join(batch, attempts=1)
        except JoinError as e:
            failures += 1
            delay = retry_delay(failures, interval, rng)
            at = time.strftime("%H:%M:%SZ", time.gmtime(time.time() + delay))
            log.info("retry-join round %d: %s; next try in %.1f s, at %s", failures,
                     _short(str(e)), delay, at,
                     extra={"event": "retry_join", "seeds": shown, "failures": failures,
                            "next_in_s": round(delay, 3)})
            await trio.sleep(delay)
            continue
        log.info("retry-join: joined through %d of %d seed(s) after %d failed round(s)",
                 n, len(addrs), failures,
                 extra={"event": "joined", "seeds": shown, "contacted": n,
                        "failures": failures})
        return n


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["SNAPSHOT_FILE", "SnapshotFile", "SnapshotKeeper", "join_at_start",
           "open_snapshot", "rejoin", "retry_join"]
