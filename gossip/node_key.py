# layer: shell — reads and writes the node key file (os)
"""A member's own key and the credential that binds its name to it.

Each agent holds an Ed25519 *node key* in its data directory (``node.key``, 0600). What
it says about itself in gossip (its alive: incarnation, address, tags; its leave) is
signed by that key, so nobody else can say it (``identity.py``). The key is its own: the
mesh certificates are ECDSA P-256 and the gossip keyring is symmetric; a node key only
ever signs the member's word about itself.

*Who owns a name* comes from a **node credential**: the statement "in cluster C, name N
has public key K, issued at T", signed by an authority the cluster trusts. Two kinds:

* the mesh CA (``rumor ca credential``): one ECDSA P-256 signature by ``ca.key``,
  checked against ``ca.crt`` (``proxy/ca.py`` provides that authority);
* the policy trust keys (``rumor policy credential``): Ed25519 signatures by at least
  ``threshold`` distinct trusted publisher keys (``Ed25519Authority`` below; the agent
  builds it from its ``--trust-key`` set).

The newest ``issued_at`` wins, so a lost key is replaced by issuing a new credential
for a new key. A plaintext cluster may instead opt into trust on first use: the
credential is then only the member's own claim of its key (``kind = "tofu"``, no
signature), and it binds only when it comes in the member's own push-pull.

Encoding (msgpack, untrusted bytes checked field by field; ``CredentialError`` only)::

    credential = [1, kind, payload, signatures]
    payload    = msgpack [cluster, name, public key (32 bytes), issued_at (seconds)]
    signatures = [[key id, signature], ...]    (empty for "tofu")

Signatures cover ``CREDENTIAL_CONTEXT + payload``: the exact payload bytes, never a
re-encoding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .fields import describe, valid_counter, valid_name
from .files import write_atomic

KEY_FILE = "node.key"
CREDENTIAL_FILE = "node.credential"
KEY_TAG = b"rumor-node-ed25519 "
KEY_BYTES = 32
SIG_BYTES = 64
CREDENTIAL_CONTEXT = b"rumor-node-credential-v1\0"
CREDENTIAL_VERSION = 1
#: A credential is small (a name, a key, one or a few signatures).
MAX_CREDENTIAL = 1024
MAX_SIGNATURES = 8
MAX_CLUSTER = 63
KINDS = ("ca", "ed25519", "tofu")


class CredentialError(ValueError):
    """Bytes that are not a well-formed node credential."""


class NodeKeyError(ValueError):
    """The node key file cannot be read or written (message for the operator)."""


def key_id(raw_public: bytes) -> str:
    """The short id of an Ed25519 public key: as ``policy/keys.py`` computes it."""
    return hashlib.blake2b(raw_public, digest_size=32).hexdigest()[:16]


# --- the node key ---------------------------------------------------------------------

@dataclass(frozen=True)
class NodeKey:
    """This agent's signing key."""

    signing: SigningKey = field(repr=False)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """A key from 32 bytes (the simulator derives each node's from its seed)."""
        return cls(SigningKey(hashlib.blake2b(seed, digest_size=32).digest()))

    @property
    def public(self) -> bytes:
        return bytes(self.signing.verify_key)

    def sign(self, message: bytes) -> bytes:
        return bytes(self.signing.sign(message).signature)


