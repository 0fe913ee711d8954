"""The cluster CA: files and their modes, refusals, the identities certificates carry,
and real TLS 1.3 handshakes (in memory) between certificates it issued."""

from __future__ import annotations

import argparse
import contextlib
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.cli.ca_cmd import add_ca_parser, run_ca
from rumor.proxy.ca import CaError, init_ca, issue
from rumor.proxy.identity import (
    Identity,
    IdentityError,
    identity_of,
    node_uri,
    service_uri,
)


def _leaf(crt: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(crt.read_bytes())[0]


def _der(crt: Path) -> bytes:
    return _leaf(crt).public_bytes(Encoding.DER)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    init_ca(d, "prod")
    return d


# --- init ------------------------------------------------------------------------------

def test_init_writes_ca_files(tmp_path: Path) -> None:
    d = tmp_path / "new" / "ca"
    crt, key = init_ca(d, "prod.example", days=30)
    assert (crt, key) == (d / "ca.crt", d / "ca.key")
    assert _mode(key) == 0o600
    assert _mode(d) == 0o700
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary files
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value \
        == "prod.example"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value \
        == "rumor cluster CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > timedelta(days=30)


def test_init_never_replaces_a_ca(ca: Path) -> None:
    before = (ca / "ca.key").read_bytes(), (ca / "ca.crt").read_bytes()
    with pytest.raises(CaError, match="already holds a CA"):
        init_ca(ca, "prod")
    # The key moved offline: the certificate alone still marks the directory as taken.
    (ca / "ca.key").unlink()
    with pytest.raises(CaError, match=r"already holds a CA \(ca.crt\)"):
        init_ca(ca, "other")
    assert (ca / "ca.crt").read_bytes() == before[1]


@pytest.mark.parametrize("name", ["", "Prod", "a_b", "-prod", "prod.", "a" * 64, "a b",
                                  "prod/x", "é"])
def test_init_refuses_bad_cluster_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(CaError, match="bad cluster name"):
        init_ca(tmp_path / "ca", name)
    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize("days", [0, -1, 36501])
def test_init_refuses_bad_days(tmp_path: Path, days: int) -> None:
    with pytest.raises(CaError, match="validity"):
        init_ca(tmp_path / "ca", "prod", days=days)


# --- issue -----------------------------------------------------------------------------

def test_issue_writes_chain_and_key(ca: Path, tmp_path: Path) -> None:
    crt, key = issue(ca, "web-1", ["web", "web-admin"], 90, tmp_path / "certs" / "web-1")
    assert (crt.name, key.name) == ("web-1.crt", "web-1.key")
    assert _mode(key) == 0o600
    chain = x509.load_pem_x509_certificates(crt.read_bytes())
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    assert len(chain) == 2 and chain[1] == ca_cert
    leaf = chain[0]
    leaf.verify_directly_issued_by(ca_cert)
    assert sorted(_uris(leaf)) == sorted([node_uri("prod", "web-1"),
                                          service_uri("prod", "web"),
                                          service_uri("prod", "web-admin")])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web-1"]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-1"
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    life = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=89) < life <= timedelta(days=90)

    assert identity_of(leaf.public_bytes(Encoding.DER)) == Identity(
        "prod", "web-1", frozenset({"web", "web-admin"}))
    ident = identity_of(leaf.public_bytes(Encoding.DER))
    assert ident.names("web") and not ident.names("db")
    assert ident.uris() == ["spiffe://prod/node/web-1", "spiffe://prod/service/web",
                            "spiffe://prod/service/web-admin"]


def test_issue_renews_in_place(ca: Path, tmp_path: Path) -> None:
    first = issue(ca, "web-1", ["web"], 90, tmp_path / "web-1")
    old = first[1].read_bytes()
    second = issue(ca, "web-1", ["web", "api"], 30, tmp_path / "web-1.crt")
    assert second == first
    assert first[1].read_bytes() != old and _mode(first[1]) == 0o600
    assert identity_of(_der(first[0])).services == {"web", "api"}


def test_node_that_is_not_a_dns_label_gets_no_dns_name(ca: Path, tmp_path: Path) -> None:
    crt, _ = issue(ca, "-odd-", ["web"], 1, tmp_path / "odd")
    san = _leaf(crt).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert identity_of(_der(crt)).node == "-odd-"


def test_issue_without_a_ca_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(CaError, match=r"no CA in .*: run `rumor ca init --dir .* "
                                      r"--cluster NAME` first"):
        issue(tmp_path / "nothing", "web-1", ["web"], 90, tmp_path / "web-1")


def test_issue_without_the_ca_key_says_where_it_is(ca: Path, tmp_path: Path) -> None:
    (ca / "ca.key").rename(tmp_path / "offline.key")
    with pytest.raises(CaError, match="not its key"):
        issue(ca, "web-1", ["web"], 90, tmp_path / "web-1")


