"""``rumor keygen`` and ``rumor policy ...``: keys, signing, publishing, inspecting.

Signing happens here, on the operator's machine: secret keys never travel to an agent.
An agent only ever receives envelopes that are already signed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from ..gossip.version import RELEASE_TAG, release_key
from ..policy.documents import (
    MAX_DOCUMENT_BYTES,
    MAX_FAULT_LIFETIME,
    Document,
    PolicyError,
    required_release,
)
from ..policy.envelope import (
    Envelope,
    EnvelopeError,
    make_payload,
    read_envelope_file,
    sign,
)
from ..policy.examples import EXAMPLES, example
from ..policy.keys import KeyFileError, SecretKey, load_public_key, load_secret_key, write_keypair
from ..policy.parser import parse_document
from ..policy.store import PolicyStore
from ..policy.trust import TrustError, TrustSet


class CommandError(Exception):
    """A failure to report on one line with exit status 1."""


def add_policy_parsers(sub: Any, api_arg: Any) -> None:
    k = sub.add_parser("keygen", help="create an Ed25519 publisher key pair "
                       "(NAME.key, mode 0600, and NAME.pub)")
    k.add_argument("--out", required=True, metavar="NAME",
                   help="path prefix of the key files")
    k.add_argument("--force", action="store_true", help="overwrite an existing key")

    p = sub.add_parser("policy", help="write, sign, publish and inspect policy documents")
    ps = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND",
                          parser_class=type(p))
    ps.required = True

    ex = ps.add_parser("example", help="print a valid, commented example document")
    ex.add_argument("kind", choices=sorted(EXAMPLES))

    sg = ps.add_parser("sign", help="sign a TOML document (or add signatures to a "
                       ".signed file)")
    sg.add_argument("file", metavar="FILE")
    _sign_args(sg, required=True)
    sg.add_argument("--out", required=True, metavar="FILE.signed")

    pb = ps.add_parser("publish", help="publish a document through an agent (signing "
                       "it first when given --key)")
    pb.add_argument("file", metavar="FILE|FILE.signed")
    _sign_args(pb, required=False)
    api_arg(pb)

    ls = ps.add_parser("list", help="list the documents an agent holds")
    api_arg(ls)
    ls.add_argument("--json", action="store_true")

    sh = ps.add_parser("show", help="show one held document")
    sh.add_argument("name")
    api_arg(sh)
    sh.add_argument("--json", action="store_true")

    vf = ps.add_parser("verify", help="check a .signed file offline against trusted keys")
    vf.add_argument("file", metavar="FILE.signed")
    vf.add_argument("--trust-key", action="append", required=True, metavar="FILE",
                    help="trusted publisher public key (repeatable)")
    vf.add_argument("--trust-threshold", type=int, default=1, metavar="K")

    cr = ps.add_parser("credential", help="sign an agent's node key (its gossip identity) "
                       "with publisher keys, for clusters whose node credentials the "
                       "policy trust keys vouch for (agents: --node-cluster)")
    cr.add_argument("--key", action="append", required=True, metavar="KEY",
                    help="secret key file to sign with (repeatable: as many as the "
                    "agents' --trust-threshold)")
    cr.add_argument("--cluster", required=True, metavar="NAME",
                    help="the cluster the agents name with --node-cluster")
    cr.add_argument("--node", required=True, metavar="NAME", help="the agent's --name")
    cr.add_argument("--data-dir", required=True, metavar="DIR",
                    help="the agent's --data-dir: its node.key is read (or made) there "
                    "and node.credential written beside it")

    ev = ps.add_parser("evaluate", help="what an agent would apply to a request for SERVICE")
    ev.add_argument("service")
    ev.add_argument("--source", help="calling service")
    ev.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    ev.add_argument("--method", default="GET", help="the request's method (default GET)")
    ev.add_argument("--path", default="/", metavar="PATH[?QUERY]",
                    help="the request's path, with its query if any (default /)")
    ev.add_argument("--query", action="append", default=[], metavar="NAME=VALUE",
                    help="a query parameter (repeatable; beside those of --path, "
                    "replacing one of the same name)")
    api_arg(ev)
    ev.add_argument("--json", action="store_true")


def _sign_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--key", action="append", default=[], required=required,
                   metavar="KEY", help="secret key file to sign with (repeatable)")
    p.add_argument("--version", dest="doc_version", type=int, metavar="N",
                   help="document version (default: the document's `version`)")


def run_keygen(args: argparse.Namespace) -> int:
    try:
        secret, public, pk = write_keypair(args.out, force=args.force)
    except KeyFileError as e:
        raise CommandError(str(e)) from None
    print(f"key id {pk.id}\nsecret key: {secret} (keep it offline; mode 0600)\n"
          f"public key: {public} (give it to agents with --trust-key)")
    return 0


def run_policy(args: argparse.Namespace, api: str) -> int:
    cmd = args.policy_command
    if cmd == "example":
        # The fault example's expiry is filled in: one hour from now.
        sys.stdout.write(example(args.kind, time.time()))
        return 0
    if cmd == "sign":
        env = _signed(args.file, args.key, args.doc_version)
        try:
            Path(args.out).write_text(env.to_file(), encoding="utf-8")
        except OSError as e:
            raise CommandError(f"{args.out}: {e.strerror or e}") from None
        print(f"signed {env.kind} {env.name!r} version {env.version} by "
              f"{', '.join(env.key_ids())} -> {args.out}")
        return 0
    if cmd == "verify":
        return _verify(args)
    if cmd == "credential":
        return _credential(args)
    from .client import get_json, put_bytes
    if cmd == "publish":
        env = _signed(args.file, args.key, args.doc_version)
        _warn_old_members(api, env)
        res = _put(put_bytes, api, env)
        print(f"{res['status']}: {env.kind} {env.name!r} version {env.version}"
              + (f" ({res['conflict']})" if res.get("conflict") else ""))
        return 0
    if cmd == "list":
        doc = get_json(api, "/v1/policies")
        if args.json:
            print(json.dumps(doc, indent=2))
            return 0
        from .table import render_table
        rows = [{"name": d["name"], "kind": d["kind"], "version": d["version"],
                 "issued": _when(d["issued"]), "expires": _when(d["expires"]),
                 "signed_by": ",".join(d["signed_by"]), "digest": d["digest"]}
                for d in doc["documents"]]
        print(render_table(rows, ["name", "kind", "version", "issued", "expires",
                                  "signed_by", "digest"]))
        rejected = doc["stats"].get("rejected", {})
        trust = doc["trust"]
        print(f"trust: {len(trust['keys'])} key(s), threshold {trust['threshold']}, "
              f"version {trust['version']}; rejected: "
              + (", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"))
        return 0
    if cmd == "show":
        doc = get_json(api, f"/v1/policies/{quote(args.name, safe='')}")
        if args.json:
            print(json.dumps(doc, indent=2))
            return 0
        print(f"# {doc['kind']} {doc['name']!r} version {doc['version']}, issued "
              f"{_when(doc['issued'])}, expires {_when(doc['expires'])}\n"
              f"# signed by {', '.join(doc['signed_by'])}; digest {doc['digest']}; "
              f"from {doc['origin']}")
        sys.stdout.write(doc["document"])
        return 0
    if cmd == "evaluate":
        query: dict[str, str] = {}
        if args.source:
            query["source"] = args.source
        for h in args.header:
            name, sep, value = h.partition("=")
            if not sep or not name:
                raise CommandError(f"--header {h!r}: expected NAME=VALUE")
            query[f"header.{name.lower()}"] = value
        if not args.path.startswith("/"):
            raise CommandError(f"--path {args.path!r}: expected a path starting with /")
        query["method"] = args.method
        query["path"] = args.path
        for q in args.query:
            name, sep, value = q.partition("=")
            if not sep or not name:
                raise CommandError(f"--query {q!r}: expected NAME=VALUE")
            query[f"query.{name}"] = value
        doc = get_json(api, f"/v1/evaluate/{quote(args.service, safe='')}?"
                       + urlencode(query))
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(explain_evaluation(doc))
        return 0
    raise CommandError(f"unknown policy command {cmd!r}")


def explain_evaluation(doc: dict[str, Any]) -> str:
    """``GET /v1/evaluate/SERVICE`` in lines for people (``--json`` shows it whole)."""
    req = doc.get("request") or {}
    query = "&".join(f"{k}={v}" for k, v in sorted((req.get("query") or {}).items()))
    lines = [f"{req.get('method', 'GET')} {req.get('path', '/')}"
             + (f"?{query}" if query else "") + f" to {doc['service']}"
             + (f" from {req['source']}" if req.get("source") else "")]
    route = doc["route"]
    split = ", ".join(f"{w['name']} {w['weight']}" for w in route["split"])
    where = ("no route policy" if route["policy"] is None else
             f"route {route['policy']!r}, " + (f"rule {route['rule']!r}" if route["rule"]
                                               else "default split"))
    lines.append(f"route:      {where}: {split}")
    edits = route.get("request_headers") or {}
    parts = [f"set {k}: {v}" for k, v in edits.get("set", {}).items()]
    parts += [f"add {k}: {v}" for k, v in edits.get("add", {}).items()]
    parts += [f"remove {k}" for k in edits.get("remove", [])]
    if parts:
        lines.append(f"headers:    {'; '.join(parts)}")
    fault = doc.get("fault")
    if fault is None:
        lines.append("fault:      none")
    else:
        rule = fault.get("applies")
        what = "no rule applies to this request"
        if rule is not None:
            bits = []
            if rule.get("delay"):
                bits.append(f"delay {rule['delay']['duration']} on "
                            f"{rule['delay']['percent']:g}%")
            if rule.get("abort"):
                ab = rule["abort"]
                how = "reset" if ab.get("reset") else f"status {ab['status']}"
                bits.append(f"abort ({how}) on {ab['percent']:g}%")
            what = f"rule {rule['name']!r}: " + ", ".join(bits)
        lines.append(f"fault:      {fault['policy']!r}: {what}")
    limit = doc.get("ratelimit")
    if limit is None:
        lines.append("rate limit: none")
    else:
        total = limit["requests_per_second"]
        text = f"{total:g}/s in all" if total is not None else "no total"
        if limit.get("source_limit") is not None:
            text += f", {limit['source_limit']:g}/s for this source"
        lines.append(f"rate limit: {limit['policy']!r}: {text}, burst {limit['burst']}")
    bal = doc["balancer"]
    text = bal["algorithm"]
    if bal.get("hash"):
        text += " on " + ", ".join(f"{k} {v}" for k, v in bal["hash"].items())
    ss = bal["slow_start"]
    text += (f"; slow start {ss['window']} from {ss['min_percent']:g}%"
             if ss["window"] != "0s" else "; no slow start")
    res = doc["resilience"]
    lines.append(f"balancer:   {text}")
    to = res["timeouts"]
    lines.append(f"resilience: {res['policy']!r}" if res["policy"] else
                 "resilience: defaults")
    lines[-1] += (f": timeouts {to['connect']}/{to['per_try']}/{to['overall']}, "
                  f"{res['retries']['attempts']} attempts")
    acc = doc["access"]
    lines.append(f"access:     {'allowed' if acc['allowed'] else 'DENIED'}: {acc['reason']}")
    for c in doc.get("conflicts", []):
        lines.append(f"conflict:   {c}")
    return "\n".join(lines)


def _put(put_bytes: Any, api: str, env: Envelope) -> Any:
    from .client import ApiError
    try:
        return put_bytes(api, "/v1/policies", env.encode(), "application/x-rumor-envelope")
    except ApiError as e:
        if e.status == 422:
            raise CommandError(f"the agent rejected {env.name!r} version {env.version}: "
                               + e.message.split(": ", 2)[-1]) from None
        raise


def _read(path: str) -> bytes:
    try:
        p = Path(path)
        if p.stat().st_size > 4 * MAX_DOCUMENT_BYTES:
            raise CommandError(f"{path}: {p.stat().st_size} bytes is too large for a "
                               "policy document")
        return p.read_bytes()
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror or e}") from None


def _load(path: str) -> Envelope | Document:
    """A ``.signed`` file's envelope, or a TOML document (validated)."""
    data = _read(path)
    if data.lstrip()[:1] == b"{" or data[:1] == b"\x93":
        try:
            return read_envelope_file(data)
        except EnvelopeError as e:
            raise CommandError(f"{path}: {e}") from None
    try:
        return parse_document(data, source=path)
    except PolicyError as e:
        raise CommandError(str(e)) from None