def load_or_create_key(data_dir: Path) -> tuple[NodeKey, bool]:
    """The node key in ``data_dir`` (created, 0600, if there is none); and whether it
    was created now."""
    path = data_dir / KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = NodeKey.generate()
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(path, KEY_TAG + bytes(key.signing.encode()).hex().encode() + b"\n",
                         0o600)
        except OSError as e:
            raise NodeKeyError(f"cannot write the node key {path}: {e.strerror or e}") from None
        return key, True
    except OSError as e:
        raise NodeKeyError(f"cannot read the node key {path}: {e.strerror or e}") from None
    if not data.startswith(KEY_TAG):
        raise NodeKeyError(f"{path} is not a rumor node key (it should start with "
                           f"{KEY_TAG.decode().strip()!r})")
    try:
        seed = bytes.fromhex(data[len(KEY_TAG):].strip().decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise NodeKeyError(f"{path}: the key is not hexadecimal") from None
    if len(seed) != KEY_BYTES:
        raise NodeKeyError(f"{path}: a node key is {KEY_BYTES} bytes, got {len(seed)}")
    if os.stat(path).st_mode & 0o077:
        raise NodeKeyError(f"{path} is readable by others: chmod 600 {path}")
    return NodeKey(SigningKey(seed)), False


# --- credentials ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Credential:
    """A name's key, as an authority (or, for "tofu", the member itself) states it."""

    kind: str
    cluster: str
    name: str
    public_key: bytes
    issued_at: int
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]
    #: The exact encoded bytes (what travels, and the verification cache's key).
    raw: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def verifier(self) -> VerifyKey:
        return _verify_key(self.public_key)


_VERIFY_KEYS: dict[bytes, VerifyKey] = {}


def _verify_key(raw: bytes) -> VerifyKey:
    """Decoding a curve point costs as much as a verification: once per key and
    process (the simulator holds thousands of nodes' keys)."""
    vk = _VERIFY_KEYS.get(raw)
    if vk is None:
        if len(_VERIFY_KEYS) >= 1 << 16:
            _VERIFY_KEYS.clear()
        vk = _VERIFY_KEYS[raw] = VerifyKey(raw)
    return vk


