"""``rumor keyring``: make a gossip key, and install, use, remove or list keys on every
agent of a running cluster through one agent's local API (like ``serf keys``).

A rotation, one step at a time, each on the whole cluster::

    rumor keyring install NEWKEY   # everyone accepts it
    rumor keyring use NEWKEY       # everyone sends with it
    rumor keyring remove OLDKEY    # no one accepts the old one any more

Each step reports how many members answered; one that did not (down, or partitioned)
must be brought up to date before the next step, or it will be cut off.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..gossip.keyring import KeyringError, decode_key
from ..gossip.keyring_commands import key_id
from ..gossip.keyring_file import generate_key
from .client import ApiError, get_json, request_json

#: Cluster-wide commands wait up to 5 s for answers; leave the client some room.
TIMEOUT = 15.0


def add_keyring_parser(sub: Any, api_arg: Any) -> None:
    k = sub.add_parser("keyring", help="gossip encryption keys: generate one, or manage "
                       "them on every agent of a running cluster")
    ks = k.add_subparsers(dest="keyring_command", metavar="COMMAND", required=True)
    ks.add_parser("generate", help="print a new random key (base64)")
    kid = ks.add_parser("id", help="print a key's fingerprint, as `keyring list` shows it "
                        "(listings never show keys)")
    kid.add_argument("key", metavar="KEY")
    ls = ks.add_parser("list", help="every key installed in the cluster, with how many "
                       "members hold it and send with it")
    api_arg(ls)
    for op, text in (("install", "make every agent accept KEY"),
                     ("use", "make every agent send with KEY (install it first)"),
                     ("remove", "make every agent stop accepting KEY (not the one in use)")):
        c = ks.add_parser(op, help=text)
        c.add_argument("key", metavar="KEY")
        api_arg(c)


def run_keyring(args: argparse.Namespace, api: str) -> int:
    cmd = args.keyring_command
    if cmd == "generate":
        print(generate_key())
        return 0
    if cmd == "id":
        try:
            print(key_id(decode_key(args.key)))
        except KeyringError as e:
            print(f"rumor: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        if cmd == "list":
            doc = get_json(api, "/v1/keyring", timeout=TIMEOUT)
        else:
            doc = request_json("PUT", api, f"/v1/keyring/{cmd}", {"key": args.key},
                               timeout=TIMEOUT)
    except ApiError as e:
        if isinstance(e.document, dict) and "answered" in e.document:
            _report(e.document)
        print(f"rumor: {e}", file=sys.stderr)
        return 1
    _report(doc)
    if cmd == "list":
        total = doc["members"]
        for k in doc["keys"]:
            print(f"id {k['id']}  on {k['members']}/{total} member(s), "
                  f"primary on {k['primary']}")
    return 0


def _report(doc: dict[str, Any]) -> None:
    answered = len(doc.get("answered", []))
    print(f"{doc.get('op', '?')}: {answered}/{doc.get('members', answered)} member(s) "
          "answered")
    for name in doc.get("missing", []):
        print(f"  no answer from {name}")
    for name, err in doc.get("errors", {}).items():
        print(f"  {name}: {err}")
