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

from collections import Counter
from collections.abc import Callable
from typing import Any

from ...gossip.cluster_keyring import ClusterKeyring
from ...gossip.keyring import KeyringError, decode_key
from ...gossip.keyring_commands import KeyringRefused, Pending
from .router import Router
from .server import HttpError, Request, Response, json_response, read_json


def add_keyring_routes(router: Router, ring: ClusterKeyring | None) -> None:
    def need() -> ClusterKeyring:
        if ring is None:
            raise HttpError(409, "this agent runs without gossip encryption (no "
                            "--keyring); a cluster cannot switch it on while running")
        return ring

    async def run(op: str, key: bytes | None) -> tuple[Pending, list[str]]:
        try:
            return await need().run(op, key)
        except KeyringRefused as e:
            raise HttpError(409, str(e)) from None
        except KeyringError as e:
            raise HttpError(400, str(e)) from None

    async def list_keys(request: Request) -> Response:
        p, missing = await run("list", None)
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
            p, missing = await run(op, key)
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
