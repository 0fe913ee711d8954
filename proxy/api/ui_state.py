"""The web UI's state document and its change index (sans-IO).

`GET /v1/ui/state` answers one JSON document holding what the page shows of this
agent's view: members (the rows of `/v1/members`), services with their instances and
checks (the rows of `/v1/catalog/service/NAME`, critical ones included, plus the output
of this agent's own checks) and policies (what `/v1/policies` answers). Its ``index``
is a digest of the document without the fields that change on every read (RTTs, the
seconds since a member's last change), so a blocking read can wait until something an
operator would notice changed. The shell (``ui.py``) does the waiting.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .catalog import CatalogApi
from .policies import PolicyApi

#: Fields left out of the index: they move on every probe or every second.
VOLATILE = frozenset({"rtt_ms", "since"})


def ui_state(agent: str, members: list[dict[str, Any]], catalog: CatalogApi | None,
             policies: PolicyApi | None) -> dict[str, Any]:
    """The document for the UI, ``index`` included. ``catalog`` and ``policies`` are the
    API's own objects (None: the agent runs without them; the page says so)."""
    services: list[dict[str, Any]] | None = None
    if catalog is not None:
        services = []
        # Other agents learn a check's status, not its output: only ours have it.
        outputs = {c["id"]: c.get("output", "") for s in catalog.local_services()
                   for c in s["checks"]}
        for name, summary in catalog.services().items():
            rows = []
            for inst in catalog.instances(name, include_critical=True):
                row = inst.to_json()
                if inst.node == agent:
                    for check in row["checks"]:
                        if check["id"] in outputs:
                            check["output"] = outputs[check["id"]]
                rows.append(row)
            services.append({"name": name, **summary, "instances": rows})
    held = None
    if policies is not None:
        held = {"documents": [h.to_json() for h in policies.held()], **policies.status()}
    doc: dict[str, Any] = {"agent": agent, "members": members, "services": services,
                           "policies": held}
    return {"index": state_index(doc), **doc}


def state_index(doc: dict[str, Any]) -> str:
    """A digest of ``doc`` without its volatile fields (and without ``index``)."""
    stable = _strip({k: v for k, v in doc.items() if k != "index"})
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _strip(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if k not in VOLATILE}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


__all__ = ["VOLATILE", "state_index", "ui_state"]
