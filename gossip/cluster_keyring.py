# layer: shell — runs keyring commands over the cluster (trio)
"""The trio side of the cluster-wide keyring commands (``keyring_commands.py``).

It starts a command, waits for the answers (woken by each, and at the core's resend
times; no polling), keeps the keyring file in step with the live keyring, and
refuses ``use`` of a key some live member lacks. The rules are the core's
(``refuse_use``); this module only waits and writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from .keyring import Keyring
from .keyring_commands import KeyringCommands, Pending, key_id, refuse_use
from .keyring_file import save_keyring

log = logging.getLogger("rumor.keyring")
#: How long a command waits for every live member to answer.
ANSWER_TIMEOUT = 5.0


class ClusterKeyring:
    """Keyring commands over a running node, and the file that outlives it. ``wake``
    asks the node to carry out what the commands queued (``Node.wake``)."""

    def __init__(self, commands: KeyringCommands, path: Path | None,
                 wake: Callable[[], None]) -> None:
        self.wake = wake
        self.commands = commands
        self.path = path
        self._answered: dict[str, trio.Event] = {}
        commands.on_change = self._changed
        commands.on_answer = self._answer

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

    def _answer(self, cid: str) -> None:
        event = self._answered.get(cid)
        if event is not None:
            event.set()

    async def run(self, op: str, key: bytes | None,
                  timeout: float = ANSWER_TIMEOUT) -> tuple[Pending, list[str]]:
        """Apply ``op`` cluster-wide; the answers, and the live members that did not
        answer within ``timeout``. Raises ``KeyringError`` for a bad command and
        ``KeyringRefused`` for a ``use`` that would split the cluster."""
        if op == "use" and key is not None:
            listing, silent = await self.run("list", None, timeout)
            refuse_use(listing, silent, key)
        cid = self.commands.start(trio.current_time(), op, key)
        self.wake()
        missing: list[str] = []
        with trio.move_on_after(timeout):
            while True:
                self._answered[cid] = answered = trio.Event()
                missing = self.commands.tick(trio.current_time(), cid)
                self.wake()  # a resend, if one was due
                if not missing:
                    break
                with trio.move_on_at(self.commands.resend_at(cid)):
                    await answered.wait()
        self._answered.pop(cid, None)
        pending = self.commands.finish(cid)
        assert pending is not None
        return pending, missing


__all__ = ["ANSWER_TIMEOUT", "ClusterKeyring"]
