"""Configuration routes of the local API: what the agent runs with, and reload.

- `GET /v1/agent/config` -> `{"files": [...], "settings": {KEY: VALUE}}`: the effective
  configuration (flags over files, after reloads), keyed as a config file is. Key files
  appear as paths; no key material is ever in it.
- `PUT /v1/agent/reload` -> re-read the configuration as SIGHUP does: 200 with
  `{"applied": [...], "restart": [...]}` (settings applied live; settings that changed
  but need a restart), or 400 with the reason when the new configuration is refused
  (then nothing changed).
"""

from __future__ import annotations

from typing import Any, Protocol

from .router import Router
from .server import HttpError, Request, Response, json_response


class ReloadRefused(ValueError):
    """What ``AgentControl.reload`` raises when it refused a configuration and changed
    nothing (``cli.reload.ReloadError``); any other error is a bug, answered 500."""


class AgentControl(Protocol):
    """What the routes need from the agent (``cli.reload.Reloader``)."""

    def config(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...


def add_control_routes(router: Router, control: AgentControl) -> None:
    async def config(request: Request) -> Response:
        return json_response(control.config())

    async def reload(request: Request) -> Response:
        try:
            return json_response(await control.reload())
        except ReloadRefused as e:
            raise HttpError(400, f"reload refused, nothing changed: {e}") from None

    router.add("GET", "/v1/agent/config", config)
    router.add("PUT", "/v1/agent/reload", reload)