def ed25519_valid(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of exactly ``message``."""
    if len(signature) != SIG_BYTES or len(public_key) != KEY_BYTES:
        return False
    try:
        _verify_key(public_key).verify(message, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


def credential_payload(cluster: str, name: str, public_key: bytes, issued_at: int) -> bytes:
    _check_fields(cluster, name, public_key, issued_at)
    data: bytes = msgpack.packb([cluster, name, public_key, issued_at])
    return data


def encode_credential(kind: str, payload: bytes,
                      signatures: Iterable[tuple[str, bytes]] = ()) -> bytes:
    data: bytes = msgpack.packb([CREDENTIAL_VERSION, kind, payload,
                                 [[k, s] for k, s in signatures]])
    return data


def tofu_credential(cluster: str, name: str, public_key: bytes, issued_at: int) -> bytes:
    """A member's own claim of its key (binds only on first use, see the module)."""
    return encode_credential("tofu", credential_payload(cluster, name, public_key, issued_at))


_DECODED: dict[bytes, Credential] = {}


def decode_credential(raw: bytes) -> Credential:
    """The credential ``raw`` encodes (its signatures are *not* checked here)."""
    c = _DECODED.get(raw)
    if c is not None:
        return c
    if type(raw) is not bytes or len(raw) > MAX_CREDENTIAL:
        raise CredentialError(f"a credential is at most {MAX_CREDENTIAL} bytes")
    try:
        v = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        p = msgpack.unpackb(v[2], raw=False) if type(v) is list and len(v) == 4 and \
            type(v[2]) is bytes else None
    except Exception as e:  # msgpack raises many types; callers want exactly one
        raise CredentialError(f"malformed credential: {type(e).__name__}") from None
    if p is None or v[0] != CREDENTIAL_VERSION or v[1] not in KINDS:
        raise CredentialError(f"not a version-{CREDENTIAL_VERSION} node credential")
    if type(p) is not list or len(p) != 4:
        raise CredentialError(f"a credential payload has 4 fields, got {describe(p)}")
    cluster, name, public_key, issued_at = p
    try:
        _check_fields(cluster, name, public_key, issued_at)
    except ValueError as e:
        raise CredentialError(str(e)) from None
    sigs = v[3]
    if type(sigs) is not list or len(sigs) > MAX_SIGNATURES:
        raise CredentialError(f"a credential has at most {MAX_SIGNATURES} signatures")
    out: list[tuple[str, bytes]] = []
    for s in sigs:
        if type(s) is not list or len(s) != 2 or type(s[0]) is not str or \
                len(s[0]) > 64 or type(s[1]) is not bytes or len(s[1]) > 256:
            raise CredentialError("a credential signature is [key id, bytes]")
        out.append((s[0], s[1]))
    if (v[1] == "tofu") != (not out):
        raise CredentialError("a tofu credential has no signature; others have some")
    c = Credential(v[1], cluster, name, public_key, issued_at, v[2], tuple(out), raw)
    if len(_DECODED) >= 1 << 16:
        _DECODED.clear()
    _DECODED[raw] = c
    return c


def _check_fields(cluster: Any, name: Any, public_key: Any, issued_at: Any) -> None:
    if type(cluster) is not str or not 0 < len(cluster) <= MAX_CLUSTER \
            or not cluster.isprintable():
        raise CredentialError(f"bad cluster name {describe(cluster)}")
    if not valid_name(name):
        raise CredentialError(f"bad member name {describe(name)}")
    if type(public_key) is not bytes or len(public_key) != KEY_BYTES:
        raise CredentialError(f"a node key is {KEY_BYTES} bytes")
    if not valid_counter(issued_at):
        raise CredentialError(f"bad issued_at {describe(issued_at)}")


class CredentialAuthority(Protocol):
    """Whoever may bind names to keys in this cluster."""

    @property
    def cluster(self) -> str:
        """The cluster its credentials must name."""
        ...

    def vouches(self, c: Credential) -> bool:
        """Whether ``c``'s signatures are this authority's (its payload is checked by
        the caller)."""
        ...


@dataclass(frozen=True)
class Ed25519Authority:
    """Credentials signed by ``threshold`` distinct keys of a set (the policy trust
    keys, or in tests and the simulator a single made-up key)."""

    cluster: str
    keys: dict[str, bytes]
    threshold: int = 1

    @classmethod
    def of(cls, cluster: str, keys: Iterable[bytes], threshold: int = 1) -> Ed25519Authority:
        ks = {key_id(k): k for k in keys}
        if not 1 <= threshold <= len(ks):
            raise ValueError(f"threshold {threshold} needs 1 to {len(ks)} keys")
        return cls(cluster, ks, threshold)

    def vouches(self, c: Credential) -> bool:
        if c.kind != "ed25519":
            return False
        good: set[str] = set()
        message = CREDENTIAL_CONTEXT + c.payload
        for kid, sig in c.signatures:
            key = self.keys.get(kid)
            if key is not None and kid not in good and ed25519_valid(key, message, sig):
                good.add(kid)
        return len(good) >= self.threshold


def sign_ed25519_credential(signers: Iterable[SigningKey], cluster: str, name: str,
                            public_key: bytes, issued_at: int) -> bytes:
    """A credential signed by each of ``signers`` (policy publisher keys)."""
    payload = credential_payload(cluster, name, public_key, issued_at)
    sigs = [(key_id(bytes(s.verify_key)), bytes(s.sign(CREDENTIAL_CONTEXT + payload).signature))
            for s in signers]
    return encode_credential("ed25519", payload, sigs)


@dataclass
class AnyOf:
    """Several authorities (the CA and the trust keys): one vouching is enough."""

    authorities: list[CredentialAuthority]

    @property
    def cluster(self) -> str:
        return self.authorities[0].cluster if self.authorities else ""

    def vouches(self, c: Credential) -> bool:
        return any(a.vouches(c) for a in self.authorities if a.cluster == c.cluster)


def load_credential(data_dir: Path) -> bytes | None:
    """``node.credential`` from ``data_dir``, if there is one."""
    path = data_dir / CREDENTIAL_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NodeKeyError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        decode_credential(raw)
    except CredentialError as e:
        raise NodeKeyError(f"{path}: {e}") from None
    return raw


def save_credential(data_dir: Path, raw: bytes) -> Path:
    path = data_dir / CREDENTIAL_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, raw, 0o644)
    except OSError as e:
        raise NodeKeyError(f"cannot write {path}: {e.strerror or e}") from None
    return path
