"""The cluster CA: creating it and issuing the certificates that carry identities
(``identity.py`` reads them back).

The CA is a self-signed ECDSA P-256 certificate whose subject O is the cluster name
(``issue`` reads it back from there, so the CA directory is all it needs). Its
``ca.key`` signs every identity of the cluster: it should live offline and come back
only to issue certificates. ``init_ca`` never replaces an existing CA, since every
certificate the old one issued would stop being trusted.

Sans-IO apart from reading and writing the files: no sockets, no event loop.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..gossip.files import write_atomic
from .identity import CLUSTER_NAME, DNS_LABEL, NODE_NAME, is_service_name, node_uri, service_uri

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_COMMON_NAME = "rumor cluster CA"
MAX_CA_DAYS = 36500
MAX_LEAF_DAYS = 3650
#: Certificates start this far in the past so a peer whose clock runs a little
#: behind accepts a certificate issued a moment ago.
CLOCK_SKEW = timedelta(minutes=5)


class CaError(ValueError):
    """A CA or certificate request that cannot be carried out (message for the operator)."""



# --- names ---------------------------------------------------------------------------

def _check_cluster(cluster: str) -> None:
    if not CLUSTER_NAME.fullmatch(cluster):
        raise CaError(f"bad cluster name {cluster!r}: 1-63 characters of a-z, 0-9, '.' "
                      "and '-', starting and ending with a letter or digit")


def _check_node(node: str) -> None:
    if not NODE_NAME.fullmatch(node):
        raise CaError(f"bad node name {node!r}: 1-63 characters of a-z, 0-9 and '-' "
                      "(the agent's --name)")


def _check_service(service: str) -> None:
    if not is_service_name(service):
        raise CaError(f"bad service name {service!r}: 1-63 characters of A-Z, a-z, 0-9, "
                      "'.', '_' and '-'")


def _check_days(days: int, most: int, what: str) -> None:
    if not 1 <= days <= most:
        raise CaError(f"{what} must be 1 to {most} days, got {days}")


# --- the CA ----------------------------------------------------------------------------

def init_ca(directory: Path, cluster: str, days: int = 3650) -> tuple[Path, Path]:
    """Create a cluster CA: ``DIR/ca.crt`` and ``DIR/ca.key`` (0600). Returns their paths.

    Refuses if ``DIR`` already holds either file: the certificate may be there alone
    because its key was moved offline, and replacing it would just as surely orphan
    every certificate already issued."""
    _check_cluster(cluster)
    _check_days(days, MAX_CA_DAYS, "the CA's validity")
    crt_path, key_path = directory / CA_CERT, directory / CA_KEY
    for p in (key_path, crt_path):
        if p.exists():
            raise _ca_exists(directory, p)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise CaError(f"cannot create {directory}: {e.strerror or e}") from None

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{cluster}")]), critical=False)
            .sign(key, hashes.SHA256()))

    # The key first: its exclusive creation is what claims the directory.
    _write_new(key_path, _key_pem(key), 0o600, directory)
    try:
        _write_new(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, directory)
    except CaError:
        with contextlib.suppress(OSError):
            key_path.unlink()  # no certificate was issued with it: leave a clean directory
        raise
    return crt_path, key_path


def _ca_exists(directory: Path, found: Path) -> CaError:
    return CaError(f"{directory} already holds a CA ({found.name}); refusing to replace it, "
                   "which would make every certificate it issued untrusted. Use another "
                   "--dir for a new CA")


def _write_new(path: Path, data: bytes, mode: int, directory: Path) -> None:
    try:
        write_atomic(path, data, mode, exclusive=True)
    except FileExistsError:
        raise _ca_exists(directory, path) from None
    except OSError as e:
        raise CaError(f"cannot write {path}: {e.strerror or e}") from None


# --- issuing ---------------------------------------------------------------------------

def issue(ca_dir: Path, node: str, services: list[str], days: int, out_prefix: Path, *,
          not_before: datetime | None = None,
          not_after: datetime | None = None) -> tuple[Path, Path]:
    """Issue a certificate for ``node`` serving ``services``: writes ``PREFIX.crt`` (the
    leaf, then the CA: a chain file) and ``PREFIX.key`` (0600). Returns their paths.

    Existing files at PREFIX are replaced atomically (that is a renewal; a running
    agent reloads them). ``not_before``/``not_after`` override the validity window
    (tests use them to make expired certificates)."""
    _check_node(node)
    if not services:
        raise CaError("a certificate needs at least one service (--service NAME)")
    for s in services:
        _check_service(s)
    _check_days(days, MAX_LEAF_DAYS, "a certificate's validity")
    crt_path, key_path = _prefix_paths(out_prefix)
    ca_cert, ca_key, cluster = _load_ca(ca_dir)
    for p in (crt_path, key_path):
        if p.resolve() in ((ca_dir / CA_CERT).resolve(), (ca_dir / CA_KEY).resolve()):
            raise CaError(f"--out {out_prefix} would overwrite the CA's own {p.name}; "
                          "choose another prefix")

    now = datetime.now(UTC)
    start = _aware(not_before) if not_before is not None else now - CLOCK_SKEW
    end = _aware(not_after) if not_after is not None else now + timedelta(days=days)
    if end <= start:
        raise CaError(f"the validity window is empty ({start:%Y-%m-%d %H:%M} to "
                      f"{end:%Y-%m-%d %H:%M})")
    ca_end = ca_cert.not_valid_after_utc
    if ca_end <= now:
        raise CaError(f"the CA in {ca_dir} expired on {ca_end:%Y-%m-%d}: create a new CA "
                      "and re-issue every certificate")
    if end > ca_end:
        # Verification would fail from the CA's expiry on: say so now, not then.
        left = (ca_end - now).days
        raise CaError(f"the CA in {ca_dir} expires on {ca_end:%Y-%m-%d}, before this "
                      f"certificate would: issue with --days {left} or less, or rotate "
                      "the CA")

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(node_uri(cluster, node))]
    sans += [x509.UniformResourceIdentifier(service_uri(cluster, s))
             for s in dict.fromkeys(services)]
    if DNS_LABEL.fullmatch(node):
        sans.append(x509.DNSName(node))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
            .sign(ca_key, hashes.SHA256()))

    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, ca_cert))
    try:
        crt_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The key first, so a certificate never appears without its key.
        write_atomic(key_path, _key_pem(key), 0o600)
        write_atomic(crt_path, chain, 0o644)
    except OSError as e:
        raise CaError(f"cannot write to {crt_path.parent}: {e.strerror or e}") from None
    return crt_path, key_path


def _aware(t: datetime) -> datetime:
    """A naive time is taken as UTC, as X.509 does."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _prefix_paths(prefix: Path) -> tuple[Path, Path]:
    # "web-1.crt" means the prefix "web-1"; with_suffix would also cut "node.v2".
    if prefix.suffix in (".crt", ".key"):
        prefix = prefix.with_suffix("")
    if not prefix.name:
        raise CaError(f"--out {prefix} needs a file name prefix, e.g. certs/web-1")
    return prefix.with_name(prefix.name + ".crt"), prefix.with_name(prefix.name + ".key")


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
    """The CA certificate, its key and the cluster name, checked to belong together."""
    crt_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    has_crt, has_key = crt_path.exists(), key_path.exists()
    if not has_crt and not has_key:
        raise CaError(f"no CA in {ca_dir}: run `rumor ca init --dir {ca_dir} --cluster NAME` "
                      "first")
    if not has_key:
        raise CaError(f"{ca_dir} has the CA certificate but not its key ({CA_KEY}): issue "
                      "where the CA key is kept, or bring it back for the issuing")
    if not has_crt:
        raise CaError(f"{ca_dir} has {CA_KEY} but not {CA_CERT}: restore the CA certificate "
                      "(every agent has a copy)")
    try:
        crt_pem, key_pem = crt_path.read_bytes(), key_path.read_bytes()
    except OSError as e:
        raise CaError(f"cannot read {e.filename}: {e.strerror or e}") from None
    try:
        cert = x509.load_pem_x509_certificate(crt_pem)
        cert_public = _public_der(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        raise CaError(f"{crt_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CaError(f"{key_path} is encrypted; rumor needs the unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CaError(f"{key_path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{key_path} is not an ECDSA key; was it made by `rumor ca init`?")
    if _public_der(key.public_key()) != cert_public:
        raise CaError(f"{key_path} is not the key of {crt_path}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        is_ca = False
    if not is_ca:
        raise CaError(f"{crt_path} is not a CA certificate")
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    cluster = orgs[0].value if len(orgs) == 1 else None
    if not isinstance(cluster, str) or not CLUSTER_NAME.fullmatch(cluster):
        raise CaError(f"{crt_path} does not name a cluster (its subject O); was it made by "
                      "`rumor ca init`?")
    return cert, key, cluster


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _authority_key_id(ca_cert: x509.Certificate,
                      ca_key: ec.EllipticCurvePrivateKey) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())

