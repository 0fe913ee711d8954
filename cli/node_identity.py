"""The agent's node identity: its key, its credential, and whose credentials it trusts.

Built once at start from ``--data-dir`` (``node.key``, ``node.credential``),
``--node-identity``, ``--node-tofu`` and the authorities the agent already has: the
mesh CA (``--node-ca``, else ``--tls-ca``) and the policy trust keys
(``--trust-key``/``--trust-threshold``). ``auto`` signs when there is a credential (or
trust on first use was asked for) and otherwise stays ``off`` and says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..gossip.identity import Identity
from ..gossip.node_key import (
    AnyOf,
    CredentialAuthority,
    CredentialError,
    Ed25519Authority,
    NodeKeyError,
    decode_credential,
    load_credential,
    load_or_create_key,
)

if TYPE_CHECKING:
    from .agent import AgentOptions

log = logging.getLogger("rumor.agent")
#: The cluster named in trust-on-first-use claims (nobody signs them).
TOFU_CLUSTER = "tofu"


class IdentityError(ValueError):
    """The node identity cannot be set up (message for the operator)."""


def authority_of(opts: AgentOptions) -> CredentialAuthority | None:
    """Who may bind names to keys: the CA, the policy trust keys, or both."""
    found: list[CredentialAuthority] = []
    ca = opts.node_ca or (str(opts.tls.ca) if opts.tls is not None else None)
    if ca is not None:
        from ..proxy.ca import CaError
        from ..proxy.node_credential import CaAuthority
        try:
            found.append(CaAuthority.from_cert_file(Path(ca)))
        except CaError as e:
            raise IdentityError(str(e)) from None
    if opts.trust is not None and found:
        cluster = found[0].cluster
        found.append(Ed25519Authority.of(cluster, [k.raw for k in opts.trust.keys.values()],
                                         opts.trust.threshold))
    elif opts.trust is not None and opts.node_cluster:
        found.append(Ed25519Authority.of(opts.node_cluster,
                                         [k.raw for k in opts.trust.keys.values()],
                                         opts.trust.threshold))
    if not found:
        return None
    return found[0] if len(found) == 1 else AnyOf(found)


def build_identity(opts: AgentOptions) -> Identity:
    mode = opts.node_identity
    if opts.data_dir is None:
        if mode in ("prefer", "require") or opts.node_tofu:
            raise IdentityError(f"--node-identity {mode} needs --data-dir: the node key "
                                "is kept there")
        log.warning("no --data-dir: this agent cannot keep a node key, so what it says "
                    "about itself is unsigned and its name and address can be forged by "
                    "any sender; give it a --data-dir and a node credential (`rumor ca "
                    "credential`)", extra={"event": "node_identity", "mode": "off"})
        return Identity()
    data_dir = Path(opts.data_dir)
    try:
        key, created = load_or_create_key(data_dir)
        cred = load_credential(data_dir)
    except NodeKeyError as e:
        raise IdentityError(str(e)) from None
    authority = authority_of(opts)
    if cred is not None:
        c = decode_credential(cred)
        if c.name != opts.name or c.public_key != key.public:
            who = f"names {c.name!r}" if c.name != opts.name else "is for another key"
            raise IdentityError(
                f"{data_dir / 'node.credential'} {who}: sign this agent's key with "
                f"`rumor ca credential --node {opts.name} --data-dir {data_dir}`")
        if authority is None:
            raise IdentityError("a node credential is checked by the authority that "
                                "signed it: give --tls-ca or --node-ca (the mesh CA), or "
                                "--trust-key with --node-cluster")
        if c.cluster != authority.cluster or not authority.vouches(c):
            raise IdentityError(f"{data_dir / 'node.credential'} is not signed by the "
                                f"configured authority (cluster {authority.cluster!r})")
    if mode == "auto":
        mode = "prefer" if (cred is not None or opts.node_tofu) else "off"
    try:
        if mode == "off":
            log.info("node key %s in %s; membership is not signed (a node credential, "
                     "or --node-identity prefer with --node-tofu, turns it on)",
                     key_id_of(key.public), data_dir,
                     extra={"event": "node_identity", "mode": "off"})
            return Identity()
        if cred is None:
            if not opts.node_tofu:
                raise IdentityError(f"--node-identity {mode} needs a node credential in "
                                    f"{data_dir} (`rumor ca credential`) or --node-tofu")
            ident = Identity.with_tofu(mode, key, TOFU_CLUSTER, opts.name, 0)
            ident.authority = authority
        else:
            ident = Identity(mode=mode, key=key, credential=cred, authority=authority,
                             tofu=opts.node_tofu)
    except (ValueError, CredentialError) as e:
        raise IdentityError(str(e)) from None
    log.info("node identity %s: key %s%s, %s", mode, key_id_of(key.public),
             " (created now)" if created else "",
             "trust on first use" if cred is None else "credential from the authority",
             extra={"event": "node_identity", "mode": mode, "key": key_id_of(key.public),
                    "tofu": opts.node_tofu})
    return ident


def key_id_of(public: bytes) -> str:
    from ..gossip.node_key import key_id
    return key_id(public)
