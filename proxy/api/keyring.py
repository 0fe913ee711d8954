"""Keyring routes of the local API: cluster-wide gossip key management (like Serf's).

- `GET /v1/keyring` -> `{"keys": [{"id", "members", "primary"}], "members": N,
  "answered": [...], "missing": [...], "errors": {...}}`: every key installed
  anywhere by fingerprint (`rumor keyring id KEY` computes one; key material never
  leaves an agent), on how many members and as how many members' primary.
- `PUT /v1/keyring/install|use|remove` with `{"key": BASE64}` -> the same shape
  of answer counts. 200 when every live member answered and succeeded, 500 with
  `error` otherwise (the change stays applied where it succeeded: re-run it, or
  undo it, once the missing agents are back).

An agent without `--keyring` answers 409: a cluster's encryption cannot be turned on
live, since an agent with a key cannot talk to one without.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ...gossip.keyring import Keyring, KeyringError, KeyringSeal, decode_key
from ...gossip.keyring_commands import KeyringCommands, Pending, key_id
from ...gossip.node import Node
from .router import Router
from .server import HttpError, Request, Response, json_response, read_json

log = logging.getLogger("rumor.keyring")
#: How long a command waits for every live member to answer.
ANSWER_TIMEOUT = 5.0


class ClusterKeyring:
    """The trio side of the keyring: the commands delegate, the file, the waiting."""

    def __init__(self, node: Node, seal: KeyringSeal, path: Path | None) -> None:
        self.node = node
        self.seal = seal
        self.path = path
        self.commands = KeyringCommands(node.core, seal, self._changed,
                                        rand_id=lambda: os.urandom(8).hex())
        node.register(self.commands)

    def _changed(self, ring: Keyring) -> None:
        log.info("gossip keyring changed: %d key(s), primary %s", len(ring.keys),
                 key_id(ring.primary), extra={"event": "keyring_changed"})
        if self.path is not None:
            try:
                ring.save(self.path)
            except OSError as e:
                # The change is live; only the next restart would lose it: say so loudly.
                log.error("could not save the keyring to %s: %s", self.path, e,
                          extra={"event": "keyring_save_failed"})

    async def run(self, op: str, key: bytes | None,
                  timeout: float = ANSWER_TIMEOUT) -> tuple[Pending, list[str]]:
        """Apply ``op`` cluster-wide; the answers, and the live members that did not
        answer within ``timeout``."""
        if op == "use" and key is not None:
            await self._check_installed_everywhere(key, timeout)
        try:
            cid = self.commands.start(trio.current_time(), op, key)
        except KeyringError as e:
            raise HttpError(400, str(e)) from None
        self.node.wake()
        missing: list[str] = []
        with trio.move_on_after(timeout):
            while True:
                missing = self.commands.tick(trio.current_time(), cid)
                if not missing:
                    break
                self.node.wake()  # a resend, if one was due
                await trio.sleep(0.02)
        pending = self.commands.finish(cid)
        assert pending is not None
        return pending, missing

    async def _check_installed_everywhere(self, key: bytes, timeout: float) -> None:
        """Refuse ``use`` unless every live member holds the key: the members that
        switched would send what the others cannot open, splitting the cluster."""
        p, missing = await self.run("list", None, timeout)
        lacking = p.lacking(key)
        if missing or lacking:
            parts = []
            if lacking:
                parts.append(f"not installed on {', '.join(lacking)}")
            if missing:
                parts.append(f"no answer from {', '.join(missing)}")
            raise HttpError(409, f"refusing to use the key: {'; '.join(parts)} (install it "
                            "on every member first, or the cluster would split)")


def add_keyring_routes(router: Router, ring: ClusterKeyring | None) -> None:
    def need() -> ClusterKeyring:
        if ring is None:
            raise HttpError(409, "this agent runs without gossip encryption (no "
                            "--keyring); a cluster cannot switch it on while running")
        return ring

    async def list_keys(request: Request) -> Response:
        p, missing = await need().run("list", None)
        held: Counter[str] = Counter()
        primary: Counter[str] = Counter()
        for a in p.answers.values():
            held.update(a.keys)
            if a.keys:
                primary[a.keys[0]] += 1
        keys = [{"id": k, "members": n, "primary": primary[k]}
                for k, n in held.most_common()]
        return json_response({"keys": keys, **_summary(p, missing)})

    def change(op: str) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            body = read_json(request)
            text = body.get("key") if isinstance(body, dict) else None
            if not isinstance(text, str):
                raise HttpError(400, 'expected a JSON body {"key": "BASE64"}')
            try:
                key = decode_key(text)
            except KeyringError as e:
                raise HttpError(400, str(e)) from None
            p, missing = await need().run(op, key)
            doc = _summary(p, missing)
            if missing or doc["errors"]:
                doc["error"] = (f"{op} did not reach every member: "
                                f"{len(doc['answered'])} succeeded or answered, "
                                f"{len(missing)} missing, {len(doc['errors'])} failed")
                return json_response(doc, status=500)
            return json_response(doc)
        return handler

    router.add("GET", "/v1/keyring", list_keys)
    for op in ("install", "use", "remove"):
        router.add("PUT", f"/v1/keyring/{op}", change(op))


def _summary(p: Pending, missing: list[str]) -> dict[str, Any]:
    errors = {n: a.error for n, a in sorted(p.answers.items()) if not a.ok}
    return {"op": p.op, "members": len(p.answers) + len(missing),
            "answered": sorted(p.answers), "missing": sorted(missing), "errors": errors}
