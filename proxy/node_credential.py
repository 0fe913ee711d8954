# layer: shell — issues node credentials (time)
"""Node credentials signed by the mesh CA (``gossip/node_key.py`` says what they are).

The CA that issues the sidecars' certificates also vouches for the agents' node keys:
``rumor ca credential`` signs "in cluster C, name N has node key K, issued at T" with
``ca.key`` (ECDSA P-256, SHA-256), and every agent that trusts ``ca.crt`` checks it.
The node key itself is Ed25519 and never leaves the agent's data directory; only its
public half is signed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..gossip.node_key import (
    CREDENTIAL_CONTEXT,
    Credential,
    credential_payload,
    encode_credential,
    key_id,
    load_or_create_key,
    save_credential,
)
from .ca import CaError, _check_node, _load_ca

#: The "key id" a CA signature carries: which CA, for an operator reading it.
CA_SIGNER = "ca"


@dataclass(frozen=True)
class CaAuthority:
    """Credentials signed by the cluster CA's key."""

    cluster: str
    public_key: ec.EllipticCurvePublicKey

    @classmethod
    def from_cert_file(cls, path: Path) -> CaAuthority:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except OSError as e:
            raise CaError(f"cannot read the CA certificate {path}: {e.strerror or e}") from None
        except ValueError:
            raise CaError(f"{path} is not a PEM certificate") from None
        names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        key = cert.public_key()
        if not names or not isinstance(key, ec.EllipticCurvePublicKey):
            raise CaError(f"{path} is not a rumor cluster CA (`rumor ca init`)")
        return cls(str(names[0].value), key)

    def vouches(self, c: Credential) -> bool:
        if c.kind != "ca":
            return False
        for _, sig in c.signatures:
            try:
                self.public_key.verify(sig, CREDENTIAL_CONTEXT + c.payload,
                                       ec.ECDSA(hashes.SHA256()))
                return True
            except InvalidSignature:
                continue
        return False


def issue_node_credential(ca_dir: Path, node: str, data_dir: Path,
                          issued_at: int | None = None) -> tuple[Path, str, bool]:
    """Sign ``node``'s node key (from ``data_dir``, created there if it has none) with
    the CA; writes ``data_dir/node.credential``. Returns its path, the key id and
    whether the key was created now."""
    _check_node(node)
    _, ca_key, cluster = _load_ca(ca_dir)
    try:
        key, created = load_or_create_key(data_dir)
        payload = credential_payload(cluster, node, key.public,
                                     int(time.time()) if issued_at is None else issued_at)
        sig = ca_key.sign(CREDENTIAL_CONTEXT + payload, ec.ECDSA(hashes.SHA256()))
        path = save_credential(data_dir, encode_credential("ca", payload, [(CA_SIGNER, sig)]))
    except ValueError as e:  # NodeKeyError
        raise CaError(str(e)) from None
    return path, key_id(key.public), created
