# layer: shell — runs the policy service (trio)
"""The trio runtime of policy: ``PolicyRuntime`` runs beside a ``Node`` in the agent.

The sans-IO ``PolicyStore`` and ``PolicyReplicator`` decide everything; the node
assembly registered the replicator (``NodeConfig.extras``). This shell expires
documents on time, loads and writes the data directory, logs each outcome once, wakes
the node so a publish goes out at once, and keeps an ``Evaluator`` of the held
documents up to date for the proxy and the API::

    trust = TrustSet.of([load_public_key("ops.pub")])
    async with Node(NodeConfig(..., extras=[PolicyReplicator.factory(trust)])) as node:
        policies = PolicyRuntime(node.parts.extras["policy"], node.wake,
                                 data_dir="/var/lib/rumor")
        policies.start()    # before joining, so the join push-pull carries our digest
        outcome = policies.publish(envelope_bytes)
        policies.evaluator.route("web", {"x-canary": "1"})
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..gossip.delegate import Delegate
from .evaluate import Evaluator
from .persist import PolicyDirectory
from .replication import PolicyReplicator
from .store import ACCEPTED, DUPLICATE, EXPIRED, REJECTED, Held, Outcome
from .trust import TrustSet

log = logging.getLogger("rumor.policy")


class PolicyRuntime:
    """The policy documents an agent holds, kept on disk and in an ``Evaluator``."""

    def __init__(self, replicator: Delegate, wake: Callable[[], None], *,
                 data_dir: str | Path | None = None) -> None:
        """``replicator``: the node's (``node.parts.extras["policy"]``); ``wake`` asks the
        node to carry out what a publish queued (``Node.wake``)."""
        if not isinstance(replicator, PolicyReplicator):
            raise TypeError(f"expected the node's PolicyReplicator, got {replicator!r}")
        self.wake = wake
        self.replicator = replicator
        self.store = replicator.store
        self.directory = PolicyDirectory(data_dir) if data_dir is not None else None
        # The core's clock is trio's (monotonic); documents expire by the calendar.
        self._wall_offset = replicator.wall_offset
        self.replicator.on_outcome(self._on_outcome)
        self.evaluator = Evaluator([])
        self._timer: trio.CancelScope | None = None

    def start(self) -> list[str]:
        """Load the data directory. Returns what was set aside (file paths), so the
        caller can report it."""
        set_aside = self._load() if self.directory is not None else []
        self._refresh()
        return set_aside

    async def run(self) -> None:
        """Expire documents on time (owned by the agent's nursery)."""
        while True:
            with trio.CancelScope(deadline=self.replicator.next_deadline()) as scope:
                self._timer = scope
                await trio.sleep_forever()
            self._timer = None
            if self.replicator.tick(trio.current_time()):
                self._refresh()

    # ---- commands and queries ------------------------------------------------------------

    def publish(self, data: bytes, origin: str = "api") -> Outcome:
        out = self.replicator.publish(trio.current_time(), data, origin)
        self.wake()
        return out

    def refuse(self, reason: str, detail: str, data: bytes = b"",
               origin: str = "api") -> Outcome:
        """A publish refused before it was an envelope (the API's 400): counted under
        ``reason`` (``malformed`` or ``oversized``) and logged like any rejection."""
        now = trio.current_time()
        out = self.store.refuse(reason, detail, data, now=now + self._wall_offset,
                                origin=origin)
        self._on_outcome(now, out)
        return out

    def set_trust(self, trust: TrustSet) -> None:
        """Trust other publisher keys or another threshold (a configuration reload);
        documents they no longer support are dropped, from disk too."""
        for h in self.store.set_bootstrap(trio.current_time() + self._wall_offset, trust):
            self._drop_revoked(h)
        self._refresh()
        log.info("policy: %d trusted key(s), threshold %d, %d document(s) held",
                 len(trust.keys), trust.threshold, len(self.store.held),
                 extra={"event": "policy", "keys": trust.ids(),
                        "threshold": trust.threshold})

    def held(self) -> list[Held]:
        return sorted(self.store.held.values(), key=lambda h: h.envelope.name)

    def get(self, name: str) -> Held | None:
        return self.store.get(name)

    def status(self) -> dict[str, Any]:
        return {"trust": self.store.trust.to_json(),
                "stats": {**self.store.stats(), **self.replicator.stats},
                "conflicts": list(self.store.conflicts),
                "evaluator_conflicts": list(self.evaluator.conflicts),
                "rejections": self.store.recent_rejections()}

    # ---- internals --------------------------------------------------------------------------

    def _load(self) -> list[str]:
        assert self.directory is not None
        for tmp in self.directory.leftovers():
            tmp.unlink(missing_ok=True)
        set_aside: list[str] = []
        now = trio.current_time()
        for path, data in self.directory.load():
            if data is None:
                out = Outcome(REJECTED, reason="malformed", detail="unreadable or too large")
            else:
                out = self.store.offer(now + self._wall_offset, data, origin="disk")
            if out.status in (ACCEPTED, DUPLICATE):
                continue
            if out.reason == "expired":
                path.unlink(missing_ok=True)
                log.info("policy file %s has expired; removed", path,
                         extra={"event": "policy_expired", "file": str(path)})
                continue
            dest = self.directory.set_aside(path)
            set_aside.append(str(path))
            log.warning("policy file %s failed verification (%s: %s); moved to %s and not "
                        "loaded", path, out.reason, out.detail, dest,
                        extra={"event": "policy_set_aside", "file": str(path),
                               "reason": out.reason, "moved_to": str(dest)})
        held = len(self.store.held)
        if held:
            log.info("loaded %d policy document(s) from %s", held, self.directory.root,
                     extra={"event": "policy_loaded", "count": held})
        return set_aside

    def _on_outcome(self, now: float, out: Outcome) -> None:
        env = out.envelope
        if out.status == ACCEPTED and env is not None:
            if self.directory is not None:
                # A small synchronous write: publishes are rare and the fsync is what
                # makes "accepted" mean "survives a crash".
                try:
                    self.directory.save(env)
                except OSError as e:
                    log.error("cannot persist policy %s v%d: %s", env.name, env.version, e,
                              extra={"event": "policy_persist_error", "policy": env.name})
            log.info("policy %s v%d (%s) accepted", env.name, env.version, env.kind,
                     extra={"event": "policy_accepted", "policy": env.name,
                            "version": env.version, "kind": env.kind})
        elif out.status == REJECTED and out.first:
            log.warning("policy %s v%d rejected (%s): %s", out.name or "?", out.version,
                        out.reason, out.detail,
                        extra={"event": "policy_rejected", "policy": out.name,
                               "version": out.version, "reason": out.reason})
        elif out.status == EXPIRED and env is not None:
            if self.directory is not None:
                self.directory.remove(env)
            log.info("policy %s v%d expired", env.name, env.version,
                     extra={"event": "policy_expired", "policy": env.name})
        if out.conflict and out.first:
            log.warning("policy equivocation: %s", out.conflict,
                        extra={"event": "policy_conflict", "policy": out.name})
        for h in out.revoked:
            self._drop_revoked(h)
        if out.status in (ACCEPTED, EXPIRED) or out.revoked:
            self._refresh()

    def _drop_revoked(self, h: Held) -> None:
        if self.directory is not None:
            self.directory.remove(h.envelope)
        log.warning("policy %s v%d dropped: its signers are no longer trusted",
                    h.envelope.name, h.envelope.version,
                    extra={"event": "policy_revoked", "policy": h.envelope.name})

    def _refresh(self) -> None:
        self.evaluator = Evaluator(self.store.documents())
        if self._timer is not None:
            self._timer.deadline = -math.inf  # the next expiry may be sooner now
