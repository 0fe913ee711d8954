"""A tiny synchronous client for the agent's local API, used by CLI commands.

Why synchronous: a CLI command makes one or two requests and exits; a trio run loop
would only add start-up time. Every failure becomes an `ApiError` whose message is
meant to be printed as-is, so commands can `except ApiError as e: die(str(e))`.
"""

from __future__ import annotations

import errno
import json
import os
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpcore


DEFAULT_TIMEOUT = 10.0
#: Where the CLI finds the agent's API token (`rumor agent --api-token-file`): the
#: ``--token-file`` option, else these variables (the token itself, or a file holding it).
TOKEN_ENV = "RUMOR_API_TOKEN"
TOKEN_FILE_ENV = "RUMOR_API_TOKEN_FILE"
_token_file: str | None = None


def use_token_file(path: str | None) -> None:
    """Send the token in ``path`` with every request (``--token-file``)."""
    global _token_file
    _token_file = path


def api_token() -> str | None:
    """The token to send, from ``--token-file`` or the environment; None: no token."""
    path = _token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            token = read_token_file(path)
        except ValueError as e:
            raise ApiError(str(e)) from None
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def read_token_file(path: str) -> str:
    """The token in ``path`` (its first line); ValueError with the reason otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API token file {path}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token or any(not (33 <= ord(c) < 127) for c in token):
        raise ValueError(f"API token file {path} must hold one line of printable ASCII "
                         "(no spaces)")
    return token


class ApiError(Exception):
    """The agent API could not be reached or answered with an error.

    `status` is the HTTP status when the agent did answer, else None.
    """

    def __init__(self, message: str, status: int | None = None, document: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        #: The decoded JSON error document, when the agent sent one.
        self.document = document


def get_json(api: str, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """GET `path` from the agent at `api` ("host:port") and decode the JSON answer."""
    return request_json("GET", api, path, timeout=timeout)


def put_json(api: str, path: str, obj: Any, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """PUT `obj` as JSON to `path` on the agent at `api` and decode the JSON answer."""
    return request_json("PUT", api, path, obj, timeout=timeout)


def put_bytes(api: str, path: str, data: bytes, content_type: str, *,
              timeout: float = DEFAULT_TIMEOUT) -> Any:
    """PUT raw `data` (e.g. a signed envelope) and decode the JSON answer."""
    return request_json("PUT", api, path, timeout=timeout, raw=(data, content_type))


def request_json(
    method: str, api: str, path: str, obj: Any = None, *, timeout: float = DEFAULT_TIMEOUT,
    raw: tuple[bytes, str] | None = None,
) -> Any:
    """Send one request; returns the decoded JSON body of a 2xx answer.

    `api` is "host:port" (an "http://" prefix is accepted too); `obj`, if not None,
    is sent as the JSON body, `raw` as (body, content type) instead.
    """
    base = api if api.startswith(("http://", "https://")) else f"http://{api}"
    where = base.split("://", 1)[1].rstrip("/")
    headers = [(b"accept", b"application/json")]
    token = api_token()
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    content = b""
    if obj is not None:
        content = json.dumps(obj).encode()
        headers.append((b"content-type", b"application/json"))
    elif raw is not None:
        content = raw[0]
        headers.append((b"content-type", raw[1].encode()))
    import httpcore  # here: every `rumor` command imports this module, few call an agent

    try:
        response = httpcore.request(
            method,
            base.rstrip("/") + path,
            headers=headers,
            content=content,
            extensions={
                "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
            },
        )
    except httpcore.ConnectTimeout as exc:
        raise ApiError(f"cannot reach agent API at {where}: timed out connecting") from exc
    except httpcore.ConnectError as exc:
        raise ApiError(f"cannot reach agent API at {where}: {_connect_reason(exc)}") from exc
    except httpcore.TimeoutException as exc:
        raise ApiError(
            f"agent API at {where} did not answer {method} {path} within {timeout:g}s"
        ) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
        raise ApiError(f"agent API at {where} broke off {method} {path}: {exc}") from exc
    except httpcore.UnsupportedProtocol as exc:
        raise ApiError(f"bad agent API address {api!r}: {exc}") from exc
    return _decode(response, method, path, where)


def _connect_reason(exc: httpcore.ConnectError) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ConnectionRefusedError) or (
        isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
    ):
        return "connection refused — is `rumor agent` running?"
    return str(exc) or type(exc).__name__


def _decode(response: httpcore.Response, method: str, path: str, where: str) -> Any:
    body = response.content
    try:
        doc = json.loads(body) if body.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if 200 <= response.status < 300:
            raise ApiError(
                f"agent API at {where} sent invalid JSON for {method} {path}: {exc}",
                response.status,
            ) from exc
        doc = None  # an error page that is not JSON: its text is shown below
    if 200 <= response.status < 300:
        return doc
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    if isinstance(doc, dict) and "error" in doc:
        detail = str(doc["error"])
    else:
        detail = body.decode("utf-8", errors="replace").strip()[:200] or "(empty body)"
    raise ApiError(
        f"agent API {method} {path} failed: {response.status} {reason}: {detail}",
        response.status,
        doc,
    )
