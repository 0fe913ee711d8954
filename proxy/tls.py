# layer: shell — TLS handshakes and certificate reloads (trio, socket, os)
"""Mutual TLS on the sidecar-to-sidecar hop: contexts, reloads, peer identities.

Every agent given ``--tls-ca/--tls-cert/--tls-key`` speaks TLS 1.3 on both ends of
the hop: its inbound listener requires a client certificate, its outbound connects
with one, and both verify the peer's chain against the cluster CA. Hostnames play no
part: what matters is *which services* the peer's certificate names (its SPIFFE URI
SANs, see ``identity.py``). The caller checks that the callee's certificate names
the service it is calling; the callee takes the caller's identity from the caller's
certificate, never from a header it could forge.

Certificates are short-lived by design (``rumor ca issue --days 90`` or less), so an
agent must pick up a renewed one without a restart: ``MeshTls.reload_if_changed``
re-reads the three files when their size or mtime changes, and new connections use
the new contexts (pooled ones keep theirs until they close). A renewal that does not
load (a key that does not match, a truncated file halfway through a copy) is logged
and the old contexts stay in use.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

from .identity import Identity, IdentityError, identity_of
from .sockio import ConnectionBroken, TimedOut, TlsSocketIO, Watchdog

log = logging.getLogger("rumor.tls")

#: A TLS handshake must finish within this (a slow or silent client is dropped).
HANDSHAKE_TIMEOUT = 10.0
#: How often the agent looks for renewed certificate files.
RELOAD_INTERVAL = 5.0
#: ALPN protocol ids (RFC 7301): HTTP/2 between sidecars, or HTTP/1.1.
ALPN_H2 = "h2"
ALPN_HTTP1 = "http/1.1"


class TlsConfigError(ValueError):
    """The CA, certificate or key files cannot be used (message for the operator)."""


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in (self.ca, self.cert, self.key):
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)


class MeshTls:
    """The agent's TLS contexts for both ends of the hop, and its own identity."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.server: ssl.SSLContext
        self.client: ssl.SSLContext
        #: The client side for HTTP/2 between sidecars: offers only ALPN ``h2``.
        self.client_h2: ssl.SSLContext
        self.identity: Identity
        self.not_after: datetime.datetime
        self._stamp: tuple[tuple[int, int], ...] = ()
        self.stats = {"handshakes": 0, "handshake_failures": 0, "reloads": 0,
                      "reload_failures": 0}
        self._load()

    def _load(self) -> None:
        (self.server, self.client, self.client_h2, self.identity, self.not_after,
         self._stamp) = _build(self.files)

    def check_files(self, files: TlsFiles) -> None:
        """Raise ``TlsConfigError`` if ``files`` cannot be used (a reload's check)."""
        _build(files)

    def use_files(self, files: TlsFiles) -> None:
        """Switch to other files (a reload changed the paths). They are loaded before
        anything is replaced, so a bad set keeps the contexts in use."""
        built = _build(files)
        self.files = files
        (self.server, self.client, self.client_h2, self.identity, self.not_after,
         self._stamp) = built
        self.stats["reloads"] += 1
        log.info("TLS files replaced: %s, valid until %s", self.describe(),
                 self.not_after.isoformat(), extra={"event": "tls_reloaded"})

    def reload_if_changed(self) -> bool:
        """Load the files again if any changed on disk; True if new contexts are in use."""
        try:
            if self.files.stamp() == self._stamp:
                return False
        except OSError:
            return False  # mid-replacement: look again next time
        try:
            self._load()
        except TlsConfigError as e:
            self.stats["reload_failures"] += 1
            log.error("renewed TLS files not loaded, still using the previous ones: %s", e,
                      extra={"event": "tls_reload_failed"})
            return False
        self.stats["reloads"] += 1
        log.info("TLS certificate reloaded: %s, valid until %s", self.describe(),
                 self.not_after.isoformat(), extra={"event": "tls_reloaded"})
        return True

    def describe(self) -> str:
        i = self.identity
        return (f"node {i.node or '?'} of cluster {i.cluster}, services "
                f"{', '.join(sorted(i.services)) or '(none)'}")

    async def run_reloader(self, interval: float = RELOAD_INTERVAL) -> None:
        """Watch the files until cancelled (a task of the agent's nursery)."""
        while True:
            await trio.sleep(interval)
            self.reload_if_changed()

    async def accept(self, sock: socket.socket, watchdog: Watchdog,
                     ) -> tuple[TlsSocketIO, Identity]:
        """Server side of a handshake on an accepted socket, within
        ``HANDSHAKE_TIMEOUT``; raises ``HandshakeFailed`` (the socket is then closed)."""
        io = TlsSocketIO(sock, watchdog, self.server, server_side=True)
        return io, await self.handshake(io)

    async def handshake(self, io: TlsSocketIO) -> Identity:
        """Complete ``io``'s handshake and verify the peer (closes ``io`` if not)."""
        io.set_deadline(trio.current_time() + HANDSHAKE_TIMEOUT)
        try:
            der = await io.handshake()
            peer = self.verify_peer(der)
        except TimedOut:
            self.stats["handshake_failures"] += 1
            io.close()
            raise HandshakeFailed(f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s") from None
        except ConnectionBroken as e:
            self.stats["handshake_failures"] += 1
            io.close()
            raise HandshakeFailed(str(e)) from None
        except HandshakeFailed:
            io.close()
            raise
        io.deadline = math.inf
        return peer

    def verify_peer(self, der: bytes) -> Identity:
        """The identity of a peer whose handshake presented ``der`` (its leaf
        certificate, already chain-verified by the TLS library); raises
        ``HandshakeFailed`` when it has none, names none, or is of another cluster."""
        if not der:
            self.stats["handshake_failures"] += 1
            raise HandshakeFailed("the peer sent no certificate")
        try:
            peer = identity_of(der)
        except IdentityError as e:
            self.stats["handshake_failures"] += 1
            raise HandshakeFailed(f"peer certificate: {e}") from None
        if peer.cluster != self.identity.cluster:
            self.stats["handshake_failures"] += 1
            raise HandshakeFailed(f"peer belongs to cluster {peer.cluster!r}, not "
                                  f"{self.identity.cluster!r}")
        self.stats["handshakes"] += 1
        return peer


class HandshakeFailed(Exception):
    """The peer did not complete a verified TLS 1.3 handshake."""


def _build(f: TlsFiles) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext, Identity,
                                 datetime.datetime, tuple[tuple[int, int], ...]]:
    """The contexts (server, HTTP/1.1 client, HTTP/2 client), the identity, its expiry
    and the files' stamp, from ``f``."""
    from cryptography import x509  # only an agent with mutual TLS needs it
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        stamp = f.stamp()
        server = _context(ssl.PROTOCOL_TLS_SERVER, f)
        client = _context(ssl.PROTOCOL_TLS_CLIENT, f)
        client_h2 = _context(ssl.PROTOCOL_TLS_CLIENT, f)
        client_h2.set_alpn_protocols([ALPN_H2])
        leaf = x509.load_pem_x509_certificate(f.cert.read_bytes())
        identity = identity_of(leaf.public_bytes(Encoding.DER))
    except ssl.SSLError as e:  # an OSError too: caught first, it names no file itself
        raise TlsConfigError(f"cannot load the TLS files ({f.cert}, {f.key}, {f.ca}): "
                             f"{e.reason or e}") from None
    except FileNotFoundError as e:
        raise TlsConfigError(f"{e.filename}: no such file") from None
    except OSError as e:
        raise TlsConfigError(f"{e.filename}: {e.strerror}") from None
    except (ValueError, IdentityError) as e:
        raise TlsConfigError(f"{f.cert}: {e}") from None
    return server, client, client_h2, identity, leaf.not_valid_after_utc, stamp


def _context(purpose: ssl._SSLMethod, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Identities are SPIFFE URIs checked by us, not host names.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    if purpose == ssl.PROTOCOL_TLS_SERVER:
        # No session tickets: a ticket arriving on an idle pooled connection makes it
        # readable, and the pool takes a readable idle connection for a closed one.
        ctx.num_tickets = 0
        # HTTP/2 for a caller that offers it; a caller offering nothing (the HTTP/1.1
        # pool, an agent older than HTTP/2 between sidecars) gets HTTP/1.1 as before.
        ctx.set_alpn_protocols([ALPN_H2, ALPN_HTTP1])
    return ctx