def test_issue_refuses_a_key_of_another_ca(ca: Path, tmp_path: Path) -> None:
    init_ca(tmp_path / "other", "prod")
    (tmp_path / "other" / "ca.key").replace(ca / "ca.key")
    with pytest.raises(CaError, match="is not the key of"):
        issue(ca, "web-1", ["web"], 90, tmp_path / "web-1")


def test_issue_never_overwrites_the_ca(ca: Path) -> None:
    with pytest.raises(CaError, match="would overwrite the CA"):
        issue(ca, "web-1", ["web"], 90, ca / "ca")


def test_issue_refuses_to_outlive_the_ca(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", "prod", days=10)
    with pytest.raises(CaError, match=r"expires on .*--days 9 or less"):
        issue(tmp_path / "ca", "web-1", ["web"], 90, tmp_path / "web-1")


@pytest.mark.parametrize(("node", "services", "days", "message"), [
    ("Web-1", ["web"], 90, "bad node name"),
    ("web_1", ["web"], 90, "bad node name"),
    ("", ["web"], 90, "bad node name"),
    ("w" * 64, ["web"], 90, "bad node name"),
    ("web-1", [], 90, "at least one service"),
    ("web-1", ["web", "a/b"], 90, "bad service name"),
    ("web-1", [".."], 90, "bad service name"),
    ("web-1", ["s" * 64], 90, "bad service name"),
    ("web-1", ["web"], 0, "validity"),
    ("web-1", ["web"], 3651, "validity"),
])
def test_issue_refuses_bad_requests(ca: Path, tmp_path: Path, node: str,
                                    services: list[str], days: int, message: str) -> None:
    with pytest.raises(CaError, match=message):
        issue(ca, node, services, days, tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


# --- identities from certificates --------------------------------------------------------

def _self_signed(sans: list[x509.GeneralName] | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(1)
         .not_valid_before(now).not_valid_after(now + timedelta(days=1)))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def _uri_sans(*uris: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(u) for u in uris]


def test_identity_with_services_only_and_foreign_uris() -> None:
    der = _self_signed(_uri_sans("https://example.com/", "spiffe://prod/service/web"))
    assert identity_of(der) == Identity("prod", None, frozenset({"web"}))


@pytest.mark.parametrize(("sans", "message"), [
    (None, "no subjectAltName"),
    ([x509.DNSName("web-1")], "no spiffe:// URI"),
    (_uri_sans("https://prod/service/web"), "no spiffe:// URI"),
    (_uri_sans("spiffe://prod/service/web", "spiffe://dev/service/db"), "several clusters"),
    (_uri_sans("spiffe://prod/node/a", "spiffe://prod/node/b"), "several nodes"),
    (_uri_sans("spiffe://prod"), "no node and no service"),
    (_uri_sans("spiffe://prod/service/web/extra"), "malformed SPIFFE ID"),
    (_uri_sans("spiffe://prod/service/"), "malformed SPIFFE ID"),
    (_uri_sans("spiffe://prod/service/.."), "malformed SPIFFE ID"),
    (_uri_sans("spiffe://prod/user/bob"), "malformed SPIFFE ID"),
    (_uri_sans("spiffe://Prod/service/web"), "malformed SPIFFE ID"),
    (_uri_sans("SPIFFE://prod/service/web"), "malformed SPIFFE ID"),
])
def test_identity_refusals(sans: list[x509.GeneralName] | None, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        identity_of(_self_signed(sans))


def test_identity_of_the_ca_certificate_is_refused(ca: Path) -> None:
    with pytest.raises(IdentityError, match="CA certificate"):
        identity_of(_der(ca / "ca.crt"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024))
def test_identity_of_arbitrary_bytes_raises_only_identity_error(data: bytes) -> None:
    with contextlib.suppress(IdentityError):
        identity_of(data)


def test_identity_of_a_certificate_with_an_unknown_version(ca: Path, tmp_path: Path) -> None:
    crt, _ = issue(ca, "web-1", ["web"], 90, tmp_path / "web-1")
    der = _der(crt)
    v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2, near the start
    assert der.index(v3) < 16
    with pytest.raises(IdentityError, match="not a readable"):
        identity_of(der.replace(v3, bytes.fromhex("a003020139"), 1))


@pytest.fixture(scope="module")
def leaf_der(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("fuzz")
    init_ca(d / "ca", "prod")
    crt, _ = issue(d / "ca", "web-1", ["web", "api"], 90, d / "web-1")
    return _der(crt)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                max_size=4), st.integers(0, 10_000))
def test_identity_of_a_damaged_certificate_raises_only_identity_error(
        leaf_der: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    # Random bytes rarely get past the outer DER; a damaged real certificate reaches the
    # extension and name parsers.
    data = bytearray(leaf_der)
    for pos, value in edits:
        data[pos % len(data)] = value
    try:
        ident = identity_of(bytes(data[:len(data) - cut % 64]))
    except IdentityError:
        return
    assert ident.cluster


# --- TLS 1.3 handshakes ------------------------------------------------------------------

def _context(server: bool, ca_crt: Path, prefix: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Python 3.13 verifies strictly by default: the certificates must pass that too.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=str(ca_crt))
    ctx.load_cert_chain(str(prefix) + ".crt", str(prefix) + ".key")
    return ctx


def _handshake(client_ctx: ssl.SSLContext,
               server_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Both ends of a handshake through memory; an ``ssl.SSLError`` from either end
    propagates."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            client.write(b"ping")
            s_in.write(c_out.read())
            assert server.read(4) == b"ping"
            return client, server
    raise AssertionError("the handshake did not finish")


@pytest.fixture
def pair(ca: Path, tmp_path: Path) -> tuple[Path, Path]:
    issue(ca, "web-1", ["web"], 90, tmp_path / "web-1")
    issue(ca, "api-1", ["api", "api-admin"], 90, tmp_path / "api-1")
    return tmp_path / "web-1", tmp_path / "api-1"


def test_handshake_between_leaves_of_one_ca(ca: Path, pair: tuple[Path, Path]) -> None:
    web, api = pair
    client, server = _handshake(_context(False, ca / "ca.crt", web),
                                _context(True, ca / "ca.crt", api))
    assert client.version() == "TLSv1.3"
    client_der, server_der = client.getpeercert(True), server.getpeercert(True)
    assert client_der is not None and server_der is not None
    assert identity_of(client_der) == Identity("prod", "api-1",
                                               frozenset({"api", "api-admin"}))
    assert identity_of(server_der) == Identity("prod", "web-1", frozenset({"web"}))


def test_handshake_refuses_a_server_of_another_ca(ca: Path, tmp_path: Path,
                                                  pair: tuple[Path, Path]) -> None:
    web, _ = pair
    init_ca(tmp_path / "evil", "prod")
    issue(tmp_path / "evil", "api-1", ["api"], 90, tmp_path / "fake")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(_context(False, ca / "ca.crt", web),
                   _context(True, tmp_path / "evil" / "ca.crt", tmp_path / "fake"))


def test_handshake_refuses_a_client_of_another_ca(ca: Path, tmp_path: Path,
                                                  pair: tuple[Path, Path]) -> None:
    _, api = pair
    init_ca(tmp_path / "evil", "prod")
    issue(tmp_path / "evil", "web-1", ["web"], 90, tmp_path / "fake")
    # The client trusts the real CA, so only the server's check can stop it.
    with pytest.raises(ssl.SSLError):
        _handshake(_context(False, ca / "ca.crt", tmp_path / "fake"),
                   _context(True, ca / "ca.crt", api))


def test_handshake_refuses_expired_certificates(ca: Path, tmp_path: Path,
                                                pair: tuple[Path, Path]) -> None:
    web, api = pair
    now = datetime.now(UTC)
    issue(ca, "old-1", ["old"], 1, tmp_path / "old-1",
          not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))
    old = tmp_path / "old-1"
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        _handshake(_context(False, ca / "ca.crt", web), _context(True, ca / "ca.crt", old))
    with pytest.raises(ssl.SSLError):
        _handshake(_context(False, ca / "ca.crt", old), _context(True, ca / "ca.crt", api))


# --- the command -----------------------------------------------------------------------

def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rumor")
    add_ca_parser(parser.add_subparsers(dest="command"))
    return run_ca(parser.parse_args(argv))


def test_cli_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    assert _run("ca", "init", "--dir", str(d), "--cluster", "prod") == 0
    out = capsys.readouterr().out
    assert str(d / "ca.key") in out and "offline" in out
    assert _run("ca", "issue", "--dir", str(d), "--node", "web-1", "--service", "web",
                "--service", "api", "--days", "30", "--out", str(tmp_path / "web-1")) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "web-1.crt") in out and str(tmp_path / "web-1.key") in out
    assert "spiffe://prod/node/web-1" in out and "spiffe://prod/service/api" in out
    expiry = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%d")
    assert f"valid until {expiry}" in out and "(30 days)" in out


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("ca", "issue", "--dir", str(tmp_path), "--node", "web-1", "--service",
                "web", "--out", str(tmp_path / "web-1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("rumor: no CA in ") and err.count("\n") == 1
    assert _run("ca", "init", "--dir", str(tmp_path / "ca"), "--cluster", "BAD") == 1
    assert capsys.readouterr().err.startswith("rumor: bad cluster name 'BAD'")
