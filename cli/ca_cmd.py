"""``rumor ca``: the cluster certificate authority for sidecar mutual TLS.

::

    rumor ca init --dir ca/ --cluster prod            # once per cluster
    rumor ca issue --dir ca/ --node web-1 --service web --out certs/web-1
    rumor ca credential --dir ca/ --node web-1 --data-dir /var/lib/rumor

Every agent gets ``ca.crt`` (whom to trust) and its own ``PREFIX.crt``/``PREFIX.key``
(who it is). ``ca.key`` stays offline: whoever holds it can act as any service.
Certificates are short-lived (90 days by default); renewing is issuing again to the
same prefix, which a running agent picks up without a restart.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509

# The parser is built for every `rumor` command, the agent's included: cryptography
# (about 14 MiB resident) is imported only when a `rumor ca` command runs.

DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 90

#: Defaults that make the issue's bare commands work: ``rumor ca init`` then
#: ``rumor ca issue --node web-1 --service web`` in the same folder.
DEFAULT_DIR = "ca"
DEFAULT_CLUSTER = "rumor"


def add_ca_parser(sub: Any) -> None:
    c = sub.add_parser("ca", help="the cluster certificate authority for sidecar mutual "
                       "TLS: create it, issue agent certificates")
    cs = c.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)

    i = cs.add_parser("init", help="create a cluster CA (ca.crt and ca.key) in DIR")
    i.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), metavar="DIR",
                   help=f"directory for ca.crt and ca.key (created 0700 if missing; "
                   f"default ./{DEFAULT_DIR})")
    i.add_argument("--cluster", default=DEFAULT_CLUSTER, metavar="NAME",
                   help="the cluster name every identity carries (spiffe://NAME/...; "
                   f"default {DEFAULT_CLUSTER})")
    i.add_argument("--days", type=int, default=DEFAULT_CA_DAYS, metavar="N",
                   help=f"validity of the CA (default {DEFAULT_CA_DAYS})")

    n = cs.add_parser("credential", help="sign an agent's node key (its gossip identity), "
                      "creating the key in its data directory if it has none")
    n.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), metavar="DIR",
                   help=f"the CA directory (default ./{DEFAULT_DIR})")
    n.add_argument("--node", required=True, metavar="NAME", help="the agent's --name")
    n.add_argument("--data-dir", required=True, type=Path, metavar="DIR",
                   help="the agent's --data-dir: its node.key is read (or made) there and "
                   "node.credential written beside it")

    s = cs.add_parser("issue", help="issue an agent's certificate, naming its node and "
                      "the services it serves")
    s.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), metavar="DIR",
                   help=f"the CA directory (from `rumor ca init`; default ./{DEFAULT_DIR})")
    s.add_argument("--node", required=True, metavar="NAME", help="the agent's --name")
    s.add_argument("--service", required=True, action="append", dest="services",
                   metavar="NAME", help="a service the agent serves and calls as "
                   "(repeat for several)")
    s.add_argument("--days", type=int, default=DEFAULT_CERT_DAYS, metavar="N",
                   help=f"validity (default {DEFAULT_CERT_DAYS}; renew by issuing again)")
    s.add_argument("--out", type=Path, metavar="PREFIX",
                   help="writes PREFIX.crt (certificate chain) and PREFIX.key (0600); "
                   "default ./NODE")


def run_ca(args: argparse.Namespace) -> int:
    from ..proxy.ca import CaError
    try:
        if args.ca_command == "init":
            _init(args)
        elif args.ca_command == "credential":
            _credential(args)
        else:
            _issue(args)
    except CaError as e:
        print(f"rumor: {e}", file=sys.stderr)
        return 1
    return 0


def _init(args: argparse.Namespace) -> None:
    from ..proxy.ca import init_ca
    crt, key = init_ca(args.dir, args.cluster, args.days)
    cert = _first_cert(crt)
    print(f"created the CA of cluster {args.cluster!r}, valid until "
          f"{_when(cert.not_valid_after_utc)}:")
    print(f"  {crt}  CA certificate: give it to every agent (--tls-ca)")
    print(f"  {key}  CA private key (0600)")
    print(f"Keep {key} offline and bring it back only to issue certificates: whoever "
          "holds it can act as any node and service of the cluster.")


def _issue(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    from ..proxy.ca import issue
    from ..proxy.identity import identity_of
    out = args.out if args.out is not None else Path(args.node)
    crt, key = issue(args.dir, args.node, args.services, args.days, out)
    # Read back from the file, so what is printed is what the agent will present.
    cert = _first_cert(crt)
    ident = identity_of(cert.public_bytes(Encoding.DER))
    end = cert.not_valid_after_utc
    print(f"issued the certificate of node {ident.node!r} in cluster {ident.cluster!r}:")
    print(f"  {crt}  certificate chain (--tls-cert)")
    print(f"  {key}  private key, 0600 (--tls-key)")
    print("identities:")
    for uri in ident.uris():
        print(f"  {uri}")
    days = round((end - datetime.now(UTC)).total_seconds() / 86400)
    print(f"valid until {_when(end)} ({days} days): issue again to the same --out "
          "before then")


def _credential(args: argparse.Namespace) -> None:
    from ..proxy.node_credential import issue_node_credential
    path, kid, created = issue_node_credential(args.dir, args.node, args.data_dir)
    print(f"signed the node key {kid} of {args.node!r}"
          f"{' (created now)' if created else ''}:")
    print(f"  {path}  node credential (the agent reads it from its --data-dir)")
    print(f"  {args.data_dir / 'node.key'}  node key, 0600: it never leaves this directory")
    print("Every agent that trusts this CA (--tls-ca or --node-ca) now takes only this "
          f"key's word about {args.node!r}.")


def _first_cert(path: Path) -> x509.Certificate:
    from cryptography import x509

    from ..proxy.ca import CaError
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError) as e:
        raise CaError(f"cannot read back {path}: {e}") from None


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")