def _credential(args: argparse.Namespace) -> int:
    import time

    from ..gossip.node_key import (
        CREDENTIAL_CONTEXT,
        NodeKeyError,
        credential_payload,
        encode_credential,
        key_id,
        load_or_create_key,
        save_credential,
    )
    try:
        signers = [load_secret_key(k) for k in args.key]
    except KeyFileError as e:
        raise CommandError(str(e)) from None
    data_dir = Path(args.data_dir)
    try:
        key, created = load_or_create_key(data_dir)
        payload = credential_payload(args.cluster, args.node, key.public, int(time.time()))
        sigs = [(s.public.id, s.sign(CREDENTIAL_CONTEXT + payload)) for s in signers]
        path = save_credential(data_dir, encode_credential("ed25519", payload, sigs))
    except (NodeKeyError, ValueError) as e:
        raise CommandError(str(e)) from None
    print(f"signed the node key {key_id(key.public)} of {args.node!r}"
          f"{' (created now)' if created else ''} in cluster {args.cluster!r} by "
          f"{', '.join(s.public.id for s in signers)} -> {path}")
    return 0


def _signed(path: str, key_files: list[str], version: int | None) -> Envelope:
    keys: list[SecretKey] = []
    for k in key_files:
        try:
            keys.append(load_secret_key(k))
        except KeyFileError as e:
            raise CommandError(str(e)) from None
    loaded = _load(path)
    if isinstance(loaded, Envelope):
        if version is not None and version != loaded.version:
            raise CommandError(f"{path} is already signed as version {loaded.version}; "
                               "re-sign the TOML document to change the version")
        if not keys:
            return loaded
        try:
            return sign(loaded.payload, keys, loaded.signatures)
        except EnvelopeError as e:
            raise CommandError(f"{path}: {e}") from None
    if not keys:
        raise CommandError(f"{path} is not signed: give --key KEY to sign it "
                           "(or publish a .signed file)")
    doc = loaded
    if version is not None and version < 1:
        raise CommandError("--version must be a positive integer")
    issued = time.time()
    if doc.expires is not None and doc.expires <= issued:
        raise CommandError(f"{path}: the document's `expires` is already in the past")
    if doc.kind == "fault" and doc.expires is not None \
            and doc.expires - issued > MAX_FAULT_LIFETIME:
        raise CommandError(f"{path}: a fault document must expire at most "
                           f"{MAX_FAULT_LIFETIME / 3600:g}h after it is signed (now); its "
                           f"`expires` is {(doc.expires - issued) / 3600:.1f}h away (agents "
                           "would reject it)")
    release = required_release(doc)
    if release is not None:
        print(f"note: {path} needs agents of release {release} or later (older ones "
              "reject it and keep the previous version)", file=sys.stderr)
    try:
        payload = make_payload(doc.kind, doc.name, version or doc.version, issued,
                               doc.expires, _read(path))
        return sign(payload, keys)
    except EnvelopeError as e:
        raise CommandError(f"{path}: {e}") from None


