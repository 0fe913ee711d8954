"""Who a sidecar is, in X.509 terms: the identity read back from a peer's certificate
after a verified handshake (the CA that issues them is ``ca.py``).

Identities are SPIFFE IDs in URI subjectAltNames, never host names: sidecars move
between addresses, and what a caller must prove is which *services* it may act as.
A certificate names its node once and each service it serves::

    spiffe://CLUSTER/node/NODE
    spiffe://CLUSTER/service/SERVICE

``cryptography`` is imported only when a certificate is read: an agent without mutual
TLS never loads it (about 14 MiB of resident memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CLUSTER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")
NODE_NAME = re.compile(r"[a-z0-9-]{1,63}")
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SERVICE = re.compile(r"[A-Za-z0-9._-]{1,63}")
_SPIFFE = re.compile(r"spiffe://([^/]*)(?:/(node|service)/([^/]*))?")
SPIFFE_SCHEME = "spiffe://"


def is_service_name(name: str) -> bool:
    # "." and ".." would be path segments a SPIFFE ID may not contain.
    return _SERVICE.fullmatch(name) is not None and name not in (".", "..")


class IdentityError(ValueError):
    """A certificate that does not carry a usable rumor identity."""



def service_uri(cluster: str, service: str) -> str:
    return f"spiffe://{cluster}/service/{service}"


def node_uri(cluster: str, node: str) -> str:
    return f"spiffe://{cluster}/node/{node}"


@dataclass(frozen=True)
class Identity:
    """What a certificate proves: the cluster, the node (if named) and its services."""

    cluster: str
    node: str | None
    services: frozenset[str]

    def names(self, service: str) -> bool:
        """True if the holder of this certificate may act as ``service``."""
        return service in self.services

    def uris(self) -> list[str]:
        """The SPIFFE IDs, node first, then services in name order."""
        out = [node_uri(self.cluster, self.node)] if self.node is not None else []
        return out + [service_uri(self.cluster, s) for s in sorted(self.services)]


# --- reading identities ----------------------------------------------------------------

def identity_of(cert_der: bytes) -> Identity:
    """The identity a DER certificate names (as ``getpeercert(binary_form=True)`` gives).

    Only reads: the chain must already have been verified (by the TLS handshake)
    against the cluster CA. Raises ``IdentityError`` and nothing else, whatever the
    bytes."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(bytes(cert_der))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate has no subjectAltName, so no spiffe:// "
                            "identity") from None
    # Malformed input surfaces as ValueError and several other, undocumented types
    # (fuzzing found x509.InvalidVersion): the try holds only parser calls.
    except Exception:
        raise IdentityError("not a readable DER X.509 certificate") from None
    return _identity_from_uris(uris)


def _identity_from_uris(uris: list[str]) -> Identity:
    clusters: set[str] = set()
    nodes: set[str] = set()
    services: set[str] = set()
    seen = False
    for uri in uris:
        if uri[:len(SPIFFE_SCHEME)].lower() != SPIFFE_SCHEME:
            continue  # other URIs are not ours to judge
        seen = True
        m = _SPIFFE.fullmatch(uri)
        if m is None or not CLUSTER_NAME.fullmatch(m[1]) or not (
                m[2] is None
                or (m[2] == "node" and NODE_NAME.fullmatch(m[3]))
                or (m[2] == "service" and is_service_name(m[3]))):
            raise IdentityError(f"malformed SPIFFE ID {_short(uri)}: expected "
                                "spiffe://CLUSTER/node/NODE or spiffe://CLUSTER/service/NAME")
        clusters.add(m[1])
        if m[2] == "node":
            nodes.add(m[3])
        elif m[2] == "service":
            services.add(m[3])
    if not seen:
        raise IdentityError("the certificate has no spiffe:// URI: not issued by a rumor CA")
    if len(clusters) > 1:
        raise IdentityError(f"the certificate names several clusters: {_names(clusters)}")
    if len(nodes) > 1:
        raise IdentityError(f"the certificate names several nodes: {_names(nodes)}")
    if not nodes and not services:
        raise IdentityError("the certificate names no node and no service (is it the CA "
                            "certificate?)")
    return Identity(clusters.pop(), nodes.pop() if nodes else None, frozenset(services))


def _short(text: str, limit: int = 80) -> str:
    """A quoted, bounded rendering of untrusted text for error messages and logs."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _names(items: set[str]) -> str:
    return ", ".join(repr(s) for s in sorted(items))


