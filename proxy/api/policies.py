"""Policy routes of the local API.

- `GET /v1/policies` -> `{"documents": [...], "trust": {...}, "stats": {...},
  "conflicts": [...], "rejections": [...]}`: every held document's header (name, kind,
  version, issued, expires, digest, signers, origin), the trusted key set, accept/reject
  counters by reason, recent equivocations, and the last 32 distinct rejections with
  their reasons (newest first).
- `GET /v1/policies/NAME` -> one document's header plus its TOML `document` text;
  `?raw=1` answers the envelope bytes themselves (`application/x-rumor-envelope`),
  which `rumor policy publish` or `verify` accept anywhere else.
- `PUT /v1/policies` with a body holding an envelope (raw bytes or a `.signed`
  file, sent as `application/x-rumor-envelope`) -> 200 `{"status": "accepted" |
  "duplicate", ...}`; a rejected document gets 422 `{"error": "...", "reason": CODE,
  ...}` and is not forwarded; a body that is not an envelope at all gets 400 and is
  counted as a rejection too (`malformed`, or `oversized` past the file limit). The
  agent never signs: the signature must already be there (the CLI signs locally).
- `GET /v1/evaluate/SERVICE?source=S&header.NAME=VALUE` -> what the proxy would apply
  to a request for SERVICE: route (subset weights, matched rule), resilience settings,
  and whether source S may call it; `holds=A,B` asks for a caller whose certificate
  names A and B (judged by both unless it declares one with `source`).
"""

from __future__ import annotations

from typing import Any, Protocol

from ...policy.envelope import MAX_FILE, EnvelopeError, read_envelope_file
from ...policy.evaluate import Evaluator, parse_query, split_target
from ...policy.store import REJECTED, Held, Outcome
from .router import Router
from .server import HttpError, Request, Response, json_response

ENVELOPE_TYPE = "application/x-rumor-envelope"


class PolicyApi(Protocol):
    """The part of `rumor.policy.runtime.PolicyRuntime` the routes use."""

    evaluator: Evaluator

    def publish(self, data: bytes, origin: str = "api") -> Outcome: ...

    def refuse(self, reason: str, detail: str, data: bytes = b"",
               origin: str = "api") -> Outcome: ...

    def held(self) -> list[Held]: ...

    def get(self, name: str) -> Held | None: ...

    def status(self) -> dict[str, Any]: ...


def add_policy_routes(router: Router, policies: PolicyApi) -> None:
    async def list_policies(request: Request) -> Response:
        return json_response({"documents": [h.to_json() for h in policies.held()],
                              **policies.status()})

    async def show(request: Request) -> Response:
        name = request.params["name"]
        h = policies.get(name)
        if h is None:
            raise HttpError(404, f"no policy named {name!r} is held here")
        if request.query.get("raw") in ("1", "true", "yes"):
            return Response(200, [("content-type", ENVELOPE_TYPE)], h.envelope.encode())
        body = h.envelope.body.decode("utf-8", errors="replace")
        return json_response({**h.to_json(), "document": body})

    async def publish(request: Request) -> Response:
        origin = f"api:{request.client or '?'}"
        if not request.body:
            policies.refuse("malformed", "empty request body", origin=origin)
            raise HttpError(400, "request body must hold a signed envelope "
                            "(sign it first: rumor policy sign FILE --key KEY)")
        try:
            env = read_envelope_file(request.body)
        except EnvelopeError as e:
            # Refused before the store saw it, but a rejection all the same: counted
            # (rumor_policy_rejected_total) and logged under a reason of the store's.
            reason = "oversized" if len(request.body) > MAX_FILE else "malformed"
            policies.refuse(reason, str(e), request.body, origin=origin)
            raise HttpError(400, f"not a signed policy envelope: {e}") from None
        out = policies.publish(env.encode(), origin=origin)
        if out.status == REJECTED:
            return json_response({"error": f"rejected ({out.reason}): {out.detail}",
                                  **out.to_json()}, status=422)
        return json_response(out.to_json())

    async def evaluate(request: Request) -> Response:
        service = request.params["service"]
        headers = {k[len("header."):].lower(): v for k, v in request.query.items()
                   if k.startswith("header.")}
        path, raw_query = split_target(request.query.get("path", "/") or "/")
        query = parse_query(raw_query)
        query.update({k[len("query."):]: v for k, v in request.query.items()
                      if k.startswith("query.")})
        return json_response(policies.evaluator.evaluate(
            service, source=request.query.get("source"), headers=headers,
            holds=[n for n in request.query.get("holds", "").split(",") if n],
            method=request.query.get("method", "GET") or "GET", path=path, query=query))

    router.add("GET", "/v1/policies", list_policies)
    router.add("PUT", "/v1/policies", publish)
    router.add("GET", "/v1/policies/{name}", show)
    router.add("GET", "/v1/evaluate/{service}", evaluate)
