"""``rumor config validate|show`` and ``rumor reload``.

``validate`` reads files exactly as ``rumor agent --config`` would, key files and
certificates included, so a file that passes starts an agent (ports aside). ``show``
asks a running agent for its effective configuration (flags over files, after any
reload) and prints it as a file. ``reload`` makes a running agent re-read its
configuration, as SIGHUP does, and prints what changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..gossip.address import format_address


def add_config_parser(sub: Any, api_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    c = sub.add_parser("config", help="check configuration files; show a running "
                       "agent's effective configuration")
    actions = c.add_subparsers(dest="config_command", metavar="ACTION", required=True,
                               parser_class=type(c))
    v = actions.add_parser("validate", help="check files (or directories of *.toml) as "
                           "`rumor agent --config` reads them, without starting an agent")
    v.add_argument("paths", nargs="+", metavar="PATH")
    s = actions.add_parser("show", help="a running agent's effective configuration "
                           "(flags over files, after reloads) as a config file")
    api_arg(s)
    s.add_argument("--json", action="store_true", help="print the JSON document")
    r = sub.add_parser("reload", help="make a running agent re-read its configuration "
                       "(as SIGHUP does) and print what changed")
    api_arg(r)
    r.add_argument("--json", action="store_true", help="print the JSON answer")


def run_config(args: argparse.Namespace) -> int:
    if args.config_command == "validate":
        return _validate(args.paths)
    doc = _call(args, "GET", "/v1/agent/config")
    if doc is None:
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    from .config import to_toml
    files = ", ".join(doc.get("files") or []) or "none"
    print(f"# effective configuration of agent {doc['settings'].get('name', '?')} "
          f"(files: {files}; flags over files)")
    print(to_toml(doc["settings"]), end="")
    return 0


def run_reload(args: argparse.Namespace) -> int:
    doc = _call(args, "PUT", "/v1/agent/reload")
    if doc is None:
        return 1
    print(json.dumps(doc, indent=2) if args.json else describe_reload(doc))
    return 0


def _call(args: argparse.Namespace, method: str, path: str) -> Any:
    """The agent's JSON answer, or None once the error is printed."""
    from .client import ApiError, get_json, put_json
    api = format_address(args.api)
    try:
        return get_json(api, path) if method == "GET" else put_json(api, path, {})
    except ApiError as e:
        print(f"rumor: {e}", file=sys.stderr)
        return None


def describe_reload(doc: dict[str, Any]) -> str:
    """One line per change, as the agent's log has them."""
    lines = [f"applied: {key}" for key in doc.get("applied", [])]
    lines += [f"not applied (needs a restart): {key}" for key in doc.get("restart", [])]
    return "\n".join(lines) if lines else "the configuration is unchanged"


def _validate(paths: list[str]) -> int:
    from .main import UsageError, agent_options, parse_agent_args
    argv = ["agent"] + [x for p in paths for x in ("--config", p)]
    try:
        opts = agent_options(parse_agent_args(argv))
        if opts.tls is not None:
            from ..proxy.tls import MeshTls, TlsConfigError
            try:
                MeshTls(opts.tls)
            except TlsConfigError as e:
                raise UsageError(f"TLS: {e}") from None
    except UsageError as e:
        print(f"rumor: {e}", file=sys.stderr)
        return 1
    parts = [f"agent {opts.name}", f"{len(opts.services)} service(s)",
             f"{len(opts.join)} seed(s)"]
    if opts.trust is not None:
        parts.append(f"{len(opts.trust.keys)} trusted key(s), threshold "
                     f"{opts.trust.threshold}")
    if opts.keyring is not None:
        parts.append(f"gossip encrypted ({len(opts.keyring.keys)} key(s))")
    print(f"valid: {', '.join(parts)} (from {', '.join(opts.config_files)})")
    return 0