def _warn_old_members(api: str, env: Envelope) -> None:
    """Warn when live members run a release too old for the document: their strict
    parsers reject it, and they keep (and keep routing by) the previous version."""
    try:
        doc = parse_document(env.body, source=env.name)
    except PolicyError:
        return  # the agent's answer says what is wrong with it
    need = required_release(doc)
    if need is None:
        return
    from .client import get_json
    want = release_key(need)
    old = []
    for m in get_json(api, "/v1/members"):
        if m.get("status") not in ("alive", "suspect"):
            continue
        got = (m.get("tags") or {}).get(RELEASE_TAG)
        have = release_key(got) if isinstance(got, str) else None
        if have is None or want is None or have < want:
            old.append(f"{m.get('name')} ({got or 'before 0.2.0'})")
    if old:
        shown = ", ".join(old[:10]) + (f" and {len(old) - 10} more" if len(old) > 10 else "")
        print(f"warning: {len(old)} live member(s) run a release older than {need}, which "
              f"this {env.kind} document needs: {shown}. They will reject it and keep the "
              "previous version; upgrade them first (docs/policy.md, \"Upgrading a mixed "
              "cluster\").", file=sys.stderr)


def _verify(args: argparse.Namespace) -> int:
    try:
        keys = [load_public_key(k) for k in args.trust_key]
        trust = TrustSet.of(keys, args.trust_threshold)
    except (KeyFileError, TrustError) as e:
        raise CommandError(str(e)) from None
    loaded = _load(args.file)
    if not isinstance(loaded, Envelope):
        raise CommandError(f"{args.file} is a TOML document, not a signed envelope")
    out = PolicyStore(trust).offer_envelope(time.time(), loaded, origin=args.file)
    if not out.accepted:
        print(f"{args.file}: REJECTED ({out.reason}): {out.detail}", file=sys.stderr)
        return 1
    verdict = trust.verify(loaded)
    print(f"{args.file}: OK — {loaded.kind} {loaded.name!r} version {loaded.version}, "
          f"signed by {', '.join(verdict.valid_keys)} ({len(verdict.valid_keys)} of "
          f"{trust.threshold} required), expires {_when(loaded.expires)}")
    return 0


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
