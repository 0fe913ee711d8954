# layer: shell — reads and writes key files (os)
"""Publisher keys: Ed25519 signing keys, their public halves and short key ids.

A key id names a public key in envelopes and logs without carrying the key: the
first 8 bytes of BLAKE2b-256 of the raw public key, as 16 hex digits. Anyone can
recompute it from the public key, so a signature's claimed id is only a hint that
selects which trusted key to try; the signature itself decides.

Files are one line of text so operators can paste, diff and grep them:

- ``NAME.key``: ``rumor-ed25519-secret <base64 32-byte seed>`` (mode 0600),
- ``NAME.pub``: ``rumor-ed25519 <base64 32-byte public key> <key id>``.

A public key may also be given as the bare base64 string (inside trust documents).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

SECRET_TAG = "rumor-ed25519-secret"
PUBLIC_TAG = "rumor-ed25519"
KEY_BYTES = 32
SIG_BYTES = 64
KEY_ID_HEX = 16
MAX_KEY_FILE = 4096


class KeyFileError(ValueError):
    """A key file or key string that is not a valid rumor Ed25519 key."""


def key_id(raw_public: bytes) -> str:
    return hashlib.blake2b(raw_public, digest_size=32).hexdigest()[:KEY_ID_HEX]


@dataclass(frozen=True)
class PublicKey:
    """A trusted or candidate publisher key."""

    raw: bytes
    id: str
    # Decoding the curve point costs as much as a verification: do it once per key.
    _verifier: VerifyKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_verifier", VerifyKey(self.raw))

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        if len(raw) != KEY_BYTES:
            raise KeyFileError(f"an Ed25519 public key is {KEY_BYTES} bytes, got {len(raw)}")
        return cls(raw, key_id(raw))

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` is this key's signature of exactly ``message``."""
        if len(signature) != SIG_BYTES:
            return False
        try:
            self._verifier.verify(message, signature)
        except (BadSignatureError, ValueError):
            return False
        return True

    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def line(self) -> str:
        return f"{PUBLIC_TAG} {self.b64()} {self.id}"


@dataclass(frozen=True)
class SecretKey:
    """An operator's signing key."""

    seed: bytes

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(bytes(SigningKey.generate()))

    @property
    def public(self) -> PublicKey:
        return PublicKey.from_raw(bytes(SigningKey(self.seed).verify_key))

    def sign(self, message: bytes) -> bytes:
        return SigningKey(self.seed).sign(message).signature

    def line(self) -> str:
        return f"{SECRET_TAG} {base64.b64encode(self.seed).decode()}"


def _b64_32(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{what} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise KeyFileError(f"{what} must decode to {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def parse_public_key(text: str) -> PublicKey:
    """A public key from a ``.pub`` line or a bare base64 string.

    A ``.pub`` line's key id must match its key (a typo or an edited id is caught
    here rather than showing up as a puzzling signature failure later)."""
    parts = text.strip().split()
    if len(parts) == 1:
        return PublicKey.from_raw(_b64_32(parts[0], "public key"))
    if len(parts) == 3 and parts[0] == PUBLIC_TAG:
        pk = PublicKey.from_raw(_b64_32(parts[1], "public key"))
        if pk.id != parts[2]:
            raise KeyFileError(f"key id {parts[2]!r} does not match the key (expected {pk.id})")
        return pk
    if parts and parts[0] == SECRET_TAG:
        raise KeyFileError("this is a secret key; give the public key (.pub) instead")
    raise KeyFileError(f"expected '{PUBLIC_TAG} <base64 key> <key id>' or a base64 key")


def parse_secret_key(text: str) -> SecretKey:
    parts = text.strip().split()
    if len(parts) == 2 and parts[0] == SECRET_TAG:
        return SecretKey(_b64_32(parts[1], "secret key"))
    if parts and parts[0] == PUBLIC_TAG:
        raise KeyFileError("this is a public key; signing needs the secret key (.key)")
    raise KeyFileError(f"expected '{SECRET_TAG} <base64 seed>'")


def _read_small(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE:
            raise KeyFileError(f"{path}: {size} bytes is too large for a key file")
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a text key file") from None


def load_public_key(path: str | Path) -> PublicKey:
    """A public key from a ``.pub`` file (or, for convenience, from a ``.key`` file,
    whose public half is derived)."""
    p = Path(path)
    text = _read_small(p)
    try:
        if text.strip().startswith(SECRET_TAG):
            return parse_secret_key(text).public
        return parse_public_key(text)
    except KeyFileError as e:
        raise KeyFileError(f"{p}: {e}") from None


def load_secret_key(path: str | Path) -> SecretKey:
    p = Path(path)
    try:
        return parse_secret_key(_read_small(p))
    except KeyFileError as e:
        raise KeyFileError(f"{p}: {e}") from None


def write_keypair(out: str | Path, *, force: bool = False) -> tuple[Path, Path, PublicKey]:
    """Generate a key and write ``OUT.key`` (0600, created exclusively) and ``OUT.pub``."""
    base = Path(out)
    if base.suffix in (".key", ".pub"):
        base = base.with_suffix("")
    secret_path, public_path = base.with_suffix(".key"), base.with_suffix(".pub")
    sk = SecretKey.generate()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(secret_path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{secret_path} exists; refusing to overwrite a key "
                        "(use --force)") from None
    except OSError as e:
        raise KeyFileError(f"{secret_path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # also when --force reused an existing file
        f.write(sk.line() + "\n")
    pk = sk.public
    try:
        public_path.write_text(pk.line() + "\n", encoding="utf-8")
    except OSError as e:
        raise KeyFileError(f"{public_path}: {e.strerror or e}") from None
    return secret_path, public_path, pk
