# layer: shell — runs keyring commands over the cluster (trio)
"""The trio side of the cluster-wide keyring commands (``keyring_commands.py``).

A command is a write query (``cluster_query.py`` waits for its answers); this module
keeps the keyring file in step with the live keyring, and refuses ``use`` of a key
some live member lacks. The rules are the core's (``refuse_use``); this module only
waits and writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .cluster_query import ClusterQueries
from .keyring import Keyring
from .keyring_commands import QUERY, KeyringCommands, Pending, key_id, outcome, refuse_use
from .keyring_file import save_keyring

log = logging.getLogger("rumor.keyring")
#: How long a command waits for every live member to answer.
ANSWER_TIMEOUT = 5.0


class ClusterKeyring:
    """Keyring commands over a running node, and the file that outlives it."""

    def __init__(self, commands: KeyringCommands, queries: ClusterQueries,
                 path: Path | None) -> None:
        self.commands = commands
        self.queries = queries
        self.path = path
        commands.on_change = self._changed

    def _changed(self, ring: Keyring) -> None:
        log.info("gossip keyring changed: %d key(s), primary %s", len(ring.keys),
                 key_id(ring.primary), extra={"event": "keyring_changed"})
        if self.path is not None:
            try:
                save_keyring(ring, self.path)
            except OSError as e:
                # The change is live; only the next restart would lose it: say so loudly.
                log.error("could not save the keyring to %s: %s", self.path, e,
                          extra={"event": "keyring_save_failed"})

    async def run(self, op: str, key: bytes | None,
                  timeout: float = ANSWER_TIMEOUT) -> tuple[Pending, list[str]]:
        """Apply ``op`` cluster-wide; the answers, and the live members that did not
        answer within ``timeout``. Raises ``KeyringError`` for a bad command and
        ``KeyringRefused`` for a ``use`` that would split the cluster."""
        if op == "use" and key is not None:
            listing, silent = await self.run("list", None, timeout)
            refuse_use(listing, silent, key)
        payload = self.commands.payload(op, key)
        done = await self.queries.run(QUERY, payload, timeout=timeout, write=True)
        return outcome(op, done), done.missing


__all__ = ["ANSWER_TIMEOUT", "ClusterKeyring"]
